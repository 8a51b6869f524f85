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
    jit,
    num_warps_for,
    program_count,
    row_block,
    tl,
)


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


@jit(rows=("n_rows", "rows_per_program"))
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
