"""Environment + config + model spec -> Plan: every choice with a one-line reason.

Pinned config values are kept and labelled "pinned in config"; a pin that cannot work on this machine is an
error that says why and what to set instead. Memory choices take the least recompute that fits the budget
(none < selective < full < offload), then the largest micro-batch that divides the effective batch;
4-bit weights only when no 16-bit plan fits (or when pinned).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ppalli.config import PREFERENCE_OBJECTIVES, Config
from ppalli.env import GPU, Environment
from ppalli.errors import ConfigError, PpalliError
from ppalli.plan.attention import attention_choice
from ppalli.plan.gpus import find_card
from ppalli.plan.memory import (
    CHECKPOINTING,
    GIB,
    MemoryEstimate,
    ModelSpec,
    estimate_peak_bytes,
    lora_param_count,
)
from ppalli.plan.nofit import no_fit
from ppalli.plan.sharding import auto_sharding, pinned_sharding
from ppalli.plan.speed import DETERMINISTIC_SLOWDOWN, host_seconds, step_seconds
from ppalli.plan.switches import NO_SDPA_FAMILIES, deterministic_choice, fp8_choice, fp8_rows_note

# model_type values with a family spec in ppalli/models/families (the fast path itself falls back per layer)
FAST_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "exaone", "exaone4")
MARGIN_SHARE, MARGIN_MIN_GIB = 0.05, 0.5  # kept free on the GPU: other processes, display, driver growth
RAM_SHARE = {"cpu": 0.8, "mps": 0.65}  # macOS lets the GPU wire roughly 2/3 of unified memory
CHOICES = ("device", "precision", "attention", "quantization", "checkpointing", "micro_batch_size", "packing",
           "fast_path", "compile", "fp8", "deterministic")
NOTES = ("rows", "world", "sharding", "memory", "speed")  # reasons shown after the choices, when present
PINNED = "pinned in config"


@dataclass(frozen=True)
class Plan:
    device: str
    precision: str
    attention: str
    quantization: str
    checkpointing: str
    micro_batch_size: int
    grad_accum: int
    packing: bool
    fast_path: bool
    compile: bool
    reasons: dict[str, str] = field(default_factory=dict)
    pinned: tuple[str, ...] = ()
    double_quant: bool = True
    predicted_peak_gib: float | None = None
    budget_gib: float | None = None
    est_tokens_per_s: float | None = None
    gpu: str | None = None
    recompute_layers: int | None = None  # "selective": how many decoder layers recompute (None: half)
    deterministic: bool = False  # bit-repeatable kernels (ppalli/train/determinism.py)
    fp8: bool = False  # the fast path's base GEMMs in e4m3 (ppalli/kernels/fp8.py)
    sharding: str = "off"  # "fsdp": the 16-bit base weights spread over the ranks (ppalli/plan/sharding.py)
    # packed: the most tokens a pass holds when below micro x max_seq_len: the most one step of the data holds,
    # when it was read (make_plan's step_tokens), halved with the micro-batch on an OOM step-down
    pass_tokens: int | None = None

    @property
    def batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), pinned=list(self.pinned))

    def explain(self) -> list[str]:
        """One line per choice, then memory and speed: 'checkpointing: none - activations of every layer fit'."""
        lines = [f"{name}: {_show(name, self)} - {self.reasons.get(name, '')}" for name in CHOICES]
        return lines + [f"{k}: {self.reasons[k]}" for k in NOTES if k in self.reasons]


def _show(name: str, plan: Plan) -> str:
    if name == "micro_batch_size":
        return f"{plan.micro_batch_size} x {plan.grad_accum} accumulation"
    value = getattr(plan, name)
    if isinstance(value, bool):
        return "on" if value else "off"
    if name == "quantization" and value != "none":
        return f"{value}{' + double quant' if plan.double_quant else ''}"
    if name == "checkpointing" and value == "selective" and plan.recompute_layers:
        return f"selective ({plan.recompute_layers} layers)"
    return str(value)


@dataclass
class _Ctx:
    """What the choices so far decided, passed to the memory search."""

    env: Environment
    cfg: Config
    spec: ModelSpec
    device: str
    gpu: GPU | None
    precision: str = "fp32"
    attention: str = "sdpa"
    fast_path: bool = False
    packing: bool = False
    fp8: bool = False
    shards: int = 1  # ranks the base weights are spread over (FSDP2)
    step_tokens: int | None = None  # packed: the most tokens one step's samples hold (collate.most_tokens)
    pinned: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    runner_up: tuple | None = None  # (seconds, checkpointing, micro-batch, layers) of the next-best plan that fit

    def pin(self, name: str, key: str, value: Any) -> str:
        self.pinned.append(name)
        return f"{PINNED} ({key}={value})"


# --------------------------------------------------------------------------- one choice each


def _device(env: Environment, want: str, gpu_index: int) -> tuple[str, GPU | None, str]:
    if want in ("auto", "cuda") and env.gpus:
        gpu = env.gpu(gpu_index)
        if gpu is None:
            raise PpalliError(f"GPU index {gpu_index} does not exist: {len(env.gpus)} visible "
                              f"({', '.join(g.name for g in env.gpus)})")
        return "cuda", gpu, f"{gpu.name}, {gpu.total_memory_gib:.1f} GiB, compute capability {gpu.capability_str}"
    if want == "cuda":
        raise PpalliError(f"plan.device=cuda but no CUDA GPU is visible (torch {env.torch}, CUDA build "
                          f"{env.cuda}): install a CUDA build of torch, check CUDA_VISIBLE_DEVICES, or set "
                          "plan.device=cpu")
    if want == "mps" or (want == "auto" and env.mps):
        if not env.mps:
            raise PpalliError("plan.device=mps but MPS is not available (macOS 12.3+ on Apple silicon)")
        return "mps", None, "Apple GPU (MPS)"
    return "cpu", None, "no GPU visible: training on the CPU is slow; fine for the demo and tiny models"


_DTYPE_PINS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _pinned_precision(cfg: Config) -> tuple[str, str] | None:
    """(precision, where it was pinned) or None; plan.precision and model.dtype must agree."""
    plan_pin = None if cfg.plan.precision == "auto" else cfg.plan.precision
    model_pin = _DTYPE_PINS.get(cfg.model.dtype)
    if plan_pin and model_pin and plan_pin != model_pin:
        raise ConfigError(f"plan.precision={plan_pin} and model.dtype={cfg.model.dtype} disagree: set one of them "
                          "(or both the same)")
    if plan_pin:
        return plan_pin, "plan.precision"
    return (model_pin, "model.dtype") if model_pin else None


def _precision(ctx: _Ctx) -> str:
    gpu, pin = ctx.gpu, _pinned_precision(ctx.cfg)
    if pin and pin[0] == "bf16" and gpu is not None and not gpu.bf16:
        raise PpalliError(f"{pin[1]} pins bf16 but {gpu.name} (compute capability {gpu.capability_str}) has no "
                          "bf16 (it needs 8.0+; loading in bf16 there fails with CUBLAS_STATUS_NOT_SUPPORTED): "
                          f"set {pin[1]} to auto or fp16/float16")
    if pin:
        ctx.reasons["precision"] = ctx.pin("precision", pin[1], ctx.cfg.plan.precision if pin[1] == "plan.precision"
                                           else ctx.cfg.model.dtype)
        return pin[0]
    if ctx.device != "cuda":
        ctx.reasons["precision"] = f"fp32 on {ctx.device}: its bf16/fp16 matmuls are slow or missing; safe default"
        return "fp32"
    if gpu.bf16:
        ctx.reasons["precision"] = f"compute capability {gpu.capability_str} has bf16: fp32's range, no loss scaling"
        return "bf16"
    ctx.reasons["precision"] = (f"compute capability {gpu.capability_str} has no bf16 (needs 8.0+): fp16 with "
                                "dynamic loss scaling")
    return "fp16"


def _fast_path_blockers(ctx: _Ctx) -> list[str]:
    lora, spec = ctx.cfg.lora, ctx.spec
    checks = [
        (ctx.device == "cuda", "no CUDA GPU (the Triton kernels run on CUDA)"),
        (ctx.env.has("triton"), "triton is not installed (pip install triton)"),
        (spec.family in FAST_FAMILIES, f"no fused kernels for family {spec.family!r} "
                                       f"(covered: {', '.join(FAST_FAMILIES)})"),
        (spec.n_experts == 1, "mixture-of-experts layers run on the reference path"),
        (lora.dropout == 0, f"lora.dropout={lora.dropout} (the fused LoRA kernels have no dropout; set 0)"),
        (not lora.use_dora, "DoRA (lora.use_dora) runs on the reference path"),
        (ctx.attention != "eager", "eager attention was pinned"),
    ]
    return [why for ok, why in checks if not ok]


def _fast_path(ctx: _Ctx) -> bool:
    want, blockers = ctx.cfg.plan.fast_path, _fast_path_blockers(ctx)
    if want == "on" and blockers:
        raise PpalliError(f"plan.fast_path=on but {'; '.join(blockers)}: fix that or set plan.fast_path=auto")
    if want != "auto":
        ctx.reasons["fast_path"] = ctx.pin("fast_path", "plan.fast_path", want)
        return want == "on"
    if blockers:
        ctx.reasons["fast_path"] = "reference PyTorch path: " + "; ".join(blockers)
        return False
    ctx.reasons["fast_path"] = (f"fused Triton kernels for {ctx.spec.family} (RMSNorm, RoPE, SwiGLU, LoRA blocks, "
                                "chunked loss): less memory, more speed")
    return True


def _packing(ctx: _Ctx) -> bool:
    want = ctx.cfg.data.packing
    if want != "auto":
        ctx.reasons["packing"] = ctx.pin("packing", "data.packing", want)
        return want == "on"
    if ctx.cfg.train.objective in PREFERENCE_OBJECTIVES:
        ctx.reasons["packing"] = (f"{ctx.cfg.train.objective}: chosen and rejected answers end to end in one row, "
                                  "no compute spent on padding (8 padded pairs of ko_preference_rlhf hold 48% "
                                  "real tokens), same per-sequence log-probs")
        return True
    ctx.reasons["packing"] = "SFT: padding-free packing, no compute spent on padding, same per-sample losses"
    return True


def _sequences(ctx: _Ctx) -> int:
    """Sequences a sample holds: a chosen and a rejected answer for the paired objectives."""
    return 2 if ctx.cfg.train.objective in PREFERENCE_OBJECTIVES else 1


def _step_rows(ctx: _Ctx, micro: int) -> None:
    """Say so when the data's longest steps hold fewer tokens than the packed passes could."""
    capacity = micro * ctx.cfg.data.max_seq_len * _sequences(ctx)
    if ctx.step_tokens and ctx.step_tokens < capacity:
        n = ctx.cfg.train.batch_size
        ctx.reasons["rows"] = (f"a step's {n} samples hold at most {ctx.step_tokens:,} tokens (the data's {n} "
                               f"longest), under the {capacity:,} a packed pass of {micro} could: sized for that")


