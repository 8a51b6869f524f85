"""Out-of-memory: recognise it (also when CUDA reports it as something else), explain it, and step down the plan.

Users see OOM after 30 minutes as `CUDA error: unknown error` or `CUBLAS_STATUS_EXECUTION_FAILED` (DESIGN.md):
cuBLAS fails to get its workspace and reports the launch failure instead. Both are treated as probable OOM.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator

from ppalli.plan.memory import CHECKPOINTING
from ppalli.plan.planner import Plan

OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")
PROBABLE_OOM_MESSAGES = ("cublas_status_execution_failed", "cuda error: unknown error")

# (pattern in the message, what it most likely means, what to do); first match wins.
EXPLANATIONS = (
    ("out of memory", "the GPU ran out of memory",
     "ppalli steps the plan down by itself; to start lower set train.micro_batch_size, plan.checkpointing=full, "
     "plan.quantization=nf4 or a shorter data.max_seq_len (`ppalli plan` shows the predicted peak)"),
    ("alloc_failed", "a cuBLAS/cuDNN workspace could not be allocated: the GPU is out of memory",
     "same as out of memory: a smaller micro-batch, more checkpointing, nf4 weights or shorter sequences"),
    ("cublas_status_execution_failed", "most likely out of memory surfacing as a failed cuBLAS launch",
     "treat it as OOM (ppalli steps down); if it repeats at a small plan, rerun with CUDA_LAUNCH_BLOCKING=1 "
     "to find the failing op"),
    ("cuda error: unknown error", "most likely out of memory, or the driver reset the GPU (long runs, overheating)",
     "treat it as OOM (ppalli steps down); if it repeats, check `nvidia-smi` and the kernel log (Xid errors)"),
    ("cublas_status_not_supported", "a bf16 matmul on a GPU without bf16 (compute capability below 8.0)",
     "keep plan.precision and model.dtype on auto (ppalli then uses fp16 there) or set plan.precision=fp16"),
    ("device-side assert", "an index out of range on the GPU: usually a token id >= the model's vocabulary "
     "(tokenizer and model do not match) or a bad label", "check that the tokenizer belongs to the model; rerun "
     "on the CPU (plan.device=cpu, data.limit=8) for a readable error"),
    ("no kernel image is available", "this torch build has no kernels for this GPU's architecture",
     "install a torch build whose CUDA arch list includes the GPU (torch.cuda.get_arch_list())"),
    ("driver version is insufficient", "the NVIDIA driver is older than torch's CUDA runtime",
     "update the driver or install a torch build for an older CUDA"),
    ("illegal memory access", "a kernel read or wrote outside its memory: a bug, possibly in a fused kernel",
     "rerun with plan.fast_path=off; if that works, please report it with the plan (RUN/plan.json)"),
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what caused it (wrappers often re-raise OOM as something else)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 10:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_torch_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # no torch imported: no torch exception can exist
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t)
    return bool(oom_types) and isinstance(exc, oom_types)


def is_oom(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError and RuntimeErrors whose message says (or probably means) OOM."""
    for e in _chain(exc):
        if _is_torch_oom(e):
            return True
        text = str(e).lower()
        if isinstance(e, RuntimeError) and any(m in text for m in OOM_MESSAGES + PROBABLE_OOM_MESSAGES):
            return True
    return False


def explain_cuda_error(exc: BaseException) -> str:
    """One line: what the error most likely means and what to do, then the original first line."""
    for e in _chain(exc):
        text = str(e)
        for pattern, meaning, fix in EXPLANATIONS:
            if pattern in text.lower():
                return f"{meaning}: {fix} (was: {_first_line(text)})"
    return (f"{type(exc).__name__}: {_first_line(str(exc))}; CUDA reports errors late, so rerun with "
            "CUDA_LAUNCH_BLOCKING=1 to see the op that failed")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no message"


def _smaller_micro(micro: int, batch: int) -> int:
    """Half the micro-batch when that still divides the batch, else the largest divisor below half."""
    return max(m for m in range(1, micro // 2 + 1) if batch % m == 0)


def step_down(plan: Plan) -> Plan | None:
    """The next plan down after an OOM, keeping the effective batch: halve the micro-batch (doubling
    accumulation) down to 1, then more checkpointing (selective, full, then offload). Choices the user pinned
    move last, and only when nothing else is left: a run that can go on smaller beats one that dies. None when
    nothing is left: the caller raises OutOfMemory with explain_cuda_error's advice."""
    for allow_pinned in (False, True):
        lower = _micro_down(plan, allow_pinned) or _recompute_up(plan, allow_pinned)
        if lower is not None:
            return lower
    return None


def _micro_down(plan: Plan, allow_pinned: bool) -> Plan | None:
    batch, micro = plan.batch_size, plan.micro_batch_size
    if micro <= 1 or ("micro_batch_size" in plan.pinned and not allow_pinned):
        return None
    new = _smaller_micro(micro, batch)
    pinned = " (pinned, but it did not fit)" if "micro_batch_size" in plan.pinned else ""
    why = (f"stepped down after OOM at micro-batch {micro}{pinned}: {new} x {batch // new} accumulation keeps "
           f"batch {batch}")
    # a packed pass capped by the data's longest step (Plan.pass_tokens) shrinks with the micro-batch too
    cap = None if plan.pass_tokens is None else max(1, plan.pass_tokens * new // micro)
    return _with(plan, "micro_batch_size", why, micro_batch_size=new, grad_accum=batch // new, pass_tokens=cap)


def _recompute_up(plan: Plan, allow_pinned: bool) -> Plan | None:
    level = CHECKPOINTING.index(plan.checkpointing)
    if level + 1 >= len(CHECKPOINTING) or ("checkpointing" in plan.pinned and not allow_pinned):
        return None
    new = CHECKPOINTING[level + 1]
    why = (f"stepped down after OOM with {plan.checkpointing} checkpointing at micro-batch "
           f"{plan.micro_batch_size}: {new}")
    stepped = _with(plan, "checkpointing", why, checkpointing=new, recompute_layers=None, est_tokens_per_s=None)
    reasons = dict(stepped.reasons, speed="more recompute after the step-down: not re-estimated")
    return dataclasses.replace(stepped, reasons=reasons)


def _with(plan: Plan, choice: str, why: str, **changes: object) -> Plan:
    was = plan.predicted_peak_gib
    memory = f"the prediction ({was} GiB) was too low: out of memory at run time" if was else "out of memory"
    reasons = dict(plan.reasons, **{choice: why, "memory": memory})
    return dataclasses.replace(plan, reasons=reasons, predicted_peak_gib=None, **changes)
