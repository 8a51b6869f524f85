"""Low-precision copies of the LoRA factors, made once per forward pass instead of once per use.

PEFT keeps the adapters in fp32 beside a bf16 model, and the fused blocks compute in bf16, so every forward
cast each A and B it read (and stacked [Aq; Ak; Av] and [Ag; Au] with a cat first): 9 launches of a few
microseconds a Llama decoder layer, 144 a Llama-3.2-1B forward, each for at most 8192 x 16 values
(benchmarks/count_launches.py, 2026-12-02).

A FactorCache makes all of a pass's copies with one `torch._foreach_copy_` (a few multi-tensor launches)
into one new buffer, the first time a layer of a new forward pass reads a factor. A pass starts when a fused
layer runs whose index is not above the last one's (layers run in order); a recompute inside the backward
starts none, and reads the copies of the pass it belongs to. New buffers each pass, never written in place:
a graph that still holds the last pass's copies (two forwards before one backward, as preference losses
may run) keeps them intact. Copying each pass, not each optimizer step, is what makes this safe whatever
writes the parameters: bitsandbytes' 8-bit optimizers write through raw pointers and move no version
counter. The buffers are what the per-use casts allocated anyway (every layer's cast factors stay saved
until its backward when nothing is recomputed): 22 MB for Llama-3.2-1B at r = 16.

The fused layers of the fast path set their handle's cache for the duration of their forward
(`using_factor_cache`); the blocks read it through `factor_cast` and `factor_stack`, and without one (a block
called on its own) they cast as before.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass

import torch

_CURRENT = threading.local()  # thread-local: a recompute inside backward runs on autograd's thread


@dataclass
class _Group:
    refs: tuple[weakref.ref, ...]  # the parameters, (r_i, k) each: weak, so a dropped adapter is not kept alive
    dtype: torch.dtype
    buffer: torch.Tensor | None = None  # (sum r_i, k) in dtype, made in pass `made_in`
    made_in: int = -1

    def sources(self) -> tuple | None:
        """The parameters, or None once one of them is gone."""
        found = tuple(ref() for ref in self.refs)
        return None if any(t is None for t in found) else found

    def holds(self, factors: tuple) -> bool:
        return len(factors) == len(self.refs) and all(ref() is t for ref, t in zip(self.refs, factors))


class FactorCache:
    """Compute-dtype copies of LoRA factor groups, made together once per forward pass."""

    def __init__(self):
        self._groups: dict[tuple, _Group] = {}
        self._pass = 0
        self._last_layer = -1

    def start_layer(self, index: int) -> None:
        """A fused layer's forward begins (not a recompute): a new pass when the index does not go up."""
        if index <= self._last_layer:
            self._pass += 1
        self._last_layer = index

    def get(self, factors: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """The row-stack of `factors` ((r_i, k) each, one k) in dtype: (sum r_i, k), copied in this pass."""
        key = (tuple(id(t) for t in factors), dtype)
        group = self._groups.get(key)
        if group is None or not group.holds(factors):  # the ids of dead parameters can recur
            group = self._groups[key] = _Group(tuple(weakref.ref(t) for t in factors), dtype)
        if group.made_in != self._pass:
            self._copy_stale()
        return group.buffer

    def _copy_stale(self) -> None:
        """Copy every group not yet made in this pass into one new buffer per dtype and device."""
        stale: dict[tuple, list] = {}
        for key, group in list(self._groups.items()):
            sources = group.sources()
            if sources is None:  # an adapter that was deleted: its copy goes too
                del self._groups[key]
            elif group.made_in != self._pass:
                stale.setdefault((group.dtype, sources[0].device), []).append((group, sources))
        for (dtype, device), items in stale.items():
            flat = torch.empty(sum(t.numel() for _, src in items for t in src), dtype=dtype, device=device)
            dst, src, at = [], [], 0
            for group, sources in items:
                size = sum(t.numel() for t in sources)
                group.buffer = flat[at:at + size].view(-1, sources[0].shape[1])  # (sum r_i, k), contiguous
                group.made_in, at = self._pass, at + size
                dst += group.buffer.split([t.shape[0] for t in sources])
                src += [t.detach() for t in sources]
            with torch.no_grad():
                torch._foreach_copy_(dst, src)

    def clear(self) -> None:
        self._groups.clear()
        self._last_layer = -1

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
    if cache is None or not isinstance(t, torch.nn.Parameter) or t.dim() != 2:
        return t.to(dtype)  # not a parameter (a test's plain tensor): a cast of its own
    return cache.get((t,), dtype)


def factor_stack(factors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """torch.cat(factors) in dtype ((sum r_i, k)), from the current cache when one is set."""
    cache = getattr(_CURRENT, "cache", None)
    if cache is None or not all(isinstance(t, torch.nn.Parameter) and t.dim() == 2 for t in factors):
        stacked = factors[0] if len(factors) == 1 else torch.cat(factors)
        return stacked if stacked.dtype == dtype else stacked.to(dtype)
    return cache.get(tuple(factors), dtype)
