"""plan.sharding for runs of N > 1 processes: the whole model on every rank (data parallel), or its frozen 16-bit
base weights spread over the ranks by FSDP2 (each rank holds 1/N; a layer's weights are gathered while it runs).

The adapter is never sharded: a few MB, kept whole and in fp32 on every rank, so its gradients, optimizer state
and checkpoints are the data-parallel ones and a checkpoint resumes on any number of ranks either way
(ppalli/train/distributed.py). planner.py calls these; each writes the reason line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ppalli.errors import PpalliError
from ppalli.plan.memory import GIB, sharded_weight_bytes, weight_bytes

if TYPE_CHECKING:
    from ppalli.plan.planner import _Ctx

FAST_PATH_WHY = ("reference PyTorch path: the fused blocks are not built for FSDP2's sharded weights (they "
                 "lay q/k/v out in one tensor and keep weight copies across a layer's forward and backward)")


def _fsdp_problems(ctx: _Ctx) -> list[str]:
    plan = ctx.cfg.plan
    checks = [
        (plan.quantization not in ("nf4", "fp4"), f"plan.quantization={plan.quantization}: 4-bit weights are not "
                                                   "sharded (set plan.quantization=none or plan.sharding=off)"),
        (not plan.fp8, "plan.fp8 runs inside the fused blocks, which a sharded run goes without"),
        (plan.fast_path != "on", "plan.fast_path=on: the fused blocks are not built for sharded weights"),
        (plan.compile != "on", "plan.compile=on: compiled layers under FSDP2 are not tested here"),
    ]
    return [why for ok, why in checks if not ok]


def pinned_sharding(ctx: _Ctx, world_size: int) -> int | None:
    """Ranks the base weights are spread over when the choice needs no memory search; None for auto with N > 1."""
    want = ctx.cfg.plan.sharding
    if world_size <= 1:
        if want == "fsdp":
            ctx.reasons["sharding"] = "plan.sharding=fsdp, but one process: nothing to shard (give --nproc N)"
        return 1
    if want == "off":
        ctx.reasons["sharding"] = ctx.pin("sharding", "plan.sharding", "off") + ": every rank holds the whole model"
        return 1
    if want == "auto":
        return None
    problems = _fsdp_problems(ctx)
    if problems:
        raise PpalliError("plan.sharding=fsdp but " + "; ".join(problems))
    _take_reference_path(ctx)
    ctx.reasons["sharding"] = (ctx.pin("sharding", "plan.sharding", "fsdp") +
                               f": {_shares(ctx, world_size)}")
    return world_size


def _take_reference_path(ctx: _Ctx) -> None:
    ctx.fast_path = False
    ctx.reasons["fast_path"] = FAST_PATH_WHY


def _shares(ctx: _Ctx, world_size: int) -> str:
    dt = 4 if ctx.precision == "fp32" else 2
    whole = weight_bytes(ctx.spec, "none", False, dt) / GIB
    mine = sharded_weight_bytes(ctx.spec, dt, world_size) / GIB
    return (f"FSDP2 over {world_size} ranks: each holds {mine:.1f} GiB of the {whole:.1f} GiB of 16-bit weights "
            "(its share, two layers gathered, embeddings and lm_head whole)")


Found = tuple  # what planner._search returns: (quant, checkpointing, micro, estimate, layers)


def auto_sharding(ctx: _Ctx, world_size: int, budget: float | None, found: Found | None,
                  search: Callable[[_Ctx, float | None], Found | None]) -> Found | None:
    """auto with N > 1 ranks: keep the whole model on each rank when it fits in 16 bits; else shard the 16-bit
    weights when the shards fit (exact weights rather than 4-bit ones); else keep what the search found."""
    if found is not None and found[0] == "none":
        ctx.reasons["sharding"] = (f"off: the whole 16-bit model fits each GPU, so each of the {world_size} ranks "
                                   "holds it (data parallel, no weight traffic)")
        return found
    problems = _fsdp_problems(ctx)
    if problems:
        ctx.reasons["sharding"] = "off: " + "; ".join(problems)
        return found
    fast_path, fast_why = ctx.fast_path, ctx.reasons.get("fast_path", "")
    ctx.shards = world_size
    _take_reference_path(ctx)
    sharded = search(ctx, budget)
    if sharded is None:
        ctx.shards, ctx.fast_path, ctx.reasons["fast_path"] = 1, fast_path, fast_why
        ctx.reasons["sharding"] = f"off: even over {world_size} ranks the 16-bit weights and activations do not fit"
        return found
    ctx.reasons["sharding"] = f"{_shares(ctx, world_size)}; the whole 16-bit model does not fit one GPU"
    return sharded