def _data_rows(ctx: _Ctx, longest: int | None) -> None:
    """Unpacked batches are padded to their longest row, so size memory and time for the data's longest
    sequence when it is shorter than data.max_seq_len (ctx.cfg becomes that view; the run keeps its own)."""
    if longest is None or ctx.packing or longest >= ctx.cfg.data.max_seq_len:
        return
    ctx.reasons["rows"] = (f"the data's longest sequence is {longest} tokens (data.max_seq_len "
                           f"{ctx.cfg.data.max_seq_len}); batches are not packed, so the plan is sized for {longest}")
    ctx.cfg = dataclasses.replace(ctx.cfg, data=dataclasses.replace(ctx.cfg.data, max_seq_len=longest))


def _compile(ctx: _Ctx) -> bool:
    want = ctx.cfg.plan.compile
    if want != "auto":
        ctx.reasons["compile"] = ctx.pin("compile", "plan.compile", want)
        return want == "on"
    ctx.reasons["compile"] = ("off by default: compiling costs minutes and packed batches vary in shape; "
                              "set plan.compile=on to try it on long runs")
    return False


def _budget(ctx: _Ctx) -> float | None:
    """GiB the plan may use: plan.memory_budget_gib, else the GPU less a margin, else a share of RAM."""
    pinned, gpu = ctx.cfg.plan.memory_budget_gib, ctx.gpu
    whole = gpu.total_memory_gib if gpu else (ctx.env.ram_bytes or 0) / GIB * RAM_SHARE.get(ctx.device, 0.8)
    if pinned is not None:
        ctx.reasons["budget"] = f"{PINNED} (plan.memory_budget_gib={pinned:g})"
        return min(pinned, whole) if whole else pinned
    if gpu is not None:
        margin = max(MARGIN_MIN_GIB, MARGIN_SHARE * whole)
        ctx.reasons["budget"] = f"{whole:.1f} GiB on the GPU less {margin:.1f} GiB kept free"
        return whole - margin
    if not whole:
        ctx.reasons["budget"] = "RAM size unknown: memory is not checked"
        return None
    ctx.reasons["budget"] = f"{RAM_SHARE.get(ctx.device, 0.8):.0%} of {ctx.env.ram_bytes / GIB:.0f} GiB RAM"
    return whole


