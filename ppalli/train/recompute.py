"""Activation recompute per decoder layer: none, selective, full, or CPU-offloaded.

ppalli wraps each decoder layer's `forward` on the instance (logged, reversible) instead of using HF's
gradient-checkpointing flags: transformers moved where those hooks live between 5.17 (`__call__`) and
5.24 (class `forward`), and an instance-level fast-path forward would silently bypass the latter.

- selective: `torch.utils.checkpoint` (non-reentrant) on `layers` of the decoder layers, spread evenly; the
  planner picks the fewest that fit. The others keep all their activations.
- full: every layer is checkpointed: each keeps only its input.
- offload: every layer, and the layer input itself lives in pinned CPU memory until backward (Unsloth's
  default "unsloth" mode works this way; BENCHMARKS.md: 17.8 GiB vs HF's 31.4 at 8B 4x2048). Unsloth copies
  on the compute stream, so the GPU waits for every copy; here the copies run on a side stream: the input
  goes out while the layer computes, and the layer below's input comes back while this one's backward runs.

Every recompute runs under `kernels._utils.recomputing()`: its outputs are thrown away, so the fused MLP
skips the down projection's GEMM (only the tensors it saves are needed). Each wrapped call also carries a
stash from its forward to its recompute (`recompute_stash`): the MLP keeps down's (N, r) x A^T there, so the
recompute skips the activation kernel as well.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache

from ppalli.kernels._utils import recompute_stash, recomputing

log = logging.getLogger("ppalli")

MODES = ("none", "selective", "full", "offload")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The repeated decoder blocks: the ModuleList whose length is the config's layer count."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n):
            return m
    raise ValueError(f"{type(model).__name__}: no decoder layer list found")


def selected_layers(n_layers: int, count: int) -> list[int]:
    """`count` layer indices out of `n_layers`, spread evenly (count = n/2 gives every other layer)."""
    count = max(0, min(count, n_layers))
    return sorted({i * n_layers // count for i in range(count)}) if count else []


class _Chain:
    """The offloaded layers of one model in forward order, so a layer's backward can prefetch the one below."""

    def __init__(self):
        self.stream: torch.cuda.Stream | None = None
        self.last = None  # the ctx of the layer that ran forward last

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream


def _to_cpu(ctx, hidden: torch.Tensor) -> None:
    """Start copying `hidden` (N.., d) to pinned CPU memory on the side stream; the compute stream goes on."""
    if hidden.device.type != "cuda":
        ctx.cpu_hidden = hidden.detach().clone()
        return
    side = ctx.chain.side_stream(hidden.device)
    ctx.cpu_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)  # host cache reuses these
    side.wait_stream(torch.cuda.current_stream(hidden.device))  # hidden is complete
    with torch.cuda.stream(side):
        ctx.cpu_hidden.copy_(hidden.detach(), non_blocking=True)
    hidden.record_stream(side)  # the allocator keeps hidden's memory until the copy has read it


