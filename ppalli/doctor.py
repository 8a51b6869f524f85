"""`ppalli doctor`: what this machine has, what is wrong with it for fine-tuning, and the fix for each.

Rows are (check, value, status) with status "ok", "warn: <fix>" or "bad: <fix>". Known-bad combinations come
from the failures users report (DESIGN.md): bf16 on pre-Ampere GPUs, bitsandbytes without CUDA, flash-attn
on GPUs it does not support, transformers/peft outside the tested ranges, Unsloth's global patches.
"""

from __future__ import annotations

from dataclasses import dataclass

from ppalli.config import Config
from ppalli.env import Environment, version_tuple
from ppalli.plan.attention import FA4_INSTALL

# Tested ranges (pyproject.toml): CPU CI and the H100 machine.
TESTED = {"torch": ((2, 11), (2, 15)), "transformers": ((5, 17), (6,)), "peft": ((0, 21), (0, 23))}
TRITON_MIN = (3, 6)


@dataclass(frozen=True)
class Finding:
    severity: str  # "bad": will fail; "warn": works, but worse than it could
    problem: str
    fix: str
    package: str | None = None  # the package the finding is about, when one is

    def __str__(self) -> str:
        return f"{self.severity}: {self.problem}: {self.fix}"


def _range_finding(name: str, version: str | None) -> Finding | None:
    low, high = TESTED[name]
    floor = ".".join(map(str, low))
    if version is None:
        return Finding("bad", f"{name} is not installed", f"pip install '{name}>={floor}'", name)
    v = version_tuple(version)
    if v < low:
        return Finding("bad", f"{name} {version} is older than the tested {floor}",
                       f"pip install -U '{name}>={floor}'", name)
    if v >= high:
        ceiling = ".".join(map(str, high))
        return Finding("warn", f"{name} {version} is newer than tested (< {ceiling})",
                       f"if something breaks, pip install '{name}<{ceiling}'", name)
    return None


def _gpu_findings(env: Environment, cfg: Config | None) -> list[Finding]:
    found = []
    pinned_bf16 = cfg is not None and (cfg.plan.precision == "bf16" or cfg.model.dtype == "bfloat16")
    for gpu in env.gpus:
        if not gpu.bf16:
            sev = "bad" if pinned_bf16 else "warn"
            found.append(Finding(sev, f"{gpu.name} (compute capability {gpu.capability_str}) has no bf16; loading in "
                                      "bf16 fails with CUBLAS_STATUS_NOT_SUPPORTED",
                                 "keep plan.precision and model.dtype on auto: ppalli uses fp16 with loss scaling"))
        if gpu.capability < (7, 0):
            found.append(Finding("warn", f"{gpu.name} has no tensor cores (compute capability {gpu.capability_str}): "
                                         "slow, and recent torch wheels may lack kernels for it",
                                 "if CUDA says 'no kernel image is available', install a torch build that lists "
                                 f"sm_{gpu.capability[0]}{gpu.capability[1]} in torch.cuda.get_arch_list()"))
    return found


def _package_findings(env: Environment) -> list[Finding]:
    found = [f for name in ("transformers", "peft") if (f := _range_finding(name, env.version(name)))]
    best_cc = max((g.capability for g in env.gpus), default=None)
    if env.has("bitsandbytes") and not env.gpus:
        found.append(Finding("warn", "bitsandbytes is installed but there is no CUDA GPU",
                             "4-bit (QLoRA) is planned only on CUDA: this machine trains 16-bit", "bitsandbytes"))
    if env.gpus and not env.has("bitsandbytes"):
        found.append(Finding("warn", "bitsandbytes is missing: no 4-bit (QLoRA) plans",
                             "pip install bitsandbytes", "bitsandbytes"))
    if env.gpus and not env.has("triton"):
        found.append(Finding("warn", "triton is missing: the fused fast path is off",
                             "pip install triton (on Windows: pip install triton-windows)", "triton"))
    if env.has("triton") and version_tuple(env.version("triton")) < TRITON_MIN:
        found.append(Finding("warn", f"triton {env.version('triton')} is older than the tested 3.6",
                             "pip install -U 'triton>=3.6'", "triton"))
    if env.has("flash_attn") and best_cc is not None and best_cc < (8, 0):
        found.append(Finding("bad", "flash-attn is installed but FlashAttention 2 needs compute capability 8.0+",
                             "leave plan.attention on auto (SDPA); pip uninstall flash-attn if its import fails",
                             "flash_attn"))
    if env.has("flash_attn_3") and (best_cc is None or best_cc[0] != 9):
        found.append(Finding("warn", "flash-attn 3 is installed but runs only on Hopper (9.x)",
                             "leave plan.attention on auto; it is not used here", "flash_attn_3"))
    if env.has("flash_attn_4") and (best_cc is None or best_cc < (8, 0)):
        found.append(Finding("warn", "flash-attn 4 is installed but needs compute capability 8.0+",
                             "leave plan.attention on auto; it is not used here", "flash_attn_4"))
    if best_cc is not None and best_cc[0] == 9 and not (env.has("flash_attn_4") or env.has("flash_attn_3")):
        found.append(Finding("warn", "flash-attn 4 is missing: attention on this Hopper GPU runs SDPA's cuDNN kernel",
                             f"{FA4_INSTALL} (T1, Llama-3.1-8B LoRA on an H100: 2.2-2.6% more tokens/s with it)",
                             "flash_attn_4"))
    if env.has("unsloth"):
        found.append(Finding("warn", "unsloth is installed; importing it patches transformers for the whole process",
                             "do not import unsloth in a ppalli run (ppalli never does)", "unsloth"))
    return found