# --------------------------------------------------------------------------- memory choices


def _estimate(ctx: _Ctx, quant: str, checkpointing: str, micro: int, seq_len: int | None = None,
              layers: int | None = None) -> MemoryEstimate:
    cfg = ctx.cfg
    seqs = micro * _sequences(ctx)
    seq_len = seq_len or cfg.data.max_seq_len
    if ctx.packing:  # one row of all the micro-batch's tokens: a mask, when there is one, spans the row
        seq_len, seqs = seq_len * seqs, 1
        if ctx.step_tokens:  # a pass never holds more than its step's samples
            seq_len = min(seq_len, ctx.step_tokens)
    return estimate_peak_bytes(
        ctx.spec, lora_r=cfg.lora.r, lora_targets=cfg.lora.targets, quant=quant, double_quant=cfg.plan.double_quant,
        dtype_bytes=4 if ctx.precision == "fp32" else 2, seq_len=seq_len, micro_batch=seqs,
        checkpointing=checkpointing, recompute_layers=layers, optimizer=cfg.train.optimizer, fused_ce=ctx.fast_path,
        fast_path=ctx.fast_path,
        lora_dropout=cfg.lora.dropout, attention="eager" if _eager_attention(ctx) else "sdpa",
        attn_mask=_has_mask(ctx), logits_held=False, device=ctx.device,  # train/objectives.py drops them
        fp8_copies=ctx.cfg.plan.fp8, shards=ctx.shards, logps_rows=_logps_rows(ctx),
        logps_kernel=ctx.device == "cuda" and ctx.env.has("triton"),  # train/linear_logps.py _use_kernel
        paired=cfg.train.objective in PREFERENCE_OBJECTIVES)


