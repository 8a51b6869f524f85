"""The projections a decode layer multiplies by: 16/32-bit weights (stacked into one GEMM a group), bitsandbytes
4-bit weights (kernels/nf4_linear.py, no 16-bit copy), each with an unmerged LoRA adapter or without.

A group is the projections that read one input, in output order: (q, k, v), (o,), (gate, up), (down,), or
Phi-3's fused (qkv_proj,) and (gate_up_proj,). Its output (M, sum out) is what HF's separate projections would
give side by side. An adapter's branch s (x A^T) B^T runs as one GEMM over the group's stacked, pre-scaled
factors [s_q A_q; s_k A_k; ...] (the input read once) and then

- 16/32-bit bases: one addmm_ of that (M, sum r) product with the block-diagonal (sum out, sum r) B into the
  stacked GEMM's output (the zeros cost ~1 MB of reads a Llama-3.1-8B layer, against ~400 MB of weights);
- 4-bit bases: inside each projection's nf4_linear launch, which also writes into its column slice.

The factors are copied into the activations' dtype when the swap starts (a few MB) and dropped when it ends;
an adapter changed while decoding is not seen (decoding runs under inference_mode with frozen weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ppalli.kernels.lora_linear import _is_4bit, lora_parts, lora_problem, stacked_base_weight
from ppalli.kernels.nf4_linear import nf4_linear, nf4_linear_problem


def plain_linear(module) -> bool:
    """An nn.Linear the decode layers may multiply by directly: 16/32-bit weights held as plain tensors (not
    sharded DTensors, 4/8-bit or fp8 subclasses, nor offloaded to meta) and no instance forward (accelerate's
    hooks, which the direct GEMMs would skip)."""
    if type(module) is not nn.Linear or "forward" in module.__dict__:
        return False
    w = module.weight
    return type(w.data) is torch.Tensor and not w.is_meta and w.is_floating_point() and w.element_size() >= 2


def _four_bit(module) -> bool:
    """A bitsandbytes Linear4bit whose weight nf4_linear reads as it is stored."""
    w = getattr(module, "weight", None)
    qs = getattr(w, "quant_state", None)
    return ("forward" not in module.__dict__ and qs is not None and _is_4bit(module)
            and nf4_linear_problem(w.data, qs) is None)


def base_of(module: nn.Module) -> nn.Module:
    """The layer whose weight the projection multiplies by: PEFT's base layer, or the module itself."""
    return module.get_base_layer() if hasattr(module, "lora_A") else module


def proj_problem(module: nn.Module | None) -> str | None:
    """Why the decode layers cannot run this projection, or None."""
    if module is None:
        return "missing"
    if hasattr(module, "lora_A"):
        if "forward" in module.__dict__:
            return "its LoRA layer has an instance forward (hooks)"
        if not module.merged and (why := lora_problem(module)) is not None:
            return f"LoRA: {why}"
    base = base_of(module)
    if not (plain_linear(base) or _four_bit(base)):
        return ("not a plain 16/32-bit nn.Linear nor a bitsandbytes 4-bit one in its stored layout (an 8-bit, "
                "fp8, sharded or offloaded base, or accelerate's hooks)")
    return None


def _adapter(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A (r, in), B (out, r), s) of the projection's one active, unmerged adapter, or None."""
    if not hasattr(module, "lora_A") or module.merged:
        return None
    parts = lora_parts(module, checked=True)
    return None if parts.a is None else (parts.a, parts.b, parts.scaling)


class ProjGroup:
    """Projections over one input (see the module docstring); call it on x (M, in) -> (M, sum out)."""

    def __init__(self, mods: list[nn.Module], dtype: torch.dtype):
        self.bases = [base_of(m) for m in mods]
        self.four_bit = _four_bit(self.bases[0])
        self.sizes = [b.out_features for b in self.bases]
        biases = [b.bias for b in self.bases]
        self.biases = [None if b is None else b.detach().to(dtype) for b in biases]
        self.bias = None if biases[0] is None else torch.cat(self.biases) if len(biases) > 1 else self.biases[0]
        adapters = [_adapter(m) for m in mods]
        self.a_stack, self.b_diag, self.lora = None, None, [None] * len(mods)  # lora[i]: (xa columns, B)
        if any(a is not None for a in adapters):
            self._factors(adapters, dtype)

    @torch.no_grad()
    def _factors(self, adapters, dtype: torch.dtype) -> None:
        present = [ad for ad in adapters if ad is not None]
        self.a_stack = torch.cat([ad[0].detach().float() * ad[2] for ad in present]).to(dtype)  # (sum r, in)
        rank = self.a_stack.shape[0]
        self.b_diag = self.a_stack.new_zeros(sum(self.sizes), rank)  # (sum out, sum r)
        row = col = 0
        for i, (ad, n) in enumerate(zip(adapters, self.sizes)):
            if ad is not None:
                r = ad[1].shape[1]
                self.b_diag[row:row + n, col:col + r] = ad[1].detach()
                self.lora[i] = (slice(col, col + r), self.b_diag[row:row + n, col:col + r].contiguous())
                col += r
            row += n

    @staticmethod
    def problem(mods: list[nn.Module]) -> str | None:
        """Why these projections cannot run as one group (each alone may), or None."""
        bases = [base_of(m) for m in mods]
        if len({_four_bit(b) for b in bases}) > 1:
            return "4-bit and 16-bit bases in one group"
        if len({b.bias is None for b in bases}) > 1:
            return "biases on some of the group only"
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xa = None if self.a_stack is None else x @ self.a_stack.t()  # (M, sum r), scaled
        if self.four_bit:
            return self._four_bit(x, xa)
        stacked = self.bases[0].weight if len(self.bases) == 1 else stacked_base_weight(self.bases, x.dtype)
        if stacked is not None:
            y = F.linear(x, stacked, self.bias)
        else:  # weights not stacked (mixed dtypes): one GEMM each
            y = torch.cat([F.linear(x, b.weight, bias) for b, bias in zip(self.bases, self.biases)], dim=-1)
        return y if xa is None else y.addmm_(xa, self.b_diag.t())

    def _four_bit(self, x: torch.Tensor, xa: torch.Tensor | None) -> torch.Tensor:
        y = x.new_empty(x.shape[0], sum(self.sizes))
        col = 0
        for base, bias, n, lora in zip(self.bases, self.biases, self.sizes, self.lora):
            w = base.weight
            xa_i, b_i = (None, None) if lora is None else (xa[:, lora[0]], lora[1])
            nf4_linear(x, w.data, w.quant_state, bias, xa_i, b_i, out=y[:, col:col + n])
            col += n
        return y
