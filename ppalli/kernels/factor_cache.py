"""Low-precision copies of the LoRA factors, made once per optimizer step instead of once per use.

PEFT keeps the adapters in fp32 beside a bf16 model, and the fused blocks compute in bf16, so every forward
cast each A and B it read (and stacked [Aq; Ak; Av] and [Ag; Au] with a cat first): 9 launches of a few
microseconds a Llama decoder layer, 144 a Llama-3.2-1B step, each for a tensor of at most 8192 x 16
values (abtest counts of one step, 2026-12-02). The values only change when the optimizer steps.

A FactorCache keeps one bf16 buffer per factor group (a single factor, or a row-stack of the A factors over
one input) and refreshes every stale group with one `torch._foreach_copy_` (a few multi-tensor launches for
all of them) the first time a forward reads a group whose fp32 parameters changed: a parameter's `_version`
counter moves with each in-place write (the optimizer's step, load_state_dict's copy_), and its data pointer
with `.data =`. The buffers hold what the per-use casts held for the backward anyway (every layer's cast
factors stay saved until its backward when nothing is recomputed): 22 MB for Llama-3.2-1B at r = 16.

The fused layers of the fast path set their handle's cache for the duration of their forward
(`using_factor_cache`); the blocks read it through `factor_cast` and `factor_stack`, and without one (a block
called on its own) they cast as before. A graph built before an optimizer step whose backward runs after it
fails with autograd's in-place error, as it would for the parameters themselves.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

_CURRENT = threading.local()  # thread-local: a recompute inside backward runs on autograd's thread


@dataclass
class _Group:
    sources: tuple[torch.Tensor, ...]  # the parameters, (r_i, k) each
    buffer: torch.Tensor  # (sum r_i, k) in the compute dtype
    views: tuple[torch.Tensor, ...]  # the buffer's row slices, one per source
    stamps: tuple | None  # (version, data pointer) of each source when last copied; None: never copied

    def current(self) -> tuple:
        return tuple((t._version, t.data_ptr()) for t in self.sources)


class FactorCache:
    """Compute-dtype copies of LoRA factor groups, refreshed together when their parameters change."""

    def __init__(self):
        self._groups: dict[tuple, _Group] = {}

    def get(self, factors: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """The row-stack of `factors` ((r_i, k) each, one k) in dtype: (sum r_i, k), up to date."""
        key = (tuple(id(t) for t in factors), dtype)
        group = self._groups.get(key)
        if group is None or any(s is not t for s, t in zip(group.sources, factors)) or \
                group.buffer.shape[1] != factors[0].shape[1]:
            group = self._groups[key] = self._new_group(factors, dtype)
        if group.stamps != group.current():
            self.refresh()
        return group.buffer

    def refresh(self) -> None:
        """Copy every stale group from its parameters: one multi-tensor copy for all of them."""
        dst, src, fresh = [], [], []
        for group in self._groups.values():
            stamps = group.current()
            if stamps != group.stamps:
                dst += group.views
                src += group.sources
                fresh.append((group, stamps))
        if not dst:
            return
        with torch.no_grad():
            torch._foreach_copy_(dst, [t.detach() for t in src])
        for group, stamps in fresh:
            group.stamps = stamps

    def clear(self) -> None:
        self._groups.clear()

    @staticmethod
    def _new_group(factors, dtype) -> _Group:
        rows = [t.shape[0] for t in factors]
        buffer = torch.empty(sum(rows), factors[0].shape[1], dtype=dtype, device=factors[0].device)
        views = tuple(buffer.split(rows))
        return _Group(tuple(factors), buffer, views, None)

    def __len__(self) -> int:
        return len(self._groups)


@contextlib.contextmanager
def using_factor_cache(cache: FactorCache | None):
    """Make `cache` the one the fused blocks read factors through for this block (nesting restores)."""
    before = getattr(_CURRENT, "cache", None)
    _CURRENT.cache = cache
    try:
        yield
    finally:
        _CURRENT.cache = before


def factor_cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A LoRA factor (r, k) or (k, r) in dtype: the current cache's copy when one is set and a cast is needed."""
    if t is None or t.dtype == dtype:
        return t
    cache = getattr(_CURRENT, "cache", None)
    if cache is None or not isinstance(t, torch.nn.Parameter):
        return t.to(dtype)  # not a parameter (a test's plain tensor): only a parameter's changes are tracked
    return cache.get((t,), dtype)


def factor_stack(factors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """torch.cat(factors) in dtype ((sum r_i, k)), from the current cache when one is set."""
    cache = getattr(_CURRENT, "cache", None)
    if cache is None or not all(isinstance(t, torch.nn.Parameter) for t in factors):
        stacked = factors[0] if len(factors) == 1 else torch.cat(factors)
        return stacked if stacked.dtype == dtype else stacked.to(dtype)
    return cache.get(tuple(factors), dtype)
