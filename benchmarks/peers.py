"""ppalli side by side with Unsloth, Liger Kernel and HF + PEFT: tokens/s, peak memory, loss (issue 5/6).

    python benchmarks/peers.py --case T1 --out benchmarks/results           # the targets of BENCHMARKS.md
    python benchmarks/peers.py --case custom --model 1b --batch 8 --seq 2048 --gc off --stacks ppalli,unsloth
    python benchmarks/peers.py --case T4 --stacks ppalli --baseline /tmp/base   # a change against an older build

Random-weight Llamas built from their configs (speed and memory do not depend on weight values), random
seeded tokens as inputs and labels (a fixed batch x seq, no padding), LoRA r=16 alpha=16 dropout 0 on
q,k,v,o,gate,up,down, bf16, fused torch AdamW (lr 2e-4) on the adapter, `--warmup` + `--steps` steps timed
with CUDA events; peak = torch.cuda.max_memory_allocated() after a reset before the warm-up.

This process never imports torch or a peer: it spawns one subprocess per (stack, setting) running
benchmarks/_stacks.py (peers patch transformers globally, so each stack gets a fresh interpreter), reads the
one result line each prints, and rewrites DIR/<date>-<gpu>-<case>.json and .md after every run, so a run cut
short still leaves what it measured. A failed or timed-out subprocess records its error in its run.
Stacks that load from a folder (Unsloth always, HF + bitsandbytes for nf4) get the same random model saved
once to /tmp/ppalli-peers/models (reused by later cases). The peers' packages come from --peer-site
(default /tmp/peer-site; unpacked from .peers/site.tgz when missing) on the subprocesses' PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`
from ppalli.plan.memory import ModelSpec, lora_param_count  # noqa: E402  (pure: no torch)
from ppalli.plan.speed import flops_per_token  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers_env import child_env, ensure_peer_site, versions  # noqa: E402
from _peers_table import fmt, ok, power_summary, power_table, reference_ppalli, table_row  # noqa: E402

STACKS_PY = Path(__file__).resolve().parent / "_stacks.py"
SCRATCH = Path("/tmp/ppalli-peers")  # model folders, configs, the peers' caches; never the checkout
RESULT_PREFIX = "PEERS_RESULT "  # the one line a subprocess prints its result on (peers print a lot)
STACKS = ("ppalli", "unsloth", "liger", "hf")
GC_MODES = ("on", "off", "unsloth")
CHECKPOINTING = ("none", "selective", "full", "offload")
LORA = {"r": 16, "alpha": 16, "dropout": 0.0}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR = 2e-4
CEILING_TFLOPS = 798.0  # measured bf16 matmul ceiling of the H100 kind (BENCHMARKS.md, 8192^3: 793-798)

# Llama-3.2-1B: ../shared/data/tokenizer_llama3/config_llama-3.2-1b.json, copied (the GPU machine lacks ../shared).
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
# Llama-3.1-8B's published config.json, written by hand: 8,030,261,248 parameters (ModelSpec counts them).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
# A two-layer Llama for checking the plumbing on a CPU (not a benchmark): --model tiny.
TINY = {**LLAMA_32_1B, "head_dim": 16, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 256, "bos_token_id": 1, "eos_token_id": 2}
MODELS = {"8b": ("llama-3.1-8b", LLAMA_31_8B), "1b": ("llama-3.2-1b", LLAMA_32_1B), "tiny": ("tiny-llama", TINY)}


@dataclass(frozen=True)
class Case:
    title: str
    model: str
    batch: int
    seq: int
    quant: str = "none"
    mem_cap_gib: float | None = None
    peers: tuple[tuple[str, str], ...] = ()  # (stack, gc) run beside ppalli's plan


# BENCHMARKS.md, "Targets": each case holds ppalli's own plan and the peer runs its target is read against.
CASES = {
    "T1": Case("Llama-3.1-8B LoRA, ppalli's own plan", "8b", 4, 2048,
               peers=(("unsloth", "off"), ("unsloth", "unsloth"), ("hf", "on"), ("liger", "on"))),
    "T2": Case("Llama-3.1-8B LoRA, memory capped at 24 GiB", "8b", 4, 2048, mem_cap_gib=24.0,
               peers=(("unsloth", "unsloth"),)),
    "T3": Case("Llama-3.1-8B QLoRA nf4", "8b", 4, 2048, quant="nf4", peers=(("unsloth", "unsloth"), ("hf", "on"))),
    "T4": Case("Llama-3.2-1B LoRA", "1b", 8, 2048, peers=(("unsloth", "off"), ("unsloth", "unsloth"))),
    "custom": Case("custom", "8b", 4, 2048, peers=(("unsloth", "unsloth"), ("hf", "on"), ("liger", "on"))),
}


@dataclass(frozen=True)
class Target:
    speed: float  # ppalli tokens/s over the peer's, at least
    peer_gc: str | None = None  # the peer run compared with: this GC mode, or None for Unsloth's fastest
    max_peak_gib: float | None = None
    peak_at_most_peer: bool = False


TARGETS_BY_CASE = {
    "T1": Target(1.17, max_peak_gib=60.0),
    "T2": Target(1.2, peer_gc="unsloth"),
    "T3": Target(1.2, peer_gc="unsloth", peak_at_most_peer=True),
    "T4": Target(1.2),
}


@dataclass
class RunSpec:
    """One subprocess: what _stacks.py builds and times. Serialized to JSON on its command line."""

    case: str
    stack: str
    gc: str  # peers: on / off / unsloth; ppalli: "plan" (its plan decides, or --ppalli-setting forces)
    model: str
    batch: int
    seq: int
    quant: str
    steps: int
    warmup: int
    seed: int
    warmup_s: float = 0.0  # the warm-up goes on, round its batches, this many seconds after its first round
    mem_cap_gib: float | None = None
    ppalli: dict = field(default_factory=dict)  # parsed --ppalli-setting; "requested" keeps the text
    model_config: dict = field(default_factory=dict)
    config_path: str = ""  # the config.json ppalli builds random weights from
    folder: str = ""  # saved random model for Unsloth / HF + bnb
    profile: str = ""  # where to write the profiler table ("" = no profiling); "{gpu}" is filled in
    tree: str = ""  # a source tree whose benchmarks/_stacks.py runs this spec (--baseline), "" for this checkout

    @property
    def needs_folder(self) -> bool:
        return self.stack == "unsloth" or (self.stack == "hf" and self.quant != "none")

    def label(self) -> str:
        what = self.ppalli.get("requested", "auto") if self.stack == "ppalli" else f"gc={self.gc}"
        return f"{self.stack} ({what})"

    def stacks_py(self) -> Path:
        return Path(self.tree) / "benchmarks" / "_stacks.py" if self.tree else STACKS_PY


# --------------------------------------------------------------------------- arguments


def parse_ppalli_setting(text: str) -> dict:
    """'auto' or comma-separated pins: a checkpointing mode, micro=N, fast=on|off, attention=NAME, budget=GIB,
    deterministic (plan.deterministic=true), fp8 (plan.fp8=true).

    >>> parse_ppalli_setting("offload,micro=2")
    {'requested': 'offload,micro=2', 'checkpointing': 'offload', 'micro': 2}
    """
    out: dict = {"requested": text}
    for item in (t.strip() for t in text.split(",")):
        key, _, value = item.partition("=")
        if item in ("", "auto"):
            continue
        if item in CHECKPOINTING:
            out["checkpointing"] = item
        elif key == "micro" and value.isdigit() and int(value) > 0:
            out["micro"] = int(value)
        elif key == "fast" and value in ("on", "off", "auto"):
            out["fast"] = value
        elif key == "attention" and value:
            out["attention"] = value
        elif key == "budget" and _is_number(value):
            out["budget"] = float(value)
        elif item in ("deterministic", "fp8"):
            out[item] = True
        else:
            raise argparse.ArgumentTypeError(
                f"--ppalli-setting {text!r}: {item!r} is not one of auto, {', '.join(CHECKPOINTING)}, micro=N, "
                "fast=on|off, attention=NAME, budget=GIB, deterministic, fp8")
    return out


def _is_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _stack_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STACKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--stacks: {bad or text!r} not among {', '.join(STACKS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", required=True, choices=list(CASES), help="a target of BENCHMARKS.md, or custom")
    p.add_argument("--stacks", type=_stack_list, default=list(STACKS), help="comma list (default: all of the case)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernel autotuning, compiles)")
    p.add_argument("--warmup-s", type=float, default=0.0,
                   help="keep warming up (round the warm-up batches) this many seconds after their first round "
                        "(compiles): a GPU at its power cap settles over seconds, so this times what a long run sees")
    p.add_argument("--model", choices=list(MODELS),
                   help="8b (Llama-3.1-8B), 1b (Llama-3.2-1B), tiny (a plumbing check on a CPU); default: the case's")
    p.add_argument("--batch", type=int, help="sequences per step (default: the case's)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the case's)")
    p.add_argument("--gc", choices=GC_MODES, help="peers' gradient checkpointing, replacing the case's modes "
                                                  "(hf/liger read unsloth as on)")
    p.add_argument("--quant", choices=("none", "nf4"), help="base weights (default: the case's)")
    p.add_argument("--mem-cap-gib", type=float, help="cap every subprocess (set_per_process_memory_fraction) "
                                                     "and ppalli's plan budget")
    p.add_argument("--ppalli-setting", type=parse_ppalli_setting, action="append",
                   help="auto (ppalli's own plan) or pins like 'offload,micro=2', 'none,fast=off', 'budget=8'; "
                        "repeat for several ppalli runs")
    p.add_argument("--baseline", type=Path,
                   help="also run ppalli's own plan from this source tree (an older build, e.g. `git archive REV | "
                        "tar -x -C DIR`) in the same call: a change against it on one machine, for gains smaller "
                        "than the spread between machines (T4 read 1.163x and 1.172x a commit apart on two H200s)")
    p.add_argument("--profile", nargs="?", const="ppalli", default="", type=str,
                   help="torch.profiler over 2 steps after the timed ones, top 25 ops by CUDA time to "
                        "DIR/<date>-<gpu>-<case>-profile-<stack>-<n>.txt; stacks to profile (default ppalli)")
    p.add_argument("--append", action="store_true",
                   help="add these runs to today's results file of this case and GPU (a case split over calls)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per subprocess before it is killed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-site", type=Path, default=Path("/tmp/peer-site"),
                   help="the peers' site-packages, put first on the subprocesses' PYTHONPATH")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.warmup_s < 0:
        p.error("--steps must be >= 1, --warmup and --warmup-s >= 0")
    if args.warmup_s > 0 and args.warmup < 1:
        p.error("--warmup-s repeats the warm-up batches: give --warmup >= 1")
    args.ppalli_setting = args.ppalli_setting or [parse_ppalli_setting("auto")]
    args.profile = _stack_list(args.profile) if args.profile else []
    if args.baseline is not None and not (args.baseline / "benchmarks" / "_stacks.py").is_file():
        p.error(f"--baseline {args.baseline}: no benchmarks/_stacks.py there (unpack a ppalli source tree into it)")
    return args


# --------------------------------------------------------------------------- what to run


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    """ppalli's runs first, then the case's peer runs, filtered by --stacks; --gc replaces the peers' modes."""
    case = CASES[args.case]
    name = args.model or case.model
    base = RunSpec(case=args.case, stack="ppalli", gc="plan", model=name, batch=args.batch or case.batch,
                   seq=args.seq or case.seq, quant=args.quant or case.quant, steps=args.steps, warmup=args.warmup,
                   warmup_s=args.warmup_s, seed=args.seed, model_config=MODELS[name][1],
                   mem_cap_gib=args.mem_cap_gib if args.mem_cap_gib is not None else case.mem_cap_gib)
    specs = [replace(base, ppalli=s) for s in args.ppalli_setting] if "ppalli" in args.stacks else []
    if args.baseline is not None and "ppalli" in args.stacks:  # requested is not "auto": never the reference run
        specs.append(replace(base, ppalli={"requested": f"baseline {args.baseline.name}"},
                             tree=str(args.baseline.resolve())))
    pairs = [(stack, args.gc or gc) for stack, gc in case.peers]
    if args.gc:  # a stack the case lacks still runs when --stacks names it
        pairs += [(s, args.gc) for s in args.stacks if s != "ppalli" and all(s != p for p, _ in case.peers)]
    seen = set()
    for stack, gc in pairs:
        gc = "on" if gc == "unsloth" and stack in ("hf", "liger") else gc  # HF has no offloaded mode
        if stack in args.stacks and (stack, gc) not in seen:
            seen.add((stack, gc))
            specs.append(replace(base, stack=stack, gc=gc))
    return specs


