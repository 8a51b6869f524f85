"""The q, k, v projections of attention with LoRA on each, fused, sharing one saved input; RoPE inside.

    Q = x Wq^T + bq + sq (x Aq^T) Bq^T      (N, Hq*D)
    K = x Wk^T + bk + sk (x Ak^T) Bk^T      (N, Hk*D)
    V = x Wv^T + bv + sv (x Av^T) Bv^T      (N, Hk*D)

Saved for the backward: x (N, d) once and the three (N, r) LoRA products. Autograd through PEFT keeps x
for each of the three base layers and each lora_A (up to six references to one tensor, so the cost there
is the LoRA intermediates and the separate dx sums). The three A factors are stacked, (3r, d), so x A^T
and dA = dxa^T x are one GEMM each, x read once (rank-16 GEMMs are bound by reading x: 64 MB for
Llama-3.1-8B at N = 8192). The backward accumulates the input gradient into one dx buffer:
    dx = [sq dQ Bq, sk dK Bk, sv dV Bv] [Aq; Ak; Av] + [dQ dK dV] [Wq; Wk; Wv]   (rank-r term first)
Biases (Qwen2's q/k/v) are frozen and added by the base GEMM's addmm. The o projection is a plain
`lora_linear` (re-exported here).

With rope=(cos, sin) (layers whose q and k go from the projections straight into RoPE) the block returns
rotated q, k and v as (B, H, T, D) views; q's and k's LoRA terms are then added inside RoPE's pass over them
(rope_lora_fwd) instead of by an addmm_ that reads and writes each first. Its backward writes RoPE's
transpose of dq and dk, and dv,
into the column blocks of one (N, Hq*D + 2 Hk*D) buffer. When the base weights are row blocks of one
(Hq*D + 2 Hk*D, d) tensor (the fast path lays them out so: `stack_base_weights`), the base term of dx is
then one GEMM over K = Hq*D + 2 Hk*D instead of one GEMM and two accumulating ones that each read and write
dx, for one (N, Hk*D) copy of dv: bench_gemm.py on the H200, the whole input gradient 0.371 -> 0.335 ms at
Llama-3.2-1B's shape, 0.643 -> 0.627 at 8B's (results/2026-12-03-h200-gemm-qkv-stacked.txt). Otherwise each
base term is its own GEMM into dx.

With qk_norms as well (Qwen3, Gemma 3, EXAONE 4: a frozen per-head RMSNorm on q and k before RoPE), q and k go
through qk_norm_rope: the LoRA term, the norm and RoPE in one pass each way, the base outputs q0 and k0 kept for
the backward in place of the norm's input (kernels/qk_norm_rope.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ppalli.errors import PpalliError
from ppalli.kernels.factor_cache import factor_cast
from ppalli.kernels.fp8 import fp8_weights
from ppalli.kernels.lora_linear import (
    add_input_grad,
    base_mm,
    factor_dtypes,
    lora_bwd,
    lora_linear,
    lora_parts,
    out_features,
    quantized_input,
    stacked_base_weight,
    stacked_lora_a,
    stacked_lora_a_grads,
)
from ppalli.kernels.qk_norm_rope import qk_norm_rope_bwd, qk_norm_rope_fwd
from ppalli.kernels.rope import rope_fwd, rope_lora_fwd

__all__ = ["LoRAQKVFunction", "lora_linear", "lora_qkv"]

_LEAD = 5  # forward's arguments before the (base, A, B, scale) of q, k and v: x, cos, sin, heads, norms


# --------------------------------------------------------------------------- RoPE inside the block


def _heads(y: torch.Tensor, b: int, d: int) -> torch.Tensor:
    """(N, H*D), rows of unit stride or a column block of a wider buffer -> (B, H, T, D) view."""
    return y.view(b, -1, y.shape[1] // d, d).transpose(1, 2)


def _rotate(outs, cos, sin, heads, lora=None, norms=None):
    """(q, k, v) (N, H*D) -> RoPE'd q, k (new (B, T, H, D) memory) and v, as (B, H, T, D). lora: q's and k's
    (xa, b, s), their LoRA terms added inside RoPE's pass (rope_lora_fwd), or None when outs hold them. norms:
    q's and k's (weight, eps) and the norm offset: each is normed per head first, in the same pass
    (qk_norm_rope_fwd; lora then holds (None, None, 0.0) for a projection without an adapter)."""
    b, d = heads
    v = _heads(outs[2], b, d)
    if norms is not None:
        return (*(qk_norm_rope_fwd(y, *term, w, eps, norms[2], cos, sin, b, d)
                  for y, term, (w, eps) in zip(outs[:2], lora, norms[:2])), v)
    if lora is not None:
        return (*(rope_lora_fwd(y, *term, cos, sin, b, d) for y, term in zip(outs[:2], lora)), v)
    return (*rope_fwd(*(_heads(o, b, d) for o in outs[:2]), cos, sin), v)


def _grad_buffer(dq, dk, dv, b: int, d: int):
    """One (N, Hq*D + 2 Hk*D) buffer for dq, dk, dv (B, H, T, D) and its three column blocks, which the stacked
    q/k/v weight turns into one dx GEMM."""
    widths = [g.shape[1] * d for g in (dq, dk, dv)]
    buf = dq.new_empty(b * dq.shape[2], sum(widths))
    return buf, buf.split(widths, dim=1)


def _rotate_grads(dq, dk, dv, cos, sin, heads, one_buffer: bool):
    """dq, dk, dv (B, H, T, D) -> (buffer, (dq, dk, dv) (N, H*D) each) with RoPE's transpose applied to dq and
    dk. one_buffer: the three are the column blocks of one (N, Hq*D + 2 Hk*D) buffer (dv copied in by dk's
    RoPE launch), else buffer is None and each is its own tensor."""
    b, d = heads
    if not one_buffer:
        dq, dk = rope_fwd(dq, dk, cos, sin, backward=True)
        return None, tuple(g.transpose(1, 2).reshape(b * g.shape[2], -1) for g in (dq, dk, dv))
    buf, cols = _grad_buffer(dq, dk, dv, b, d)
    # dv goes into its column block in dk's launch: a copy_ of its own took 24.5 us a T4 layer (H200, 2026-12-03)
    rope_fwd(dq, dk, cos, sin, backward=True, out=(_heads(cols[0], b, d), _heads(cols[1], b, d)),
             v=(dv, _heads(cols[2], b, d)))
    return buf, cols


def _norm_rope_grads(dq, dk, dv, bases0, lora, norms, cos, sin, heads, one_buffer: bool):
    """_rotate_grads for q and k normed before RoPE: the gradients of the norms' inputs, (N, H*D) each, from dq, dk
    (B, H, T, D) and the saved base outputs bases0 = (q0, k0); lora and norms as _rotate took them."""
    b, d = heads
    dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
    buf, outs, v = None, (None, None), None
    if one_buffer:
        buf, (*outs, dv_block) = _grad_buffer(dq, dk, dv, b, d)
        v = (dv, dv_block)
    grads = [qk_norm_rope_bwd(g, y, *term, w, eps, norms[2], cos, sin, b, d, out=out, v=vv)
             for g, y, term, (w, eps), out, vv in zip((dq, dk), bases0, lora, norms[:2], outs, (None, v))]
    dv = v[1] if one_buffer else dv.transpose(1, 2).reshape(b * dv.shape[2], -1)
    return buf, (*grads, dv)


# --------------------------------------------------------------------------- the block


class LoRAQKVFunction(torch.autograd.Function):
    """Three LoRA Linears over one input; the base weights stay frozen. With cos, sin (and heads = (B, D)),
    RoPE on q and k and (B, H, T, D) outputs."""

    @staticmethod
    def forward(ctx, x, cos, sin, heads, norms, qb, qa, qB, qs, kb, ka, kB, ks, vb, va, vB, vs):
        ctx.ranks = [None if a is None else a.shape[0] for a in (qa, ka, va)]
        ctx.dtypes = factor_dtypes(qa, qB, ka, kB, va, vB)
        xas, a_stack = stacked_lora_a(x, (qa, ka, va))  # three (N, r) views of one GEMM: x read once
        bs = [factor_cast(b, x.dtype) for b in (qB, kB, vB)]  # once; the backward reuses them
        # With RoPE and adapters on q and k, their LoRA terms are added inside RoPE's pass (rope_lora_fwd)
        # rather than by an addmm_ that reads and writes q and k once more before it; with norms, inside
        # qk_norm_rope's pass, whichever of the two has an adapter.
        fold = cos is not None and xas[0] is not None and xas[1] is not None
        inside = [xas[i] is not None and (fold or norms is not None) for i in range(2)] + [False]
        outs, xq = [], quantized_input(x, qb, kb, vb)  # plan.fp8: x quantized once for the three GEMMs
        for i, (base, xa, b, s) in enumerate(zip((qb, kb, vb), xas, bs, (qs, ks, vs))):
            y = base_mm(x, base, xq)  # (N, Hq*D) or (N, Hk*D)
            if xa is not None and not inside[i]:
                y.addmm_(xa, b.t(), alpha=s)
            outs.append(y)
        ctx.heads = heads if cos is not None else None
        lora = [(xas[i], bs[i], s) if inside[i] else (None, None, 0.0) for i, s in enumerate((qs, ks))]
        ctx.norm_eps = None if norms is None else (norms[0][1], norms[1][1], norms[2])  # q's eps, k's, offset
        ctx.inside = inside
        # q0, k0 and the norm weights: what the norm's backward re-forms its input from
        kept = (outs[0], outs[1], norms[0][0], norms[1][0]) if norms is not None else ()
        ctx.save_for_backward(x, cos, sin, *xas, a_stack, *bs, *kept)
        ctx.bases, ctx.scales = (qb, kb, vb), (qs, ks, vs)
        if ctx.heads is None:
            return tuple(outs)
        return _rotate(outs, cos, sin, heads, lora if (fold or norms is not None) else None, norms)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        saved = ctx.saved_tensors  # unpacked once: non-reentrant checkpointing allows a single unpack
        x, cos, sin, xas, a_stack, bs = saved[0], saved[1], saved[2], saved[3:6], saved[6], saved[7:10]
        dqkv = w = None
        if ctx.heads is not None:
            w = stacked_base_weight(ctx.bases, dq.dtype) if ctx.needs_input_grad[0] else None
            if ctx.norm_eps is None:
                dqkv, (dq, dk, dv) = _rotate_grads(dq, dk, dv, cos, sin, ctx.heads, one_buffer=w is not None)
            else:
                q0, k0, wq, wk = saved[10:]
                eps_q, eps_k, offset = ctx.norm_eps
                lora = [(xas[i], bs[i], ctx.scales[i]) if ctx.inside[i] else (None, None, 0.0) for i in range(2)]
                dqkv, (dq, dk, dv) = _norm_rope_grads(dq, dk, dv, (q0, k0), lora, ((wq, eps_q), (wk, eps_k), offset),
                                                      cos, sin, ctx.heads, one_buffer=w is not None)
        need = ctx.needs_input_grad[_LEAD:]  # (base, A, B, scale) of q, k, v
        grads, dxas = [None] * 12, []
        for i, dy in enumerate((dq, dk, dv)):
            dxa = db = None
            if ctx.ranks[i] is not None:
                dxa, _, db = lora_bwd(dy, None, xas[i], None, bs[i], ctx.scales[i], False, need[4 * i + 2],
                                      (None, ctx.dtypes[2 * i + 1]))
            dxas.append(dxa)
            grads[4 * i + 2] = db  # already in the adapter's dtype (lora_bwd's grad_dtypes)
        das, dxa_all = stacked_lora_a_grads(dxas, x, a_stack, ctx.ranks, [need[4 * i + 1] for i in range(3)],
                                            ctx.dtypes[0::2])
        for i in range(3):
            grads[4 * i + 1] = das[i]
        dx = _input_grad(ctx.bases, (dq, dk, dv), dqkv, w, dxa_all, a_stack) if ctx.needs_input_grad[0] else None
        return (dx, None, None, None, None, *grads)


def _input_grad(bases, dys, dqkv, w, dxa_all, a_stack):
    """dx (N, d): the three rank-r terms first, in one GEMM (add_input_grad's order), then the base terms, in one
    GEMM over the stacked weight w when there is dqkv (N, sum out), else one GEMM each."""
    if dqkv is not None:  # plan.fp8: the stacked weight's copies are kept with q's base layer
        return add_input_grad(None, dqkv, w, dxa_all, a_stack, fp8_weights(bases[0]))
    dx = add_input_grad(None, dys[0], bases[0], dxa_all, a_stack)
    for dy, base in zip(dys[1:], bases[1:]):
        dx = add_input_grad(dx, dy, base, None, None)
    return dx


def lora_qkv(x: torch.Tensor, q: nn.Module, k: nn.Module, v: nn.Module, rope=None, head_dim: int | None = None,
             qk_norms=None):
    """x (..., d) through the q, k, v PEFT LoRA Linears -> (Q (..., Hq*D), K (..., Hk*D), V (..., Hk*D)).

    rope=(cos, sin), HF's (B or 1, T, D) tables, with head_dim D: x is (B, T, d) and the block returns
    (RoPE'd Q (B, Hq, T, D), RoPE'd K (B, Hk, T, D), V (B, Hk, T, D)), the layouts attention reads.
    qk_norms=((q_weight, eps), (k_weight, eps), offset), with rope: q and k each RMSNormed per head (weight (D,),
    frozen, times offset + weight) before they are rotated."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, d)
    modules = [lora_parts(m) for m in (q, k, v)]
    parts = [t for p in modules for t in p]
    if rope is not None:
        if x.dim() != 3 or head_dim is None or any(out_features(p.base) % head_dim for p in modules):
            raise PpalliError(f"lora_qkv with rope needs x (B, T, d) and a head_dim dividing each output, got "
                             f"{tuple(x.shape)} and head_dim {head_dim}")
        return LoRAQKVFunction.apply(x2, *rope, (x.shape[0], head_dim), qk_norms, *parts)
    if qk_norms is not None:
        raise PpalliError("lora_qkv: qk_norms come with rope (the norm runs in RoPE's pass)")
    outs = LoRAQKVFunction.apply(x2, None, None, None, None, *parts)
    lead = x.shape[:-1]
    return tuple(o.view(*lead, o.shape[-1]) for o in outs)