def _prefetch(ctx) -> None:
    """Start bringing ctx's input back to the GPU on the side stream (no-op when already started)."""
    if ctx.gpu_hidden is not None or ctx.cpu_hidden is None:
        return
    if ctx.device.type != "cuda":
        ctx.gpu_hidden = ctx.cpu_hidden
        return
    main = torch.cuda.current_stream(ctx.device)
    side = ctx.chain.side_stream(ctx.device)
    ctx.gpu_hidden = torch.empty(ctx.cpu_hidden.shape, dtype=ctx.cpu_hidden.dtype, device=ctx.device)
    side.wait_stream(main)  # the new block may be memory the compute stream was still using
    with torch.cuda.stream(side):
        ctx.gpu_hidden.copy_(ctx.cpu_hidden, non_blocking=True)
        ctx.ready = torch.cuda.Event()
        ctx.ready.record(side)


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run `fn(hidden)` without saving activations; keep `hidden` on the CPU until backward recomputes.

    `anchor` is an empty tensor that requires grad: the first layer's input (the frozen embedding's output)
    does not, and the adapter weights inside `fn` are not inputs here, so without it the output would not
    require grad and no backward would run."""

    @staticmethod
    def forward(ctx, hidden, anchor, fn, chain, first):
        ctx.fn, ctx.chain, ctx.device = fn, chain, hidden.device
        ctx.gpu_hidden, ctx.ready = None, None
        ctx.below = None if first else chain.last  # the layer under this one in the same forward pass
        chain.last = ctx
        _to_cpu(ctx, hidden)
        with torch.no_grad():
            return fn(hidden)

    @staticmethod
    def backward(ctx, grad_out):
        _prefetch(ctx)  # already running when the layer above prefetched it
        if ctx.ready is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.ready)
        need_hidden = ctx.needs_input_grad[0]
        hidden = ctx.gpu_hidden.detach().requires_grad_(need_hidden)
        ctx.gpu_hidden = ctx.cpu_hidden = None
        if ctx.below is not None:
            _prefetch(ctx.below)  # overlaps this layer's recompute and backward
            ctx.below = None
        with torch.enable_grad():
            out = ctx.fn(hidden)
        torch.autograd.backward(out, grad_out)
        return hidden.grad if need_hidden else None, None, None, None, None


# What HF passes a decoder layer its KV cache as: `past_key_values` (transformers 5.17), `cache` (5.24)
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")


def _without_cache(kwargs: dict) -> dict:
    """The layer's keyword arguments with any KV cache dropped. A model called with use_cache=True (ppalli's
    loader turns it off; a caller may not) would have the recompute add the layer's keys and values to the
    cache a second time and attend over both copies: LoRA k/v gradients 100% off in offload mode (tiny Llama,
    2026-12-04). HF turns the cache off under its own checkpointing for the same reason; training reads none."""
    drop = [k for k in _CACHE_KWARGS if isinstance(kwargs.get(k), Cache)]
    return {k: (None if k in drop else v) for k, v in kwargs.items()} if drop else kwargs


def _wrap(layer, forward, mode: str, chain: _Chain | None, first: bool):
    @functools.wraps(forward)
    def wrapped(hidden_states, *args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()):
            return forward(hidden_states, *args, **kwargs)
        kwargs = _without_cache(kwargs)
        is_tuple = []
        calls = [0]
        stash = {}  # this call's, shared by its forward and its recompute (kernels._utils.recompute_stash)

        def fn(h):  # decoder layers return a tensor (transformers 5.x) or a 1-tuple (older code)
            calls[0] += 1
            with recomputing(calls[0] > 1), recompute_stash(stash):  # the first call is the forward
                out = forward(h, *args, **kwargs)
            is_tuple.append(isinstance(out, tuple))
            return out[0] if isinstance(out, tuple) else out

        if mode == "offload":
            anchor = torch.empty(0, device=hidden_states.device, requires_grad=True)
            out = _OffloadedCheckpoint.apply(hidden_states, anchor, fn, chain, first)
        else:
            out = checkpoint(fn, hidden_states, use_reentrant=False)
        return (out,) if is_tuple and is_tuple[0] else out

    wrapped._ppalli_recompute = forward  # the forward to restore
    return wrapped


def apply_recompute(model, mode: str, layers: int | None = None) -> int:
    """Set the recompute mode on the decoder layers (undoing any earlier mode first). Returns layers wrapped.

    layers: for "selective", how many layers recompute (default: half of them, every other layer)."""
    if mode not in MODES:
        raise ValueError(f"checkpointing mode {mode!r}: expected one of {MODES}")
    remove_recompute(model)
    if mode == "none":
        return 0
    blocks = decoder_layers(model)
    n = len(blocks)
    chosen = selected_layers(n, n // 2 if layers is None else layers) if mode == "selective" else range(n)
    chain = _Chain() if mode == "offload" else None
    for k, i in enumerate(chosen):
        blocks[i].forward = _wrap(blocks[i], blocks[i].forward, mode, chain, first=k == 0)
    log.info("recompute: %s on %d of %d decoder layers", mode, len(chosen), n)
    return len(chosen)


def remove_recompute(model) -> None:
    for layer in decoder_layers(model):
        orig = getattr(layer.forward, "_ppalli_recompute", None)
        if orig is None:
            continue
        if getattr(orig, "__self__", None) is layer and orig.__func__ is type(layer).forward:
            del layer.forward  # back to the class's own forward
        else:
            layer.forward = orig