def place_files(specs: list[RunSpec], scratch: Path, out: Path, day: str, profile: list[str]) -> None:
    """Fill in each spec's config.json path, model folder and profile path (files are written by run_case)."""
    counts: dict[str, int] = {}
    for s in specs:
        name = MODELS[s.model][0]
        s.config_path = str(scratch / "configs" / f"{name}.json")
        s.folder = str(scratch / "models" / f"{name}-seed{s.seed}")
        counts[s.stack] = counts.get(s.stack, 0) + 1
        if s.stack in profile:
            s.profile = str(out / f"{day}-{{gpu}}-{s.case.lower()}-profile-{s.stack}-{counts[s.stack]}.txt")


def _git(*args: str) -> str | None:
    """A git command's stdout in this checkout, or None where git or .git is missing or it fails."""
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_commit() -> str | None:
    """The ppalli commit a run measures: PPALLI_COMMIT (set it in the device command: the machine's copy of
    the tree may have no .git, or an older one), else `git rev-parse` of this checkout, with "+changes" when
    ppalli/ or the benchmark scripts differ from it (2026-12-03: a device copy's .git named the session's
    first commit while the files sent were five commits on), else None."""
    if os.environ.get("PPALLI_COMMIT"):
        return os.environ["PPALLI_COMMIT"]
    head = _git("rev-parse", "--short=7", "HEAD")
    if not head:
        return None
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ":(top)ppalli", ":(top)benchmarks/*.py")
    return f"{head}+changes" if changed else head


