"""When no plan fits the memory budget: the error that says what the lightest plan needs and what would fit
(unpinned choices, a larger budget, 4-bit weights, a shorter data.max_seq_len, a smaller model).
planner.py raises it; the searches are planner.py's own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ppalli.errors import PpalliError
from ppalli.plan.memory import GIB

if TYPE_CHECKING:
    from ppalli.plan.planner import _Ctx


def _lightest_fit(ctx: _Ctx, budget: float, seq_len: int | None = None,
                  keep_pins: bool = True) -> tuple[str, str] | None:
    """(quantization, checkpointing) of the first plan at the smallest micro-batch that fits."""
    from ppalli.plan.planner import CHECKPOINTING, _estimate, _fits, _options, _quant_options

    quants, ckpts, micros = _options(ctx)
    if not keep_pins:
        quants, ckpts, micros = _quant_options(ctx, pinned_ok=False), CHECKPOINTING, [1]
    for quant in quants:
        for ckpt in ckpts:
            if _fits(_estimate(ctx, quant, ckpt, micros[-1], seq_len), budget):
                return quant, ckpt
    return None


def _weights_word(quant: str) -> str:
    return "16-bit" if quant == "none" else quant


def _shorter_seq(ctx: _Ctx, budget: float) -> str | None:
    seq = ctx.cfg.data.max_seq_len // 2
    while seq >= 128:
        found = _lightest_fit(ctx, budget, seq)
        if found:
            return f"data.max_seq_len={seq} ({_weights_word(found[0])} weights, {found[1]} checkpointing)"
        seq //= 2
    return None


def _fit_ideas(ctx: _Ctx, budget: float, weights_gib: float) -> list[str]:
    cfg = ctx.cfg
    pins = [key for key, pinned in (("plan.quantization", cfg.plan.quantization != "auto"),
                                    ("plan.checkpointing", cfg.plan.checkpointing != "auto"),
                                    ("train.micro_batch_size", cfg.train.micro_batch_size is not None)) if pinned]
    ideas = []
    unpinned = _lightest_fit(ctx, budget, keep_pins=False) if pins else None
    if unpinned:
        ideas.append(f"{_weights_word(unpinned[0])} weights with {unpinned[1]} checkpointing at micro-batch 1 "
                     f"(unpin {', '.join(pins)})")
    if cfg.plan.memory_budget_gib is not None and ctx.gpu is not None:
        ideas.append(f"a larger plan.memory_budget_gib (the GPU has {ctx.gpu.total_memory_gib:.1f} GiB)")
    if cfg.plan.fp8:
        copies = 2 * ctx.spec.quantizable_params / GIB
        ideas.append(f"plan.fp8: false (its e4m3 copies of the weights take {copies:.1f} GiB, and it rules out 4-bit "
                     "weights)")
    if ctx.device == "cuda" and not ctx.env.has("bitsandbytes"):
        ideas.append("4-bit weights (QLoRA) once bitsandbytes is installed (pip install bitsandbytes)")
    shorter = _shorter_seq(ctx, budget)
    smaller = f"a smaller model (these weights alone take {weights_gib:.1f} GiB)"
    return ideas + ([shorter] if shorter else []) + [smaller]


def no_fit(ctx: _Ctx, budget: float) -> PpalliError:
    """The error for a budget nothing fits: the lightest plan tried, what it needs, and what would fit."""
    from ppalli.plan.planner import _estimate, _options

    quants, ckpts, _ = _options(ctx)
    micro = ctx.cfg.train.micro_batch_size or 1
    est = _estimate(ctx, quants[-1], ckpts[-1], micro)
    ideas = _fit_ideas(ctx, budget, est.weights / GIB)
    where = ctx.gpu.name if ctx.gpu else ctx.device
    return PpalliError(
        f"nothing fits the {budget:.1f} GiB budget on {where}: the lightest plan tried ({_weights_word(quants[-1])} "
        f"weights, {ckpts[-1]} checkpointing, micro-batch {micro}, max_seq_len {ctx.cfg.data.max_seq_len}) needs "
        f"{est.peak_gib:.1f} GiB; what would fit: {'; '.join(ideas)}")
