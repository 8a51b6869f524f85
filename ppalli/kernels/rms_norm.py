"""Fused RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + w), fp32 inside, x's dtype outside.

offset=0 is Llama's form, offset=1 Gemma's (1 + w). Everything is computed in fp32 and rounded once at
the end (Gemma's casting; Llama rounds x_hat to the input dtype before the weight multiply, one extra
rounding that this kernel skips). The forward saves x and rstd (one fp32 per row); the backward
recomputes x_hat from them and, only when the weight trains, sums dW over rows in per-program partials
(LoRA freezes the norm weights, so the usual backward is the input gradient alone).
"""

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import (
    cdiv,
    check_tensors,
    contiguous_rows,
    dot,
    dot_upcast,
    jit,
    next_power_of_2,
    num_warps_for,
    program_count,
    row_block,
    tl,
)

# rms_norm_a_bwd's (rows, columns a step, warps): lora_add_rms_norm's forward setting, (16, 512, 8) on the H100.
A_BLOCKS = (16, 512, 8)


def a_column_step(bd: int, d: int, dtype: torch.dtype) -> int:
    """The column step of a kernel that multiplies by a stacked A (R, d): fp32 tiles of 512 columns with R up
    to 64 ask 264-356 KB of shared memory for tl.dot (compile_cuda.py), over the H100's 227: 128 for fp32."""
    return min(bd if dtype != torch.float32 else min(bd, 128), next_power_of_2(d))