def ppalli_config(spec: dict) -> dict:
    """The ppalli config tree (ppalli.config.from_dict) of a run: the benchmark's shape, LoRA and optimizer,
    weights pinned to the case's quantization, a dense batch (random tokens, no padding, so no packing), and
    the pins --ppalli-setting asked for; everything else is the planner's."""
    pins = spec["ppalli"]
    plan = {"quantization": spec["quant"], "checkpointing": pins.get("checkpointing", "auto"),
            "fast_path": pins.get("fast", "auto"), "attention": pins.get("attention", "auto")}
    budget = pins.get("budget", spec.get("mem_cap_gib"))
    if budget is not None:
        plan["memory_budget_gib"] = budget
    for switch in ("deterministic", "fp8"):
        if pins.get(switch):
            plan[switch] = True
    return {"model": {"name_or_path": spec["config_path"], "dtype": "bfloat16"},
            "lora": {**LORA, "targets": list(TARGETS)},
            "data": {"max_seq_len": spec["seq"], "packing": "off"},
            "train": {"batch_size": spec["batch"], "micro_batch_size": pins.get("micro"), "optimizer": "adamw",
                      "lr": LR, "seed": spec["seed"]},
            "plan": plan}


# --------------------------------------------------------------------------- figures


def model_flops_per_token(model_config: dict, seq: int) -> float:
    """DESIGN.md's LoRA model FLOPs per token: 4*N_matmul + 12*L*d*s + 6*N_lora (no recompute counted)."""
    spec = ModelSpec.from_config(model_config)
    return flops_per_token(spec, seq, lora_param_count(spec, LORA["r"], list(TARGETS)))