def _logps_rows(ctx: _Ctx) -> int:
    """Rows per chunk of the preference objectives' token scoring (train/linear_logps.py), 0 for SFT or a model
    whose head they score from full logits (train/objectives.py sequence_logps: the fast-path families only)."""
    from ppalli.train.linear_logps import CHUNK_ROWS

    paired = ctx.cfg.train.objective in PREFERENCE_OBJECTIVES
    return CHUNK_ROWS if paired and ctx.spec.family in FAST_FAMILIES else 0


def _eager_attention(ctx: _Ctx) -> bool:
    """Whether attention writes out its (T, T) scores: eager pinned, or the reference path of a family whose HF
    class has no SDPA (the fused path runs softcapped attention without them)."""
    return ctx.attention == "eager" or (not ctx.fast_path and ctx.spec.family in NO_SDPA_FAMILIES)


def _has_mask(ctx: _Ctx) -> bool:
    """Whether SDPA gets a dense mask. HF's reference layers build one for padded or packed batches
    (transformers 5.24 masking_utils); the fused layers pass a packed row's boundaries to varlen kernels,
    which need compute capability 8.0+, and build a mask below that or for padding (models/attention.py)."""
    if ctx.attention in ("flash_attention_2", "flash_attention_3", "flex_attention"):
        return False
    if ctx.attention == "flash_attention_4":  # the reference path runs SDPA with HF's masks then
        return not ctx.fast_path
    if ctx.fast_path:
        return not ctx.packing or ctx.gpu is None or ctx.gpu.capability < (8, 0)
    return True


def _quant_options(ctx: _Ctx, pinned_ok: bool = True) -> list[str]:
    if pinned_ok and ctx.cfg.plan.quantization != "auto":
        return [ctx.cfg.plan.quantization]
    if ctx.cfg.plan.fp8 or ctx.shards > 1:  # fp8 copies and FSDP2 shards need 16-bit weights
        return ["none"]
    return ["none", "nf4"] if ctx.device == "cuda" and ctx.env.has("bitsandbytes") else ["none"]