def _cfg_findings(env: Environment, cfg: Config | None) -> list[Finding]:
    if cfg is None:
        return []
    found = []
    if cfg.plan.quantization in ("nf4", "fp4") and not (env.has("bitsandbytes") and env.gpus):
        found.append(Finding("bad", f"plan.quantization={cfg.plan.quantization} needs bitsandbytes and a CUDA GPU",
                             "pip install bitsandbytes on a CUDA machine, or set plan.quantization=auto"))
    if cfg.plan.fp8 and not any(g.capability >= (9, 0) for g in env.gpus):
        best = max((g.capability_str for g in env.gpus), default="none")
        found.append(Finding("bad", f"plan.fp8=true needs a GPU of compute capability 9.0+ (row-wise fp8 GEMMs); "
                                    f"best here: {best}", "set plan.fp8=false"))
    if cfg.plan.attention == "flash_attention_2" and not env.has("flash_attn"):
        found.append(Finding("bad", "plan.attention=flash_attention_2 but flash-attn is not installed",
                             "pip install flash-attn --no-build-isolation, or set plan.attention=auto"))
    return found


def known_bad_combinations(env: Environment, cfg: Config | None = None) -> list[Finding]:
    """Known-bad package / hardware (/ config, when given) combinations, worst first."""
    found = _gpu_findings(env, cfg) + _package_findings(env) + _cfg_findings(env, cfg)
    if env.cuda and not env.gpus and not env.mps:
        found.append(Finding("bad", f"torch is a CUDA {env.cuda} build but sees no GPU",
                             "check nvidia-smi, the driver, and CUDA_VISIBLE_DEVICES"))
    return sorted(found, key=lambda f: f.severity != "bad")


def _status(finding: Finding | None) -> str:
    return "ok" if finding is None else f"{finding.severity}: {finding.fix}"


def _machine_rows(env: Environment) -> list[tuple[str, str, str]]:
    py_ok = version_tuple(env.python) >= (3, 10)
    rows = [("os", env.os, "ok"), ("python", env.python, "ok" if py_ok else "bad: ppalli needs Python 3.10+")]
    torch_range = _range_finding("torch", env.torch)
    rows.append(("torch", env.torch or "not installed", _status(torch_range)))
    if env.gpus:
        rows.append(("CUDA", env.cuda or "?", "ok"))
    else:
        accel = "MPS (Apple GPU)" if env.mps else "none: CPU only"
        rows.append(("accelerator", accel, "ok" if env.mps else
                     "warn: training on the CPU is slow; install a CUDA build of torch on a GPU machine"))
    for i, g in enumerate(env.gpus):
        rows.append((f"GPU {i}", f"{g.name}, {g.total_memory_gib:.1f} GiB, compute capability {g.capability_str}, "
                                 f"bf16 {'yes' if g.bf16 else 'no'}", "ok" if g.bf16 else "warn: fp16 is used"))
    ram = f"{env.ram_bytes / 2**30:.0f} GiB" if env.ram_bytes else "unknown"
    return rows + [("CPU", f"{env.cpu_count} cores", "ok"), ("RAM", ram, "ok")]


def doctor_report(env: Environment, cfg: Config | None = None) -> list[tuple[str, str, str]]:
    """Machine facts, each package ppalli knows (version or 'not installed', with the problem about it if any),
    then every other known problem with its fix."""
    rows = _machine_rows(env)
    findings = known_bad_combinations(env, cfg)
    for name in ("transformers", "peft", "triton", "bitsandbytes", "flash_attn", "flash_attn_3", "liger_kernel",
                 "unsloth", "xformers"):
        about = next((f for f in findings if f.package == name), None)
        rows.append((name, env.version(name) or "not installed", "ok" if about is None else str(about)))
    rows += [("problem", f.problem, _status(f)) for f in findings if f.package is None]
    return rows
