"""The q, k, v projections of attention with LoRA on each, fused, sharing one saved input.

    Q = x Wq^T + bq + sq (x Aq^T) Bq^T      (N, Hq*D)
    K = x Wk^T + bk + sk (x Ak^T) Bk^T      (N, Hk*D)
    V = x Wv^T + bv + sv (x Av^T) Bv^T      (N, Hk*D)

Saved for the backward: x (N, d) once and the three (N, r) LoRA products. Autograd through PEFT keeps x
for each of the three base layers and each lora_A (up to six references to one tensor, so the cost there
is the LoRA intermediates and the separate dx sums). The backward accumulates all six input-gradient
GEMMs into one dx buffer with addmm_:
    dx = dQ Wq + dK Wk + dV Wv + (sq dQ Bq) Aq + (sk dK Bk) Ak + (sv dV Bv) Av.
Biases (Qwen2's q/k/v) are frozen and added by the base GEMM's addmm. The o projection is a plain
`lora_linear` (re-exported here).
"""

from __future__ import annotations

import torch
from torch import nn

from ppalli.kernels.lora_linear import add_input_grad, lora_bwd, lora_fwd, lora_linear, lora_parts

__all__ = ["LoRAQKVFunction", "lora_linear", "lora_qkv"]


class LoRAQKVFunction(torch.autograd.Function):
    """Three LoRA Linears over one input; the base weights stay frozen."""

    @staticmethod
    def forward(ctx, x, qb, qa, qB, qs, kb, ka, kB, ks, vb, va, vB, vs):
        q, xaq = lora_fwd(x, qb, qa, qB, qs)  # (N, Hq*D), (N, r)
        k, xak = lora_fwd(x, kb, ka, kB, ks)  # (N, Hk*D), (N, r)
        v, xav = lora_fwd(x, vb, va, vB, vs)  # (N, Hk*D), (N, r)
        ctx.save_for_backward(x, xaq, xak, xav, qa, qB, ka, kB, va, vB)
        ctx.bases, ctx.scales = (qb, kb, vb), (qs, ks, vs)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        saved = ctx.saved_tensors  # unpacked once: non-reentrant checkpointing allows a single unpack
        x, xas, factors = saved[0], saved[1:4], saved[4:]
        need = ctx.needs_input_grad
        grads, dx = [None], None
        for i, dy in enumerate((dq, dk, dv)):
            a, b = factors[2 * i], factors[2 * i + 1]
            dxa = da = db = None
            if a is not None:
                dxa, da, db = lora_bwd(dy, x, xas[i], a, b, ctx.scales[i], need[4 * i + 2], need[4 * i + 3])
            if need[0]:
                dx = add_input_grad(dx, dy, ctx.bases[i], dxa, a)  # (N, d), one buffer for all six GEMMs
            grads += [None, da, db, None]
        grads[0] = dx
        return tuple(grads)


def lora_qkv(x: torch.Tensor, q: nn.Module, k: nn.Module, v: nn.Module):
    """x (..., d) through the q, k, v PEFT LoRA Linears -> (Q (..., Hq*D), K (..., Hk*D), V (..., Hk*D))."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, d)
    outs = LoRAQKVFunction.apply(x2, *lora_parts(q), *lora_parts(k), *lora_parts(v))
    lead = x.shape[:-1]
    return tuple(o.view(*lead, o.shape[-1]) for o in outs)
