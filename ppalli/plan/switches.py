"""The plan's switches that change which kernels run and the numbers they compute: bit-repeatable
kernels (plan.deterministic) and fp8 base GEMMs (plan.fp8). Each is the user's call; the planner checks it
against the machine and the other choices, and gives the reason line (ppalli/plan/planner.py calls these)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ppalli.errors import PpalliError

if TYPE_CHECKING:
    from ppalli.plan.planner import _Ctx

# Families whose HF class has no SDPA attention: the reference path runs HF's eager attention (quadratic in
# the sequence); the fused path runs their attention itself (Gemma-2's softcap: flex_attention on a GPU).
NO_SDPA_FAMILIES = ("gemma2",)  # models/load.py supported_attention reads the class; this is what it finds


def deterministic_choice(ctx: _Ctx) -> bool:
    """plan.deterministic is the user's call (it costs speed): here only its reason, for the GPU it runs on."""
    if not ctx.cfg.plan.deterministic:
        ctx.reasons["deterministic"] = "off: the fastest kernels; plan.deterministic=true for bit-repeatable reruns"
        if ctx.device == "cuda":
            ctx.reasons["deterministic"] += (" (the attention backward and the LoRA B gradients' atomic adds sum "
                                             "in a varying order: reruns differ in the last bits)")
        return False
    what = "torch deterministic algorithms, LoRA B gradients by GEMMs"
    if ctx.device == "cuda":
        what += ("; attention: SDPA flash, whose backward is repeatable in that mode (cuDNN's is not; flash took "
                 "2.45 ms against cuDNN's 1.44 for a Llama-3.2-1B layer's forward + backward on an H200)")
        if ctx.attention in ("flash_attention_2", "flash_attention_3", "flash_attention_4"):
            what += f"; {ctx.attention} runs with deterministic=True"
        elif ctx.spec.family in NO_SDPA_FAMILIES:
            what += "; the softcapped attention runs eagerly, not in flex_attention ((T, T) scores held)"
    ctx.reasons["deterministic"] = ctx.pin("deterministic", "plan.deterministic", True) + ": " + what
    return True


def fp8_choice(ctx: _Ctx, compiled: bool) -> bool:
    """plan.fp8 is the user's call (it changes the numbers): checked against the GPU, path and precision."""
    if not ctx.cfg.plan.fp8:
        ctx.reasons["fp8"] = "off: base GEMMs in " + ctx.precision
        if ctx.gpu is not None and ctx.gpu.capability >= (9, 0) and ctx.fast_path:
            ctx.reasons["fp8"] += ("; plan.fp8=true runs them in e4m3 (~1.6-1.8x on those GEMMs on an H200; losses "
                                   "then drift from the reference path's)")
        return False
    problems = []
    if not ctx.fast_path:
        problems.append("it runs inside the fused blocks, and the plan takes the reference path "
                        f"({ctx.reasons.get('fast_path', '')})")
    if ctx.device == "cuda" and (ctx.gpu is None or ctx.gpu.capability < (9, 0)):
        cap = ".".join(map(str, ctx.gpu.capability)) if ctx.gpu is not None else "unknown"
        problems.append(f"row-wise fp8 GEMMs need compute capability 9.0+ (Hopper), this GPU has {cap}")
    if ctx.device == "cuda" and ctx.precision != "bf16":
        problems.append(f"the fp8 GEMMs write bf16 and the plan's precision is {ctx.precision}")
    if ctx.cfg.plan.quantization in ("nf4", "fp4"):
        problems.append(f"plan.quantization={ctx.cfg.plan.quantization}: fp8 copies are made from 16-bit weights")
    if compiled:
        problems.append("plan.compile=on: compiled layers find no fp8 copies (they are looked up by data pointer, "
                        "which a trace does not have) and would run bf16")
    if problems:
        raise PpalliError("plan.fp8=true cannot run: " + "; ".join(problems) + ". Set plan.fp8: false")
    where = "" if ctx.device == "cuda" else f" (on {ctx.device}: same numbers, no speed-up; for checking)"
    ctx.reasons["fp8"] = ctx.pin("fp8", "plan.fp8", True) + (
        ": the decoder layers' base GEMMs in e4m3 with per-row scales, products in bf16; two e4m3 copies of those "
        "weights held (counted in memory)" + where)
    return True


def fp8_rows_note(ctx: _Ctx, tokens: int) -> None:
    """Say so when a micro-batch is too short for fp8 GEMMs to run at all (kernels/fp8.py FP8_MIN_ROWS)."""
    from ppalli.kernels.fp8 import FP8_MIN_ROWS  # the kernels' module only when fp8 was asked for

    if tokens < FP8_MIN_ROWS:
        ctx.reasons["fp8"] += (f"; but a micro-batch holds at most {tokens} tokens, and GEMMs over fewer than "
                               f"{FP8_MIN_ROWS} stay bf16 (quantizing would cost what fp8 saves)")
