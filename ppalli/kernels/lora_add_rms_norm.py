"""The residual add after attention, the o projection's LoRA term and the MLP's RMSNorm, in one pass.

A Llama-style layer runs, after attention, o = a Wo^T + so (a Ao^T) Bo^T; x = h + o; n = RMSNorm(x) * w.
Done op by op that is an addmm_ into o (reads and writes (N, d)), the add (reads 2, writes 1) and the norm
(reads 1, writes 1): 7 passes of (N, d). Here the o projection hands over its base output o0 = a Wo^T and
the (N, r) product xa = a Ao^T, and one kernel reads h and o0 and writes x and n (4 passes), forming
so xa Bo^T tile by tile with tl.dot:

    forward:   x = h + o0 + so xa Bo^T   (rounded once to x's dtype: the residual stream)
               n = x * rstd * (offset + w),   rstd = 1 / sqrt(mean(x^2) + eps)
    backward:  dx' = dx + rstd * (w dn - x_hat mean(w dn x_hat))    (rms_norm's backward with the residual
               gradient dx added in the same pass instead of autograd adding it after)
               dh = do0 = dx',  dxa = so dx' Bo,  dBo = so dx'^T xa

Each program takes BM rows and walks d in BD blocks twice: once to form x, store it and sum its squares,
once to read x back (L2-hot: BM * d * 2 bytes a program) and store n. Saved for the backward: x (the norm's
input, which the plain path saves too), rstd (N,) fp32, xa (N, r) and Bo; o0 is not kept.

With the next adapters (a_next; rms_norm_a for a norm with no add before it, the layer's first):

A Llama-style layer norms its residual stream twice, and each norm's output n goes to LoRA projections: q, k, v
after the first, gate and up after the second. Each block then multiplies n by its stacked A factors, a
rank-r GEMM bound by reading n (N, d) once more (26.7 us at Llama-3.1-8B's 8192 x 4096 on an H100, 2 a layer),
and in the backward adds the rank-r term of the input gradient, dn += dxa A, with a GEMM that writes dn or reads
and writes it (the MLP's addmm_ 61.5 us a layer; q/k/v's mm 26 us plus the beta read of the base GEMM after it;
results/2026-12-05-h100-t1-s31-profile-ppalli.txt). Here the norm does both in passes it makes anyway
(rms_norm.py's rms_norm_a_bwd for the backward):

    forward:   n = x * rstd * (offset + w),  xa = n A^T       (A = [A_1; A_2; ...] (R, d), n's rounded tiles)
    backward:  g = dn + dxa A                                (fp32, never stored)
               dx = rstd * (w g - x_hat mean(w g x_hat)) + dres

The blocks over n take xa as an input (lora_qkv(xa=), lora_mlp(xa=)) and hand back dxa as its gradient; they
still form dA = dxa^T n themselves, since they hold n and dxa, so A's gradient reaches autograd through them
and the norm takes A as a plain tensor. The norm's weight must be frozen (LoRA's case; a training weight keeps
the plain norm). The backward walks BM rows in BD-column steps twice, the first for mean(w g x_hat), the second
(reading dn and x again, L2-hot at BM * d * 4 bytes a program) for dx: the rank-r product needs tl.dot's 16
rows, so the one-row-a-program form of rms_norm's backward does not take it.
"""

from __future__ import annotations

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import cdiv, check_tensors, contiguous_rows, dot, dot_upcast, jit, next_power_of_2, tl
from ppalli.kernels.factor_cache import factor_cast
from ppalli.kernels.lora_linear import lora_bwd
from ppalli.kernels.rms_norm import a_column_step, rms_norm_a_bwd, rms_norm_bwd

# (rows, columns a step, warps): 16 rows, the least M of tl.dot; benchmarks/bench_lora_add_rms_norm.py sweeps it.
# On an H100 (results/2026-11-25-h100-lora-add-rms-norm-s5.json) 512 columns and 8 warps took 0.113 ms at
# Llama-3.2-1B's N x d = 16384 x 2048 against 0.125 for (16, 256, 4), and the same 0.125 at 8B's 8192 x 4096.
# On an H200 (results/2026-12-03-h200-add-norm-one-tile.txt) (16, 512, 8) took 0.095 / 0.103 ms (1B / 8B), the
# best setting 0.094 / 0.098; a whole row held in one tile and normed from registers rather than read back
# (e1e6738) was slower: 1B 0.120 ms at 8 warps, 8B 0.76 ms at 16. Removed.
BLOCKS = (16, 512, 8)


