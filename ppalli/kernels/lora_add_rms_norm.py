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
"""

from __future__ import annotations

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import cdiv, check_tensors, contiguous_rows, dot, dot_upcast, jit, next_power_of_2, tl
from ppalli.kernels.factor_cache import factor_cast
from ppalli.kernels.lora_linear import lora_bwd
from ppalli.kernels.rms_norm import rms_norm_bwd

# (rows, columns a step, warps): 16 rows, the least M of tl.dot; benchmarks/bench_lora_add_rms_norm.py sweeps it.
# On an H100 (results/2026-11-25-h100-lora-add-rms-norm-s5.json) 512 columns and 8 warps took 0.113 ms at
# Llama-3.2-1B's N x d = 16384 x 2048 against 0.125 for (16, 256, 4), and the same 0.125 at 8B's 8192 x 4096.
# On an H200 (results/2026-12-03-h200-add-norm-one-tile.txt) (16, 512, 8) took 0.095 / 0.103 ms (1B / 8B), the
# best setting 0.094 / 0.098; a whole row held in one tile and normed from registers rather than read back
# (e1e6738) was slower: 1B 0.120 ms at 8 warps, 8B 0.76 ms at 16. Removed.
BLOCKS = (16, 512, 8)


@jit(rows=("n_rows",))
def _lora_add_rms_norm_fwd_kernel(X, NRM, H, Y0, XA, xa_stride, B, W, RSTD, n_rows, d, R, s, eps, offset,
                                  HAS_LORA: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr,
                                  UPCAST: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr):
    # NORM=False: x alone (lora_add_fwd), which may be written over Y0: each tile is read before it is stored.
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
        v = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(Y0 + offs, mask=mask,
                                                                                other=0.0).to(tl.float32)
        if HAS_LORA:
            bt = tl.load(B + cols[None, :] * R + k[:, None], mask=(cols[None, :] < d) & (k[:, None] < R),
                         other=0.0)  # (RP, BD) of Bo^T, Bo (d, R)
            v += dot(xa, bt, IEEE, UPCAST) * s
        x = v.to(X.dtype.element_ty)
        tl.store(X + offs, x, mask=mask)
        if NORM:
            xf = x.to(tl.float32)  # the norm reads the rounded residual, as the next op would
            sq += tl.sum(xf * xf, axis=1)
    if NORM:
        _norm_pass(X, NRM, W, RSTD, rows, row_ok, sq, d, eps, offset, BD)


@jit
def _norm_pass(X, NRM, W, RSTD, rows, row_ok, sq, d, eps, offset, BD: tl.constexpr):
    rstd = tl.rsqrt(sq / d + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    tl.debug_barrier()  # x written above by other threads of this program is read back below
    for d0 in range(0, d, BD):
        cols = d0 + tl.arange(0, BD)
        offs = rows[:, None] * d + cols[None, :]
        mask = row_ok[:, None] & (cols[None, :] < d)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < d, other=0.0).to(tl.float32) + offset
        tl.store(NRM + offs, (x * rstd[:, None] * w[None, :]).to(NRM.dtype.element_ty), mask=mask)


def lora_add_rms_norm_fwd(h, y0, xa, b, s: float, weight, eps: float, offset: float = 0.0, blocks=BLOCKS):
    """h, y0 (M, d); xa (M, r) and b (d, r) or None; weight (d,) -> (x = h + y0 + s xa b^T, n = RMSNorm(x)
    * (offset + weight), rstd (M,) fp32); x and n in h's dtype."""
    check_tensors(weight)
    if weight.shape != h.shape[-1:]:
        raise PpalliError(f"lora_add_rms_norm needs weight of shape ({h.shape[-1]},), got {tuple(weight.shape)}")
    h, y0 = h.contiguous(), y0.contiguous()
    x = torch.empty_like(h)
    n, rstd = torch.empty_like(h), torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    _launch(x, h, y0, xa, b, s, (n, weight, rstd, eps, offset), blocks)
    return x, n, rstd