def share_of_peak(tokens_per_s: float, flops: float, ceiling_tflops: float = CEILING_TFLOPS) -> float:
    return tokens_per_s * flops / (ceiling_tflops * 1e12)


def gpu_slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (for file names)."""
    words = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-").split("-")
    return "-".join(w for w in words if w not in ("nvidia", "geforce")) or "unknown"


def result_paths(out: Path, day: str, device: str, case: str) -> tuple[Path, Path]:
    stem = f"{day}-{gpu_slug(device)}-{case.lower()}"
    return out / f"{stem}.json", out / f"{stem}.md"


def run_record(spec: RunSpec, child: dict, flops: float) -> dict:
    """One entry of results.runs: BENCHMARKS.md's fields first, then what explains them."""
    record = {"case": spec.case, "stack": spec.stack, "setting": child.get("setting") or spec.label(),
              "model": MODELS[spec.model][0], "batch": spec.batch, "seq": spec.seq, "quant": spec.quant,
              "gc": spec.gc, "mem_cap_gib": spec.mem_cap_gib,
              "timing": {"warmup_steps": child.get("warmup_steps", spec.warmup), "warmup_s": spec.warmup_s,
                         "timed_steps": spec.steps}}
    if spec.stack == "ppalli":
        record["requested"] = spec.ppalli.get("requested", "auto")
    if spec.tree:
        record.update(setting=f"{record['setting']} (source tree {spec.tree})", tree=spec.tree)
    tps = child.get("tokens_per_s")
    if tps:
        record.update(tokens_per_s=round(tps, 1), peak_gib=child.get("peak_gib"),
                      loss_first=child.get("loss_first"), loss_last=child.get("loss_last"),
                      share_of_peak=round(share_of_peak(tps, flops), 4), step_ms=child.get("step_ms"))
    for key in ("error", "step_ms_all", "step_detail", "losses", "build_s", "wall_s", "micro_batch", "plan",
                "fast_path_log", "peak_gib", "peak_reserved_gib", "profile"):
        if key in child and key not in record:
            record[key] = child[key]
    power = power_summary(record)
    if power:
        record["power"] = power
    return record