def _options(ctx: _Ctx) -> tuple[list[str], list[str], list[int]]:
    plan, train = ctx.cfg.plan, ctx.cfg.train
    ckpts = list(CHECKPOINTING) if plan.checkpointing == "auto" else [plan.checkpointing]
    micros = [train.micro_batch_size] if train.micro_batch_size else _divisors(train.batch_size)
    return _quant_options(ctx), ckpts, micros


def _divisors(n: int) -> list[int]:
    """Micro-batch sizes that keep the effective batch exact, largest first."""
    return [m for m in range(n, 0, -1) if n % m == 0]


def _fits(est: MemoryEstimate, budget: float | None) -> bool:
    return budget is None or est.peak_gib <= budget


def _search(ctx: _Ctx, budget: float | None) -> tuple[str, str, int, MemoryEstimate, int | None] | None:
    """16-bit before 4-bit; then, of the (checkpointing, micro-batch) pairs that fit, the one with the least
    estimated step time (`_step_cost`: GPU work, or the CPU's time to issue it when longer). For selective,
    the fewest recomputed layers that fit at each micro-batch; full before offload when they tie (offload's
    copies overlap compute but are not free)."""
    quants, ckpts, micros = _options(ctx)
    for quant in quants:
        fitting = []
        for ckpt in ckpts:
            for micro in micros:
                for layers in _layer_counts(ctx, ckpt):
                    est = _estimate(ctx, quant, ckpt, micro, layers=layers)
                    if _fits(est, budget):
                        cost = _step_cost(ctx, quant, ckpt, micro, layers)
                        fitting.append((cost, CHECKPOINTING.index(ckpt), -micro, (quant, ckpt, micro, est, layers)))
                        break  # more recomputed layers only cost more
        if fitting:
            fitting.sort(key=lambda f: f[:3])
            if len(fitting) > 1:
                cost, _, _, (_, ckpt, micro, _, layers) = fitting[1]
                ctx.runner_up = (cost, ckpt, micro, layers)
            return fitting[0][3]
    return None


def _layer_counts(ctx: _Ctx, ckpt: str) -> list[int | None]:
    """selective tries 1 .. L-1 recomputed layers unless the user pinned it (then half, the old meaning)."""
    if ckpt != "selective" or ctx.cfg.plan.checkpointing == "selective":
        return [None]
    return list(range(1, ctx.spec.layers))


def _step_cost(ctx: _Ctx, quant: str, ckpt: str, micro: int, layers: int | None) -> float:
    """Estimated seconds of a step, to rank the plans that fit (plan/speed.py's step_seconds)."""
    card = find_card(ctx.gpu.name, ctx.gpu.total_memory_gib) if ctx.gpu is not None else None
    return step_seconds(ctx.spec, seq_len=ctx.cfg.data.max_seq_len, batch=ctx.cfg.train.batch_size, micro=micro,
                        n_lora=lora_param_count(ctx.spec, ctx.cfg.lora.r, ctx.cfg.lora.targets),
                        checkpointing=ckpt, recompute_layers=layers, quant=quant, fast_path=ctx.fast_path,
                        tflops=card.tflops if card else None, tokens=_step_tokens(ctx),
                        reference=ctx.cfg.train.objective == "dpo")


def _step_tokens(ctx: _Ctx) -> int:
    """Tokens a step runs: every sequence at data.max_seq_len (both answers of a pair), or a packed step's data
    when known (step_tokens)."""
    tokens = ctx.cfg.train.batch_size * ctx.cfg.data.max_seq_len * _sequences(ctx)
    return min(tokens, ctx.step_tokens) if ctx.step_tokens else tokens


