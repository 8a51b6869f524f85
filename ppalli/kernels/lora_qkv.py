"""The q, k, v projections of attention with LoRA on each, fused, sharing one saved input.

    Q = x Wq^T + bq + sq (x Aq^T) Bq^T      (N, Hq*D)
    K = x Wk^T + bk + sk (x Ak^T) Bk^T      (N, Hk*D)
    V = x Wv^T + bv + sv (x Av^T) Bv^T      (N, Hk*D)

Saved for the backward: x (N, d) once and the three (N, r) LoRA products. Autograd through PEFT keeps x
for each of the three base layers and each lora_A (up to six references to one tensor, so the cost there
is the LoRA intermediates and the separate dx sums). The three A factors are stacked, (3r, d), so x A^T
and dA = dxa^T x are one GEMM each, x read once (rank-16 GEMMs are bound by reading x: 64 MB for
Llama-3.1-8B at N = 8192). The backward accumulates the input gradient into one dx buffer:
    dx = [sq dQ Bq, sk dK Bk, sv dV Bv] [Aq; Ak; Av] + dQ Wq + dK Wk + dV Wv   (summed in that order).
Biases (Qwen2's q/k/v) are frozen and added by the base GEMM's addmm. The o projection is a plain
`lora_linear` (re-exported here).
"""

from __future__ import annotations

import torch
from torch import nn

from ppalli.kernels.factor_cache import factor_cast
from ppalli.kernels.lora_linear import (
    add_input_grad,
    base_mm,
    factor_dtypes,
    lora_bwd,
    lora_linear,
    lora_parts,
    stacked_lora_a,
    stacked_lora_a_grads,
)

__all__ = ["LoRAQKVFunction", "lora_linear", "lora_qkv"]


class LoRAQKVFunction(torch.autograd.Function):
    """Three LoRA Linears over one input; the base weights stay frozen."""

    @staticmethod
    def forward(ctx, x, qb, qa, qB, qs, kb, ka, kB, ks, vb, va, vB, vs):
        ctx.ranks = [None if a is None else a.shape[0] for a in (qa, ka, va)]
        ctx.dtypes = factor_dtypes(qa, qB, ka, kB, va, vB)
        xas, a_stack = stacked_lora_a(x, (qa, ka, va))  # three (N, r) views of one GEMM: x read once
        bs = [factor_cast(b, x.dtype) for b in (qB, kB, vB)]  # once; the backward reuses them
        outs = []
        for base, xa, b, s in zip((qb, kb, vb), xas, bs, (qs, ks, vs)):
            y = base_mm(x, base)  # (N, Hq*D) or (N, Hk*D)
            if xa is not None:
                y.addmm_(xa, b.t(), alpha=s)
            outs.append(y)
        ctx.save_for_backward(x, *xas, a_stack, *bs)
        ctx.bases, ctx.scales = (qb, kb, vb), (qs, ks, vs)
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        saved = ctx.saved_tensors  # unpacked once: non-reentrant checkpointing allows a single unpack
        x, xas, a_stack, bs = saved[0], saved[1:4], saved[4], saved[5:]
        need = ctx.needs_input_grad
        grads, dxas = [None] * 13, []
        for i, dy in enumerate((dq, dk, dv)):
            dxa = db = None
            if ctx.ranks[i] is not None:
                dxa, _, db = lora_bwd(dy, None, xas[i], None, bs[i], ctx.scales[i], False, need[4 * i + 3],
                                      (None, ctx.dtypes[2 * i + 1]))
            dxas.append(dxa)
            grads[4 * i + 3] = db  # already in the adapter's dtype (lora_bwd's grad_dtypes)
        das, dxa_all = stacked_lora_a_grads(dxas, x, a_stack, ctx.ranks, [need[4 * i + 2] for i in range(3)],
                                            ctx.dtypes[0::2])
        for i in range(3):
            grads[4 * i + 2] = das[i]
        if need[0]:
            # the three rank-r terms first, in one GEMM (add_input_grad's order), then dk Wk and dv Wv
            dx = add_input_grad(None, dq, ctx.bases[0], dxa_all, a_stack)  # (N, d), one buffer for all
            for dy, base in zip((dk, dv), ctx.bases[1:]):
                dx = add_input_grad(dx, dy, base, None, None)
            grads[0] = dx
        return tuple(grads)


def lora_qkv(x: torch.Tensor, q: nn.Module, k: nn.Module, v: nn.Module):
    """x (..., d) through the q, k, v PEFT LoRA Linears -> (Q (..., Hq*D), K (..., Hk*D), V (..., Hk*D))."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, d)
    outs = LoRAQKVFunction.apply(x2, *lora_parts(q), *lora_parts(k), *lora_parts(v))
    lead = x.shape[:-1]
    return tuple(o.view(*lead, o.shape[-1]) for o in outs)