def results_doc(case: str, device: str, day: str, versions: dict, runs: list[dict], flops: float,
                extra: dict | None = None) -> dict:
    return {"device": device, "date": day, "case": case, "title": CASES[case].title, "versions": versions,
            "ceiling_tflops": CEILING_TFLOPS, "flops_per_token": flops, **(extra or {}), "runs": runs}


def _at_most(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a <= b


def target_line(case: str, runs: list[dict]) -> str | None:
    """BENCHMARKS.md's target of this case, read off these runs: the figures and whether they meet it."""
    target = TARGETS_BY_CASE.get(case)
    if target is None:
        return None
    ref = reference_ppalli(runs)
    peers = [r for r in runs if r["stack"] == "unsloth" and ok(r) and target.peer_gc in (None, r.get("gc"))]
    peer = max(peers, key=lambda r: r["tokens_per_s"], default=None)
    if ref is None or peer is None:
        return f"Target {case}: not read (needs a ppalli run and an Unsloth run that both finished)."
    ratio = ref["tokens_per_s"] / peer["tokens_per_s"]
    checks = [(f"{ratio:.2f}x Unsloth ({peer['setting']}), target >= {target.speed}x", ratio >= target.speed)]
    mine, theirs = ref.get("peak_gib"), peer.get("peak_gib")
    if target.max_peak_gib is not None:
        checks.append((f"peak {fmt(mine, '.1f')} GiB, target <= {target.max_peak_gib:g}",
                       _at_most(mine, target.max_peak_gib)))
    if target.peak_at_most_peer:
        checks.append((f"peak {fmt(mine, '.1f')} GiB vs Unsloth's {fmt(theirs, '.1f')}", _at_most(mine, theirs)))
    verdict = "met" if all(ok for _, ok in checks) else "NOT met"
    return f"Target {case}: {verdict} - " + "; ".join(text for text, _ in checks) + "."


def timing_line(runs: list[dict]) -> str:
    """How the runs were timed: the warm-up (steps, and the seconds it was held to) and the timed steps."""
    parts = []
    for r in runs:
        t = r.get("timing")
        if t:
            held = f", held to {t['warmup_s']:g} s" if t.get("warmup_s") else ""
            parts.append(f"{r['stack']} {t['warmup_steps']} warm-up steps{held}, then {t['timed_steps']} timed")
    return "Timing: " + ("; ".join(parts) if parts else "not recorded") + "."


def markdown(doc: dict) -> str:
    runs, ref = doc["runs"], reference_ppalli(doc["runs"])
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v)
    head = [f"# {doc['case']}: {doc['title']}", "",
            f"{doc['device']}, {doc['date']}. {versions}."
            + (f" ppalli at {doc['commit']}." if doc.get("commit") else ""), "",
            f"Random-weight {runs[0]['model'] if runs else '?'}, LoRA r=16 on q,k,v,o,gate,up,down, bf16, fused "
            f"AdamW; model FLOPs per token {doc['flops_per_token'] / 1e9:.2f} G (4*N_matmul + 12*L*d*s + "
            f"6*N_lora, no recompute); share of the measured {doc['ceiling_tflops']:g} TFLOP/s bf16 ceiling. "
            "Ratios: ppalli's own plan over each run (speed: tokens/s; peak: GiB, lower is better for ppalli).",
            "", timing_line(runs),
            "", "| stack | setting | batch x seq | tokens/s | step ms (median) | peak GiB | share of ceiling | "
                "loss first -> last | ppalli / this (speed) | ppalli / this (peak) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    lines = head + [table_row(r, ref) for r in runs] + power_table(runs)
    target = target_line(doc["case"], runs)
    return "\n".join(lines + ([""] + [target] if target else [])) + "\n"


# --------------------------------------------------------------------------- subprocesses


def parse_child_output(text: str) -> dict | None:
    """The last result line a subprocess printed, or None."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                return json.loads(line[len(RESULT_PREFIX):])
            except json.JSONDecodeError:
                return None
    return None


def _last_lines(text: str, n: int = 3) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return " / ".join(lines[-n:])[-400:]


def run_child(payload: dict, log_path: Path, env: dict, timeout: int, stacks_py: Path = STACKS_PY) -> dict:
    """Run stacks_py (this checkout's _stacks.py, or a baseline tree's) on one payload in its own process group;
    its result dict, or one with 'error'."""
    cmd = [sys.executable, str(stacks_py), json.dumps(payload)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=SCRATCH,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        finally:  # also on SIGTERM to this process: never leave a stack holding the GPU
            _kill_group(proc)  # with whatever it started (compile workers)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    result = parse_child_output(text)
    if timed_out:
        result = dict(result or {}, error=f"timed out after {timeout} s (log {log_path})")
    elif result is None:
        result = {"error": f"exit code {rc}, no result line: {_last_lines(text)} (log {log_path})"}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def ensure_folder(spec: RunSpec, env: dict, logs: Path, timeout: int, cache: dict) -> str | None:
    """The saved random model a folder-loading stack needs; returns an error string or None."""
    if spec.folder in cache:
        return cache[spec.folder]
    marker = Path(spec.folder) / "ppalli-peers.json"
    want = {"model_config": spec.model_config, "seed": spec.seed}
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == want:
        cache[spec.folder] = None
        return None
    print(f"saving the random {MODELS[spec.model][0]} to {spec.folder} for the folder-loading stacks", flush=True)
    payload = {"role": "prepare", "model_config": spec.model_config, "folder": spec.folder, "seed": spec.seed}
    result = run_child(payload, logs / f"prepare-{spec.model}.log", env, timeout)
    error = result.get("error")
    cache[spec.folder] = f"model folder: {error}" if error else None
    print(f"  {'failed: ' + error if error else 'saved'} ({result.get('save_s', '?')} s save, "
          f"{result['wall_s']} s in all)", flush=True)
    return cache[spec.folder]


def _summary(spec: RunSpec, rec: dict) -> str:
    if not ok(rec):
        return f"[{spec.case}] {spec.label()}: FAILED {str(rec.get('error'))[:300]}"
    return (f"[{spec.case}] {spec.label()}: {rec['tokens_per_s']:,.0f} tok/s, peak {fmt(rec['peak_gib'], '.2f')} GiB, "
            f"{rec['share_of_peak']:.1%} of ceiling, loss {rec['loss_first']:.3f} -> {rec['loss_last']:.3f} "
            f"({rec.get('wall_s', '?')} s)")


def write_results(doc: dict, out: Path) -> tuple[Path, Path]:
    json_path, md_path = result_paths(out, doc["date"], doc["device"], doc["case"])
    out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(markdown(doc), encoding="utf-8")
    return json_path, md_path


def _write_configs(specs: list[RunSpec]) -> None:
    for s in specs:
        Path(s.config_path).parent.mkdir(parents=True, exist_ok=True)
        Path(s.config_path).write_text(json.dumps(s.model_config, indent=1), encoding="utf-8")


def set_device(doc: dict, child: dict, out: Path, append: bool) -> None:
    """The first device a subprocess reports names the files; --append takes in the runs already there."""
    for stale in result_paths(out, doc["date"], "unknown", doc["case"]):  # written before a device was known
        stale.unlink(missing_ok=True)
    doc["device"], doc["cuda"] = child["device"], child.get("cuda")
    earlier = result_paths(out, doc["date"], doc["device"], doc["case"])[0]
    if append and earlier.is_file():
        doc["runs"][:0] = json.loads(earlier.read_text(encoding="utf-8"))["runs"]


def run_case(args: argparse.Namespace) -> dict:
    day = date.today().isoformat()
    specs = run_specs(args)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    place_files(specs, SCRATCH, args.out.resolve(), day, args.profile)
    _write_configs(specs)
    site = ensure_peer_site(args.peer_site, REPO / ".peers" / "site.tgz")
    if site is not None:
        sys.path.insert(0, str(site))  # so versions() reads the peers' metadata too
    env = child_env(site, SCRATCH)
    flops = model_flops_per_token(specs[0].model_config, specs[0].seq) if specs else 0.0
    doc = results_doc(args.case, "unknown", day, versions(), [], flops,
                      {"command": " ".join(sys.argv), "commit": source_commit()})
    logs, folders, t0 = args.out.resolve() / "logs", {}, time.perf_counter()
    for spec in specs:
        error = ensure_folder(spec, env, logs, args.timeout, folders) if spec.needs_folder else None
        payload = {"role": "run", **asdict(spec)}
        log = logs / f"{day}-{spec.case.lower()}-{gpu_slug(spec.label())}.log"  # e.g. ...-t1-unsloth-gc-off.log
        child = {"error": error} if error else run_child(payload, log, env, args.timeout, spec.stacks_py())
        if doc["device"] == "unknown" and child.get("device"):
            set_device(doc, child, args.out, args.append)
        doc["runs"].append(run_record(spec, child, flops))
        print(_summary(spec, doc["runs"][-1]), flush=True)
        write_results(doc, args.out)
    doc["total_s"] = round(time.perf_counter() - t0, 1)
    return doc


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_child, which kills the running stack


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # `timeout 570 python ...` keeps the runs written so far
    doc = run_case(args)
    if not doc["runs"]:
        print("nothing to run: --stacks filtered out every run of this case")
        return 2
    json_path, md_path = write_results(doc, args.out)
    print(markdown(doc))
    print(f"wrote {json_path} and {md_path} ({doc['total_s']} s)")
    return 0 if any(ok(r) for r in doc["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