@jit
def row_rms_norm(x, w, n_cols, eps):
    """(x * rstd * w, rstd) of one row x held in registers (fp32; w already offset; masked lanes 0)."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    return x * rstd * w, rstd


@jit
def row_rms_norm_bwd(x, dy, w, rstd, n_cols):
    """The input gradient of row_rms_norm: rstd * (w dy - x_hat mean(w dy x_hat)), fp32."""
    x_hat = x * rstd
    wdy = w * dy
    return rstd * (wdy - x_hat * (tl.sum(wdy * x_hat, axis=0) / n_cols))


@jit
def _rms_norm_fwd_kernel(
    Y, X, W, RSTD,  # Y, X: (M, N); W: (N,); RSTD: (M,) fp32
    stride_y, stride_x, n_cols, eps, offset,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    y, rstd = row_rms_norm(x, w, n_cols, eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@jit
def _rms_norm_bwd_kernel(
    DX, DY, X, W, RSTD, DW_PARTIAL, DRES,  # DX, DY, X, DRES: (M, N); W: (N,); RSTD: (M,); DW_PARTIAL: (programs, N)
    stride_dx, stride_dy, stride_x, stride_dres, n_rows, n_cols, rows_per_program, offset,
    BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr, HAS_DRES: tl.constexpr,
):
    # dx = rstd * (w*dy - x_hat * mean(w*dy * x_hat)) [+ dres],  dW = sum_rows dy * x_hat
    # dres: the gradient x also gets from the residual stream, added here rather than by autograd after.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # Walk the rows by pointer increments from an int64 start: M * N may pass 2**31.
    start = row_start.to(tl.int64)
    X += start * stride_x
    DY += start * stride_dy
    DX += start * stride_dx
    DRES += start * stride_dres
    RSTD += start
    for _ in range(row_start, row_end):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD)
        dx = row_rms_norm_bwd(x, dy, w, rstd, n_cols)
        if HAS_DRES:
            dx += tl.load(DRES + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += dy * x * rstd
        X += stride_x
        DY += stride_dy
        DX += stride_dx
        DRES += stride_dres
        RSTD += 1
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0):
    """x (..., N), weight (N,) -> (y like x, x2d (M, N) as saved, rstd (M,) fp32)."""
    check_tensors(x, weight)
    if weight.shape != x.shape[-1:]:
        raise PpalliError(f"rms_norm needs weight of shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    x2d = contiguous_rows(x)  # (M, N)
    n_rows, n_cols = x2d.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block = row_block(n_cols)
    _rms_norm_fwd_kernel[(n_rows,)](
        y, x2d, weight, rstd, y.stride(0), x2d.stride(0), n_cols, eps, offset,
        BLOCK=block, num_warps=num_warps_for(block),
    )
    return y.view(x.shape), x2d, rstd


def rms_norm_bwd(dy, x2d, weight, rstd, offset: float = 0.0, compute_dw: bool = True, dres=None):
    """dy (..., N), x2d (M, N), rstd (M,) -> (dx (M, N) in x's dtype, dW (N,) in weight's dtype or None);
    dres (M, N), unit stride along rows, is added to dx when given."""
    dy2d = contiguous_rows(dy)  # (M, N)
    n_rows, n_cols = x2d.shape
    dx = torch.empty_like(x2d, memory_format=torch.contiguous_format)
    # With dW, a persistent grid (one program per SM) keeps the fp32 partials at (SMs, N); without it,
    # one program per row is the most parallel launch.
    programs = min(n_rows, program_count(x2d.device)) if compute_dw else n_rows
    rows_per_program = cdiv(n_rows, programs)
    dw_partial = torch.empty((programs, n_cols) if compute_dw else (1,), dtype=torch.float32, device=x2d.device)
    block = row_block(n_cols)
    _rms_norm_bwd_kernel[(programs,)](
        dx, dy2d, x2d, weight, rstd, dw_partial, dres if dres is not None else dx,
        dx.stride(0), dy2d.stride(0), x2d.stride(0), dres.stride(0) if dres is not None else 0, n_rows, n_cols,
        rows_per_program, offset, BLOCK=block, COMPUTE_DW=compute_dw, HAS_DRES=dres is not None,
        num_warps=num_warps_for(block),
    )
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


# --------------------------------------------------------------------------- with the next adapters' A


@jit
def _rms_norm_a_bwd_kernel(DX, DN, X, W, RSTD, DRES, DXA, A, n_rows, d, R, offset,
                           HAS_DN: tl.constexpr, HAS_DRES: tl.constexpr, HAS_A: tl.constexpr, IEEE: tl.constexpr,
                           UPCAST: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < n_rows
    k = tl.arange(0, RP)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    if HAS_A:  # (BM, RP): this program's rows of dxa
        dxa = tl.load(DXA + rows[:, None] * R + k[None, :], mask=row_ok[:, None] & (k[None, :] < R), other=0.0)
    acc = tl.zeros((BM,), dtype=tl.float32)
    for d0 in range(0, d, BD):  # sum(w g x) a row
        g, x, w, offs, mask = _tile(DN, X, W, A, dxa if HAS_A else rstd, rows, row_ok, d0, d, R, offset, HAS_DN,
                                    HAS_A, IEEE, UPCAST, BD, RP)
        acc += tl.sum(w[None, :] * g * x, axis=1)
    c = acc * rstd * rstd / d  # mean(w g x_hat) * rstd
    for d0 in range(0, d, BD):
        g, x, w, offs, mask = _tile(DN, X, W, A, dxa if HAS_A else rstd, rows, row_ok, d0, d, R, offset, HAS_DN,
                                    HAS_A, IEEE, UPCAST, BD, RP)
        dx = rstd[:, None] * (w[None, :] * g - x * c[:, None])
        if HAS_DRES:
            dx += tl.load(DRES + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@jit
def _tile(DN, X, W, A, dxa, rows, row_ok, d0, d, R, offset, HAS_DN: tl.constexpr, HAS_A: tl.constexpr,
          IEEE: tl.constexpr, UPCAST: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr):
    """(g = dn + dxa A, x, offset + w, offsets, mask) of the (BM, BD) tile at column d0, fp32."""
    cols = d0 + tl.arange(0, BD)
    offs = rows[:, None] * d + cols[None, :]
    mask = row_ok[:, None] & (cols[None, :] < d)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < d, other=0.0).to(tl.float32) + offset
    if HAS_DN:
        g = tl.load(DN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = x * 0.0
    if HAS_A:
        k = tl.arange(0, RP)
        a = tl.load(A + k[:, None] * d + cols[None, :], mask=(k[:, None] < R) & (cols[None, :] < d), other=0.0)
        g += dot(dxa, a, IEEE, UPCAST)  # (BM, RP) @ (RP, BD)
    return g, x, w, offs, mask


def rms_norm_a_bwd(dn, x, weight, rstd, offset: float = 0.0, dres=None, dxa=None, a=None, blocks=A_BLOCKS):
    """rms_norm's backward with the rank-r term of the adapters that read n (lora_add_rms_norm.py, rms_norm_a):
    dn (M, d) or None, x (M, d) the norm's input, rstd (M,) fp32, dres (M, d) or None, dxa (M, R) with a (R, d)
    or None -> dx (M, d) in x's dtype: the input gradient of n = RMSNorm(x) * (offset + w) given dn and the
    gradient dxa of xa = n a^T, plus dres. The weight's own gradient is not formed (it must be frozen)."""
    check_tensors(x, weight, rstd, *[t for t in (dn, dres, dxa, a) if t is not None])
    n_rows, d = x.shape
    if (dxa is None) != (a is None) or (a is not None and (a.shape[1] != d or dxa.shape != (n_rows, a.shape[0]))):
        raise PpalliError(f"rms_norm_a's backward needs dxa (M, R) with a (R, d) for x {tuple(x.shape)}, got "
                          f"{None if dxa is None else tuple(dxa.shape)} and {None if a is None else tuple(a.shape)}")
    dn = contiguous_rows(dn) if dn is not None else None
    dres = dres.contiguous() if dres is not None else None
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    rank = a.shape[0] if a is not None else 1
    if a is not None:
        dxa, a = dxa.to(x.dtype).contiguous(), a.to(x.dtype).contiguous()
    bm, bd, warps = blocks
    _rms_norm_a_bwd_kernel[(cdiv(n_rows, bm),)](
        dx, dn if dn is not None else x, x, weight, rstd, dres if dres is not None else x,
        dxa if a is not None else x, a if a is not None else x, n_rows, d, rank, float(offset),
        HAS_DN=dn is not None, HAS_DRES=dres is not None, HAS_A=a is not None, IEEE=x.dtype == torch.float32,
        UPCAST=dot_upcast(x.dtype), BM=bm, BD=a_column_step(bd, d, x.dtype), RP=max(16, next_power_of_2(rank)),
        num_warps=warps)
    return dx


