"""Bit-repeatable training (plan.deterministic): the same seed, GPU model and software give the same losses
and the same adapter, bit for bit.

By default three things sum in an order that varies from run to run: the attention backward (dq accumulated
across key blocks, in cuDNN's kernel and in flash's), the LoRA B gradient of lora_b_bwd (atomic adds), and
cuBLAS when several streams share one workspace. torch.use_deterministic_algorithms(True) is the one switch
all of them read: torch's SDPA dispatch then skips cuDNN, flash's backward takes its repeatable path, the fast
path's `resolve_backend` picks flash itself, `lora_linear.lora_bwd` runs two GEMMs instead of the atomic
kernel, and torch asks for a fixed cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG). On an H200 (2026-12-03,
results/2026-12-03-h200-determinism.txt) flash's GQA forward + backward was bit-repeatable in that mode and
took 2.45 ms at Llama-3.2-1B's layer shape (8 x 2048 tokens) against cuDNN's 1.44 (8B: 2.34 against 1.13);
cuDNN refuses the mode outright.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# torch refuses cuBLAS calls in deterministic mode unless the workspace is fixed this way (or ":16:8")
CUBLAS_WORKSPACE = ":4096:8"


def set_deterministic(on: bool) -> tuple[bool, bool]:
    """torch's deterministic algorithms on or off for the process (on: CUBLAS_WORKSPACE_CONFIG set to
    CUBLAS_WORKSPACE first where the user set nothing) -> the previous (mode, warn_only), for restoring."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(on)
    return before


@contextlib.contextmanager
def deterministic(on: bool) -> Iterator[None]:
    """Inside the block, torch's deterministic algorithms are on when `on`; the previous mode is restored
    after. Off changes nothing (a mode the caller set stays)."""
    if not on:
        yield
        return
    before, warn_only = set_deterministic(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
