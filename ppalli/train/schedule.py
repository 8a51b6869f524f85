"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based, the step about to run)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup  # never 0: the first step already learns
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(total: int, *, ratio: float, steps: int) -> int:
    return steps if steps > 0 else int(math.ceil(ratio * total))


def make_scheduler(optimizer: torch.optim.Optimizer, *, total: int, warmup: int, kind: str):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=total, warmup=warmup, kind=kind))