class RMSNormFunction(torch.autograd.Function):
    """(x, RMSNorm(x)), the returned x a view of the input; `rms_norm` uses only the norm, and its backward
    then runs without a residual gradient. A decoder layer reads its residual stream through that view
    (`rms_norm_residual`), so the gradient x gets along the residual path arrives in this backward and is
    added inside the norm's backward kernel (dres), instead of by autograd in one more pass over (N, d):
    3 passes of (N, d) saved a layer (~68 us at N x d = 16384 x 2048 bf16 on an H100)."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        ctx.set_materialize_grads(False)
        y, x2d, rstd = rms_norm_fwd(x, weight, eps, offset)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset = offset
        return x.view_as(x), y

    @staticmethod
    def backward(ctx, dres, dy):
        if dy is None:
            return dres, None, None, None
        x2d, weight, rstd = ctx.saved_tensors
        dres2d = contiguous_rows(dres) if dres is not None else None
        dx, dw = rms_norm_bwd(dy, x2d, weight, rstd, ctx.offset, compute_dw=ctx.needs_input_grad[1], dres=dres2d)
        return dx.view(dy.shape), dw, None, None


def rms_norm_residual(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0):
    """(a view of x for the residual path, RMSNorm(x)): the residual's gradient is added in the norm's backward."""
    return RMSNormFunction.apply(x, weight, float(eps), float(offset))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., N) with weight (N,); offset=1.0 for Gemma's (1 + w)."""
    return RMSNormFunction.apply(x, weight, float(eps), float(offset))[1]
