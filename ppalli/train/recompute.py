"""Activation recompute per decoder layer: none, selective, full, or CPU-offloaded.

ppalli wraps each decoder layer's `forward` on the instance (logged, reversible) instead of using HF's
gradient-checkpointing flags: transformers moved where those hooks live between 5.17 (`__call__`) and
5.24 (class `forward`), and an instance-level fast-path forward would silently bypass the latter.

- full: `torch.utils.checkpoint` (non-reentrant) on every layer: each layer keeps only its input.
- selective: every other layer, about half the activation memory for about half the recompute.
- offload: every layer, and the layer input itself lives in pinned CPU memory until backward
  (Unsloth's default "unsloth" mode works this way; BENCHMARKS.md: 17.8 GiB vs HF's 31.4 at 8B 4x2048).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint

log = logging.getLogger("ppalli")

MODES = ("none", "selective", "full", "offload")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The repeated decoder blocks: the ModuleList whose length is the config's layer count."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n):
            return m
    raise ValueError(f"{type(model).__name__}: no decoder layer list found")


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run `fn(hidden)` without saving activations; keep `hidden` on the CPU until backward recomputes."""

    @staticmethod
    def forward(ctx, hidden, fn):
        ctx.fn = fn
        ctx.device = hidden.device
        ctx.cpu_hidden = hidden.detach().to("cpu", non_blocking=True,
                                            memory_format=torch.contiguous_format)
        if ctx.cpu_hidden.device != hidden.device and hidden.device.type == "cuda":
            ctx.cpu_hidden = ctx.cpu_hidden.pin_memory()
        with torch.no_grad():
            return fn(hidden)

    @staticmethod
    def backward(ctx, grad_out):
        hidden = ctx.cpu_hidden.to(ctx.device, non_blocking=True).requires_grad_(True)
        with torch.enable_grad():
            out = ctx.fn(hidden)
        torch.autograd.backward(out, grad_out)
        return hidden.grad, None


def _wrap(layer, forward, mode: str):
    @functools.wraps(forward)
    def wrapped(hidden_states, *args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()):
            return forward(hidden_states, *args, **kwargs)
        is_tuple = []

        def fn(h):  # decoder layers return a tensor (transformers 5.x) or a 1-tuple (older code)
            out = forward(h, *args, **kwargs)
            is_tuple.append(isinstance(out, tuple))
            return out[0] if isinstance(out, tuple) else out

        if mode == "offload":
            out = _OffloadedCheckpoint.apply(hidden_states, fn)
        else:
            out = checkpoint(fn, hidden_states, use_reentrant=False)
        return (out,) if is_tuple and is_tuple[0] else out

    wrapped._ppalli_recompute = forward  # the forward to restore
    return wrapped


def apply_recompute(model, mode: str) -> int:
    """Set the recompute mode on every decoder layer (undoing any earlier mode first). Returns layers wrapped."""
    if mode not in MODES:
        raise ValueError(f"checkpointing mode {mode!r}: expected one of {MODES}")
    remove_recompute(model)
    if mode == "none":
        return 0
    wrapped = 0
    for i, layer in enumerate(decoder_layers(model)):
        if mode == "selective" and i % 2:
            continue
        layer.forward = _wrap(layer, layer.forward, mode)
        wrapped += 1
    log.info("recompute: %s on %d decoder layers", mode, wrapped)
    return wrapped


def remove_recompute(model) -> None:
    for layer in decoder_layers(model):
        orig = getattr(layer.forward, "_ppalli_recompute", None)
        if orig is None:
            continue
        if getattr(orig, "__self__", None) is layer and orig.__func__ is type(layer).forward:
            del layer.forward  # back to the class's own forward
        else:
            layer.forward = orig