def _memory_reasons(ctx: _Ctx, quant: str, ckpt: str, micro: int, budget: float | None,
                    layers: int | None = None) -> None:
    cfg, r = ctx.cfg, ctx.reasons
    _, ckpts, micros = _options(ctx)
    over = f" > {budget:.1f} GiB" if budget is not None else ""
    if cfg.plan.quantization != "auto":
        r["quantization"] = ctx.pin("quantization", "plan.quantization", cfg.plan.quantization)
    elif quant == "none":
        r["quantization"] = "16-bit weights fit" + (f" as {ctx.shards} FSDP2 shards" if ctx.shards > 1 else "") + (
            "" if ctx.device == "cuda" else " (4-bit is used only on CUDA)")
    else:
        need = _estimate(ctx, "none", ckpts[-1], micros[-1]).peak_gib
        r["quantization"] = f"no 16-bit plan fits (the lightest needs {need:.1f} GiB{over}): 4-bit weights (QLoRA)"
    if cfg.plan.checkpointing != "auto":
        r["checkpointing"] = ctx.pin("checkpointing", "plan.checkpointing", ckpt)
    elif ckpt == "none":
        r["checkpointing"] = "every layer's activations fit: no recompute"
    else:
        r["checkpointing"] = _recompute_reason(ctx, quant, ckpt, micro, layers, budget)
    r["micro_batch_size"] = _micro_reason(ctx, quant, ckpt, micro, over, layers)


def _recompute_reason(ctx: _Ctx, quant: str, ckpt: str, micro: int, layers: int | None,
                      budget: float | None) -> str:
    """Why this much recompute: what the next lighter choice would need."""
    n, smallest = ctx.spec.layers, _options(ctx)[2][-1]
    over = f" > {budget:.1f} GiB" if budget is not None else ""
    if ckpt == "selective":
        lighter, lighter_layers = ("none", None) if not layers or layers <= 1 else ("selective", layers - 1)
        what, smallest = f"recompute {layers} of {n} decoder layers, the fewest that fit", micro
    elif ckpt == "offload" and _fits(_estimate(ctx, quant, "full", smallest), budget):
        need = _estimate(ctx, quant, "full", micro).peak_gib
        return (f"layer inputs in pinned CPU memory (copied on a side stream, overlapping compute) allow "
                f"micro-batch {micro}; keeping them on the GPU needs {need:.1f} GiB{over}")
    else:
        lighter, lighter_layers = ("selective", n - 1) if ckpt == "full" else ("full", None)
        what = "least recompute that fits"
    need = _estimate(ctx, quant, lighter, smallest, layers=lighter_layers).peak_gib
    name = lighter if lighter_layers is None else f"{lighter} on {lighter_layers} layers"
    return f"{what}: {name} needs {need:.1f} GiB{over} at micro-batch {smallest}"


def _micro_reason(ctx: _Ctx, quant: str, ckpt: str, micro: int, over: str, layers: int | None = None) -> str:
    batch = ctx.cfg.train.batch_size
    if ctx.cfg.train.micro_batch_size:
        return ctx.pin("micro_batch_size", "train.micro_batch_size", micro) + f", keeps train.batch_size {batch}"
    if micro == batch:
        return f"the whole batch of {batch} fits in one pass"
    bigger = _divisors(batch)[_divisors(batch).index(micro) - 1]
    need = _estimate(ctx, quant, ckpt, bigger, layers=layers).peak_gib
    why = f"keeps train.batch_size {batch}; micro-batch {bigger} needs {need:.1f} GiB{over}"
    if ctx.runner_up is not None:
        cost, other, other_micro, other_layers = ctx.runner_up
        this = _step_cost(ctx, quant, ckpt, micro, layers)
        named = other if other_layers is None else f"{other} on {other_layers} layers"
        why += (f"; ranked by estimated step time: this {this:.2f} s, next micro-batch {other_micro} with "
                f"{named} {cost:.2f} s")
    return why


def _usage_reason(est: MemoryEstimate, budget: float | None, budget_why: str) -> str:
    parts = est.breakdown_gib()
    detail = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if k != "peak" and v >= 0.05)
    of = f" of {budget:.1f} GiB ({budget_why})" if budget is not None else f" ({budget_why})"
    return f"predicted peak {est.peak_gib:.1f} GiB{of}; {detail}"