@jit
def _lora_add_rms_norm_fwd_kernel(X, NRM, H, Y0, XA, xa_stride, B, W, RSTD, XN, AN, n_rows, d, R, RN, s, eps, offset,
                                  ADD: tl.constexpr, HAS_LORA: tl.constexpr, NORM: tl.constexpr,
                                  HAS_A: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
                                  BD: tl.constexpr, RP: tl.constexpr, RNP: tl.constexpr):
    # NORM=False: x alone (lora_add_fwd), which may be written over Y0: each tile is read before it is stored.
    # ADD=False: the norm of H alone (X is H, not written): rms_norm_a's forward.
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < n_rows
    k = tl.arange(0, RP)
    if HAS_LORA:  # (BM, RP): this program's rows of x Ao^T
        xa = tl.load(XA + rows[:, None] * xa_stride + k[None, :], mask=row_ok[:, None] & (k[None, :] < R),
                     other=0.0)
    sq = tl.zeros((BM,), dtype=tl.float32)
    for d0 in range(0, d, BD):
        cols = d0 + tl.arange(0, BD)
        offs = rows[:, None] * d + cols[None, :]
        mask = row_ok[:, None] & (cols[None, :] < d)
        v = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        if ADD:
            v += tl.load(Y0 + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_LORA:
                bt = tl.load(B + cols[None, :] * R + k[:, None], mask=(cols[None, :] < d) & (k[:, None] < R),
                             other=0.0)  # (RP, BD) of Bo^T, Bo (d, R)
                v += dot(xa, bt, IEEE, UPCAST) * s
            x = v.to(X.dtype.element_ty)
            tl.store(X + offs, x, mask=mask)
            v = x.to(tl.float32)  # the norm reads the rounded residual, as the next op would
        if NORM:
            sq += tl.sum(v * v, axis=1)
    if NORM:
        _norm_pass(X, NRM, W, RSTD, XN, AN, rows, row_ok, sq, d, RN, eps, offset, HAS_A, IEEE, UPCAST, BM, BD, RNP)


@jit
def _norm_pass(X, NRM, W, RSTD, XN, AN, rows, row_ok, sq, d, RN, eps, offset, HAS_A: tl.constexpr,
               IEEE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, RNP: tl.constexpr):
    # HAS_A: also xn = n An^T (BM, RN), the stacked A factors of the adapters that read n, from the tiles of n
    # as they are stored, so no GEMM reads n back for them.
    rstd = tl.rsqrt(sq / d + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    tl.debug_barrier()  # x written above by other threads of this program is read back below
    j = tl.arange(0, RNP)
    if HAS_A:
        acc = tl.zeros((BM, RNP), dtype=tl.float32)
    for d0 in range(0, d, BD):
        cols = d0 + tl.arange(0, BD)
        offs = rows[:, None] * d + cols[None, :]
        mask = row_ok[:, None] & (cols[None, :] < d)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < d, other=0.0).to(tl.float32) + offset
        n = (x * rstd[:, None] * w[None, :]).to(NRM.dtype.element_ty)
        tl.store(NRM + offs, n, mask=mask)
        if HAS_A:
            at = tl.load(AN + j[None, :] * d + cols[:, None], mask=(cols[:, None] < d) & (j[None, :] < RN),
                         other=0.0)  # (BD, RNP) of An^T, An (RN, d)
            acc += dot(n, at, IEEE, UPCAST)
    if HAS_A:
        tl.store(XN + rows[:, None] * RN + j[None, :], acc.to(XN.dtype.element_ty),
                 mask=row_ok[:, None] & (j[None, :] < RN))


def lora_add_rms_norm_fwd(h, y0, xa, b, s: float, weight, eps: float, offset: float = 0.0, blocks=BLOCKS,
                          a_next=None):
    """h, y0 (M, d); xa (M, r) and b (d, r) or None; weight (d,) -> (x = h + y0 + s xa b^T, n = RMSNorm(x)
    * (offset + weight), rstd (M,) fp32, xn = n a_next^T (M, R) or None); x, n and xn in h's dtype. a_next
    (R, d): the stacked A factors of the adapters that read n (rms_norm_a.py), or None."""
    h, y0 = h.contiguous(), y0.contiguous()
    x = torch.empty_like(h)
    n, rstd, xn = _norm_outputs(h, weight, a_next)
    _launch(x, h, y0, xa, b, s, (n, weight, rstd, eps, offset, a_next, xn), blocks)
    return x, n, rstd, xn


def rms_norm_a_fwd(x, weight, eps: float, offset: float = 0.0, a=None, blocks=BLOCKS):
    """x (M, d), weight (d,), a (R, d) or None -> (n = RMSNorm(x) * (offset + weight), rstd (M,) fp32, xa = n a^T
    (M, R) or None): the forward of rms_norm_a.py, in two passes over x (the second L2-hot)."""
    x = x.contiguous()
    n, rstd, xa = _norm_outputs(x, weight, a)
    _launch(x, x, None, None, None, 0.0, (n, weight, rstd, eps, offset, a, xa), blocks)
    return n, rstd, xa


def _norm_outputs(h, weight, a):
    check_tensors(weight)
    if weight.shape != h.shape[-1:]:
        raise PpalliError(f"lora_add_rms_norm needs weight of shape ({h.shape[-1]},), got {tuple(weight.shape)}")
    if a is not None and (a.dim() != 2 or a.shape[1] != h.shape[-1]):
        raise PpalliError(f"lora_add_rms_norm: the next adapters' stacked A must be (R, {h.shape[-1]}), got "
                          f"{tuple(a.shape)}")
    xa = None if a is None else h.new_empty(h.shape[0], a.shape[0])
    return torch.empty_like(h), torch.empty(h.shape[0], dtype=torch.float32, device=h.device), xa


def lora_add_fwd(h, y0, xa, b, s: float, out=None, blocks=BLOCKS):
    """h, y0 (M, d); xa (M, r) and b (d, r) or None -> x = h + y0 + s xa b^T in h's dtype, written into out
    (which may be y0) when given. A LoRA projection's rank-r term and the residual add in one pass: cuBLAS's
    addmm_ then an add read and write (N, d) 5 times, this 3 (a Llama MLP's down projection)."""
    h, y0 = h.contiguous(), (y0 if y0 is out else y0.contiguous())
    x = torch.empty_like(h) if out is None else out
    _launch(x, h, y0, xa, b, s, None, blocks)
    return x


def _launch(x, h, y0, xa, b, s, norm, blocks):
    """y0 None: x is h, normed alone (norm must be given)."""
    add = y0 is not None
    check_tensors(h, *[t for t in (y0, xa, b) if t is not None])
    if add and (h.shape != y0.shape or h.shape != x.shape or h.dim() != 2
                or not (y0.is_contiguous() and x.is_contiguous())):
        raise PpalliError(f"lora_add_rms_norm needs h and y0 (and the output) of one (M, d) shape, got "
                          f"{tuple(h.shape)}, {tuple(y0.shape)}, {tuple(x.shape)}")
    n_rows, d = h.shape
    has_lora = xa is not None
    rank = xa.shape[-1] if has_lora else 1
    if has_lora:
        if b.shape != (d, rank):
            raise PpalliError(f"lora_add_rms_norm: lora_B must be ({d}, {rank}), got {tuple(b.shape)}")
        xa = xa.to(h.dtype)
        xa = xa if xa.stride(-1) == 1 else xa.contiguous()
        b = b.to(h.dtype).contiguous()
    nrm, weight, rstd, eps, offset, a_next, xn = norm if norm is not None else (x, x, x, 0.0, 0.0, None, None)
    has_a = a_next is not None
    if has_a:
        check_tensors(a_next)
        a_next = a_next.to(h.dtype).contiguous()
    r_next = a_next.shape[0] if has_a else 1
    bm, bd, warps = blocks
    _lora_add_rms_norm_fwd_kernel[(cdiv(n_rows, bm),)](
        x, nrm, h, y0 if add else h, xa if has_lora else h, xa.stride(0) if has_lora else 0,
        b if has_lora else h, weight, rstd, xn if has_a else h, a_next if has_a else h,
        n_rows, d, rank, r_next, float(s), float(eps), float(offset), ADD=add, HAS_LORA=has_lora,
        NORM=norm is not None, HAS_A=has_a, IEEE=h.dtype == torch.float32, UPCAST=dot_upcast(h.dtype),
        BM=bm, BD=a_column_step(bd, d, h.dtype) if has_a else min(bd, next_power_of_2(d)),
        RP=max(16, next_power_of_2(rank)), RNP=max(16, next_power_of_2(r_next)), num_warps=warps)


class LoRAAddRMSNormFunction(torch.autograd.Function):
    """(x, n, xn) = (h + y0 + s xa b^T, RMSNorm(x) * (offset + w), n a_next^T or None); gradients for h, y0, xa,
    b (and w if it trains; not with a_next, whose dxn rms_norm_a's backward adds into dn)."""

    @staticmethod
    def forward(ctx, h, y0, xa, b, s, weight, eps, offset, a_next):
        b_cast = factor_cast(b, h.dtype)
        x, n, rstd, xn = lora_add_rms_norm_fwd(h, y0, xa, b_cast, s, weight, eps, offset, a_next=a_next)
        ctx.save_for_backward(x, rstd, xa, b_cast, weight, a_next)
        ctx.s, ctx.offset, ctx.b_dtype = s, offset, b.dtype if b is not None else None
        return x, n, xn

    @staticmethod
    def backward(ctx, dx, dn, dxn):
        x, rstd, xa, b, weight, a_next = ctx.saved_tensors
        need = ctx.needs_input_grad
        dres = contiguous_rows(dx) if dx is not None else None
        if a_next is not None:  # the next adapters' rank-r term of dn added in the norm's backward
            a = a_next if dxn is not None else None
            dxt, dw = rms_norm_a_bwd(dn, x, weight, rstd, ctx.offset, dres, dxn, a), None
        else:
            dn = dn if dn is not None else torch.zeros_like(x)
            dxt, dw = rms_norm_bwd(dn, x, weight, rstd, ctx.offset, compute_dw=need[5], dres=dres)  # (M, d)
        dxa = db = None
        if xa is not None:  # the o projection's LoRA term, as lora_linear's backward forms it
            dxa, _, db = lora_bwd(dxt, None, xa.to(dxt.dtype), None, b, ctx.s, False, need[3],
                                  (None, ctx.b_dtype))  # (M, r), (d, r)
            dxa = dxa.to(xa.dtype) if need[2] else None  # db is in b's dtype already
        return dxt, dxt, dxa, db, None, dw, None, None, None


def lora_add_rms_norm(h: torch.Tensor, y0: torch.Tensor, xa: torch.Tensor | None, b: torch.Tensor | None,
                      s: float, weight: torch.Tensor, eps: float, offset: float = 0.0, a_next=None):
    """h, y0 (..., d) -> (x = h + y0 + s xa b^T, RMSNorm(x) * (offset + weight)), both (..., d); xa (M, r)
    over the flattened rows and b (d, r) the LoRA term, or None. With a_next (R, d), the stacked A factors of
    the adapters that read n (weight frozen): (x, n, n a_next^T (M, R)), see rms_norm_a.py."""
    lead = h.shape
    if a_next is not None and weight.requires_grad:
        raise PpalliError("lora_add_rms_norm with a_next forms no gradient for the norm's weight")
    x, n, xn = LoRAAddRMSNormFunction.apply(h.reshape(-1, lead[-1]), y0.reshape(-1, lead[-1]), xa, b, float(s),
                                            weight, float(eps), float(offset),
                                            None if a_next is None else a_next.detach())
    if a_next is None:
        return x.view(lead), n.view(lead)
    return x.view(lead), n.view(lead), xn


class RMSNormAFunction(torch.autograd.Function):
    """(x, n, xa) = (a view of x, RMSNorm(x) * (offset + w), n a^T): the residual read through the view gets its
    gradient added in this backward (as rms_norm_residual's), the adapters' dxa added into dn; w frozen."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, a):
        ctx.set_materialize_grads(False)
        x2d = contiguous_rows(x)
        n, rstd, xa = rms_norm_a_fwd(x2d, weight, eps, offset, a)
        ctx.save_for_backward(x2d, weight, rstd, a)
        ctx.offset, ctx.shape = offset, x.shape
        return x.view_as(x), n.view(x.shape), xa

    @staticmethod
    def backward(ctx, dres, dn, dxa):
        if dn is None and dxa is None:
            return dres, None, None, None, None
        x2d, weight, rstd, a = ctx.saved_tensors
        dres2d = contiguous_rows(dres) if dres is not None else None
        dx = rms_norm_a_bwd(dn, x2d, weight, rstd, ctx.offset, dres2d, dxa, a if dxa is not None else None)
        return dx.view(ctx.shape), None, None, None, None


def rms_norm_a(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, a: torch.Tensor):
    """x (..., d), a frozen norm weight (d,), a (R, d) -> (a view of x for the residual path, n (..., d),
    xa = n a^T (M, R) over the flattened rows)."""
    if weight.requires_grad:
        raise PpalliError("rms_norm_a forms no gradient for the norm's weight: use rms_norm where it trains")
    return RMSNormAFunction.apply(x, weight, float(eps), float(offset), a.detach())