def lora_add_fwd(h, y0, xa, b, s: float, out=None, blocks=BLOCKS):
    """h, y0 (M, d); xa (M, r) and b (d, r) or None -> x = h + y0 + s xa b^T in h's dtype, written into out
    (which may be y0) when given. A LoRA projection's rank-r term and the residual add in one pass: cuBLAS's
    addmm_ then an add read and write (N, d) 5 times, this 3 (a Llama MLP's down projection)."""
    h, y0 = h.contiguous(), (y0 if y0 is out else y0.contiguous())
    x = torch.empty_like(h) if out is None else out
    _launch(x, h, y0, xa, b, s, None, blocks)
    return x


def _launch(x, h, y0, xa, b, s, norm, blocks):
    check_tensors(h, y0, *[t for t in (xa, b) if t is not None])
    if h.shape != y0.shape or h.shape != x.shape or h.dim() != 2 or not (y0.is_contiguous() and x.is_contiguous()):
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
    nrm, weight, rstd, eps, offset = norm if norm is not None else (x, x, x, 0.0, 0.0)
    bm, bd, warps = blocks
    _lora_add_rms_norm_fwd_kernel[(cdiv(n_rows, bm),)](
        x, nrm, h, y0, xa if has_lora else h, xa.stride(0) if has_lora else 0, b if has_lora else h, weight, rstd,
        n_rows, d, rank, float(s), float(eps), float(offset), HAS_LORA=has_lora, NORM=norm is not None,
        IEEE=h.dtype == torch.float32, UPCAST=dot_upcast(h.dtype),
        BM=bm, BD=min(bd, next_power_of_2(d)), RP=max(16, next_power_of_2(rank)), num_warps=warps)


class LoRAAddRMSNormFunction(torch.autograd.Function):
    """(x, n) = (h + y0 + s xa b^T, RMSNorm(x) * (offset + w)); gradients for h, y0, xa, b (and w if it trains)."""

    @staticmethod
    def forward(ctx, h, y0, xa, b, s, weight, eps, offset):
        b_cast = factor_cast(b, h.dtype)
        x, n, rstd = lora_add_rms_norm_fwd(h, y0, xa, b_cast, s, weight, eps, offset)
        ctx.save_for_backward(x, rstd, xa, b_cast, weight)
        ctx.s, ctx.offset, ctx.b_dtype = s, offset, b.dtype if b is not None else None
        return x, n

    @staticmethod
    def backward(ctx, dx, dn):
        x, rstd, xa, b, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if dn is None:
            dn = torch.zeros_like(x)
        dres = contiguous_rows(dx) if dx is not None else None
        dxt, dw = rms_norm_bwd(dn, x, weight, rstd, ctx.offset, compute_dw=need[5], dres=dres)  # (M, d)
        dxa = db = None
        if xa is not None:  # the o projection's LoRA term, as lora_linear's backward forms it
            dxa, _, db = lora_bwd(dxt, None, xa.to(dxt.dtype), None, b, ctx.s, False, need[3],
                                  (None, ctx.b_dtype))  # (M, r), (d, r)
            dxa = dxa.to(xa.dtype) if need[2] else None  # db is in b's dtype already
        return dxt, dxt, dxa, db, None, dw, None, None


def lora_add_rms_norm(h: torch.Tensor, y0: torch.Tensor, xa: torch.Tensor | None, b: torch.Tensor | None,
                      s: float, weight: torch.Tensor, eps: float, offset: float = 0.0):
    """h, y0 (..., d) -> (x = h + y0 + s xa b^T, RMSNorm(x) * (offset + weight)), both (..., d); xa (M, r)
    over the flattened rows and b (d, r) the LoRA term, or None."""
    lead = h.shape
    x, n = LoRAAddRMSNormFunction.apply(h.reshape(-1, lead[-1]), y0.reshape(-1, lead[-1]), xa, b, float(s),
                                        weight, float(eps), float(offset))
    return x.view(lead), n.view(lead)