def _speed(ctx: _Ctx, quant: str, ckpt: str, micro: int, layers: int | None = None) -> float | None:
    if ctx.gpu is None:
        ctx.reasons["speed"] = f"no speed guess on {ctx.device}"
        return None
    card = find_card(ctx.gpu.name, ctx.gpu.total_memory_gib)
    if card is None:
        ctx.reasons["speed"] = f"no speed guess: {ctx.gpu.name} is not in ppalli/plan/gpus.py"
        return None
    seconds = _step_cost(ctx, quant, ckpt, micro, layers)
    counted = ["4-bit dequantization"] if quant != "none" else []
    if ctx.cfg.plan.deterministic:
        seconds *= DETERMINISTIC_SLOWDOWN
        counted.append(f"plan.deterministic's kernels (x{DETERMINISTIC_SLOWDOWN:g})")
    tps = _step_tokens(ctx) / seconds
    path = "fused" if ctx.fast_path else "reference"
    if host_seconds(ctx.spec, batch=ctx.cfg.train.batch_size, micro=micro) >= seconds:
        counted.append("the host's time per layer and micro-batch")
    if ctx.cfg.train.objective == "dpo":
        counted.append("DPO's reference forward")
    if ctx.step_tokens:
        counted.append(f"a step of the data's {ctx.step_tokens:,} tokens")
    also = f", counting {' and '.join(counted)}" if counted else ""
    also += "; plan.fp8's faster GEMMs not counted" if ctx.fp8 else ""
    ctx.reasons["speed"] = (f"~{tps:,.0f} tokens/s, a rough guess from {card.name}'s {card.tflops:g} TFLOP/s and "
                            f"the {path} path's measured efficiency{also}")
    return tps


# --------------------------------------------------------------------------- the plan


def make_plan(env: Environment, cfg: Config, spec: ModelSpec, *, gpu_index: int = 0, world_size: int = 1,
              longest_row: int | None = None, step_tokens: int | None = None) -> Plan:
    """Decide every choice for training `spec` as `cfg` asks on `env` (for one of `world_size` ranks, `cfg`
    holding that rank's share of the batch); raises PpalliError when nothing fits. longest_row: the data's
    longest sequence in tokens, when known (unpacked batches are padded to no more); step_tokens: the most tokens
    one step's samples hold together, when known (packed passes hold no more: collate.most_tokens)."""
    device, gpu, device_why = _device(env, cfg.plan.device, gpu_index)
    ctx = _Ctx(env=env, cfg=cfg, spec=spec, device=device, gpu=gpu)
    ctx.reasons["device"] = ctx.pin("device", "plan.device", device) if cfg.plan.device != "auto" else device_why
    ctx.precision = _precision(ctx)
    ctx.attention = attention_choice(ctx, _fast_path_blockers(ctx))
    ctx.fast_path = _fast_path(ctx)
    ctx.packing, compile_ = _packing(ctx), _compile(ctx)
    _data_rows(ctx, longest_row)
    ctx.step_tokens = step_tokens if ctx.packing else None
    repeatable = deterministic_choice(ctx)
    shards = pinned_sharding(ctx, world_size)  # may take the reference path, so before fp8's checks
    ctx.shards = shards or 1
    ctx.fp8 = fp8_choice(ctx, compile_)
    budget = _budget(ctx)
    found = _search(ctx, budget)
    if shards is None:
        found = auto_sharding(ctx, world_size, budget, found, _search)
    if found is None:
        raise no_fit(ctx, budget)  # _search fails only under a budget
    quant, ckpt, micro, est, layers = found
    _memory_reasons(ctx, quant, ckpt, micro, budget, layers)
    _step_rows(ctx, micro)
    if ctx.attention == "flash_attention_4" and not ctx.fast_path:
        ctx.reasons["attention"] += "; the reference path runs SDPA: flash-attn 4 runs in the fused layers only"
    if ctx.fp8:
        fp8_rows_note(ctx, micro * ctx.cfg.data.max_seq_len)

    ctx.reasons["memory"] = _usage_reason(est, budget, ctx.reasons.pop("budget"))
    tps = _speed(ctx, quant, ckpt, micro, layers)
    return Plan(device=device, precision=ctx.precision, attention=ctx.attention, quantization=quant,
                checkpointing=ckpt, micro_batch_size=micro, grad_accum=cfg.train.batch_size // micro,
                packing=ctx.packing, fast_path=ctx.fast_path, compile=compile_, reasons=dict(ctx.reasons),
                pinned=tuple(ctx.pinned), double_quant=cfg.plan.double_quant,
                predicted_peak_gib=round(est.peak_gib, 2), budget_gib=None if budget is None else round(budget, 2),
                est_tokens_per_s=None if tps is None else round(tps), gpu=gpu.name if gpu else None,
                pass_tokens=ctx.step_tokens,
                recompute_layers=layers, deterministic=repeatable, fp8=ctx.fp8,
                sharding="fsdp" if ctx.shards > 1 else "off")
