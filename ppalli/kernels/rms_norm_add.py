"""A post-norm and its residual add, and the next pre-norm, in one pass: Gemma-2/3's and EXAONE-4's layers.

Gemma-2/3 norm each sub-block's output before the residual add (the "sandwich"), and the MLP's pre-norm
reads that sum; EXAONE 4 has the post-norms alone:

    x = r + RMSNorm(y) * (offset + w)            (y: the o or down projection's output, r: the residual)
    h = RMSNorm(x) * (offset + w2)               (optional: the next norm, Gemma's pre_feedforward_layernorm)

Op by op that is a norm (reads y, writes 1), the add (reads 2, writes 1) and the next norm (reads 1, writes
1): 7 passes of (N, d) forward. Here one program per row holds the row in registers: it reads y and r and
writes x and h (4 passes; 3 without the next norm, against 5). Rounding follows the ops: the normed y is
rounded to y's dtype before the add, x is rounded before the next norm reads it.

The backward takes dx (the residual stream's gradient of x, from the layer after) and dh:

    dx' = dx + rstd2 * (w2 dh - x_hat mean(w2 dh x_hat))        (the next norm's backward, dx added in-pass)
    dr  = dx',   dy = rstd * (w dx' - y_hat mean(w dx' y_hat))   (the post-norm's backward)

reading x, dh, dx and y and writing dr and dy (6 passes against 9: two norm backwards and autograd's sum of
x's two gradients; without a next norm dr is dx itself, 3 passes). dx' stays fp32 between the two. Saved: y,
x (when there is a next norm), both rstd (N,) fp32. The norm weights get no gradient (LoRA freezes them): the
fast path runs these ops one by one when they train.
"""

from __future__ import annotations

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import check_tensors, contiguous_rows, jit, num_warps_for, row_block, tl
from ppalli.kernels.rms_norm import row_rms_norm, row_rms_norm_bwd


@jit
def _rms_norm_add_fwd_kernel(
    X, H, R, Y, W, W2, RSTD, RSTD2,  # X, H, R, Y: (M, N) with unit column stride; W, W2: (N,); RSTD*: (M,) fp32
    stride_x, stride_h, stride_r, stride_y, n_cols, eps, eps2, offset,
    BLOCK: tl.constexpr, NEXT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    normed, rstd = row_rms_norm(y, w, n_cols, eps)
    tl.store(RSTD + row, rstd)
    normed = normed.to(X.dtype.element_ty).to(tl.float32)  # the norm's output, as the op rounds it
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    x = (r + normed).to(X.dtype.element_ty)
    tl.store(X + row * stride_x + cols, x, mask=mask)
    if NEXT:
        w2 = tl.load(W2 + cols, mask=mask, other=0.0).to(tl.float32) + offset
        h, rstd2 = row_rms_norm(x.to(tl.float32), w2, n_cols, eps2)
        tl.store(RSTD2 + row, rstd2)
        tl.store(H + row * stride_h + cols, h.to(H.dtype.element_ty), mask=mask)


@jit
def _rms_norm_add_bwd_kernel(
    DR, DY, DX, DH, X, Y, W, W2, RSTD, RSTD2,  # DR, DY, DX, DH, X, Y: (M, N), unit column stride
    stride_dr, stride_dy, stride_dx, stride_dh, stride_x, stride_y, n_cols, offset,
    BLOCK: tl.constexpr, HAS_DX: tl.constexpr, HAS_DH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.zeros((BLOCK,), dtype=tl.float32)  # dx': the whole gradient of x, fp32
    if HAS_DX:
        g += tl.load(DX + row * stride_dx + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DH:
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(W2 + cols, mask=mask, other=0.0).to(tl.float32) + offset
        g += row_rms_norm_bwd(x, dh, w2, tl.load(RSTD2 + row), n_cols)
        tl.store(DR + row * stride_dr + cols, g.to(DR.dtype.element_ty), mask=mask)  # else dr is dx itself
    y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dy = row_rms_norm_bwd(y, g, w, tl.load(RSTD + row), n_cols)
    tl.store(DY + row * stride_dy + cols, dy.to(DY.dtype.element_ty), mask=mask)


def rms_norm_add_fwd(r2d, y2d, weight, eps: float, offset: float = 0.0, next_norm=None):
    """r2d, y2d (M, N); weight (N,); next_norm (weight2, eps2) or None -> (x, h or None, rstd, rstd2 or None),
    x = r + RMSNorm(y) * (offset + weight) and h = RMSNorm(x) * (offset + weight2), both in y's dtype."""
    weight2, eps2 = next_norm if next_norm is not None else (weight, 0.0)
    check_tensors(r2d, y2d, weight, weight2)
    n_rows, n_cols = y2d.shape
    if r2d.shape != y2d.shape:
        raise PpalliError(f"rms_norm_add needs the residual and y of one shape, got {tuple(r2d.shape)} and "
                          f"{tuple(y2d.shape)}")
    for name, w in (("weight", weight), ("next norm's weight", weight2)):
        if w.shape != (n_cols,):
            raise PpalliError(f"rms_norm_add needs a {name} of shape ({n_cols},), got {tuple(w.shape)}")
    x = torch.empty_like(y2d, memory_format=torch.contiguous_format)
    h = torch.empty_like(x) if next_norm is not None else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=y2d.device)
    rstd2 = torch.empty_like(rstd) if next_norm is not None else None
    block = row_block(n_cols)
    _rms_norm_add_fwd_kernel[(n_rows,)](
        x, h if h is not None else x, r2d, y2d, weight, weight2, rstd, rstd2 if rstd2 is not None else rstd,
        x.stride(0), h.stride(0) if h is not None else 0, r2d.stride(0), y2d.stride(0), n_cols, float(eps),
        float(eps2), float(offset), BLOCK=block, NEXT=next_norm is not None, num_warps=num_warps_for(block),
    )
    return x, h, rstd, rstd2


def rms_norm_add_bwd(dx, dh, x2d, y2d, weight, weight2, rstd, rstd2, offset: float = 0.0):
    """dx, dh (M, N) or None; the forward's x2d (or None without a next norm), y2d and rstds -> (dr, dy) (M, N)
    in y's dtype: dr the residual's gradient (x's whole gradient), dy the post-norm input's."""
    dx = contiguous_rows(dx) if dx is not None else None
    dh = contiguous_rows(dh) if dh is not None and x2d is not None else None
    n_rows, n_cols = y2d.shape
    dy = torch.empty_like(y2d, memory_format=torch.contiguous_format)
    dr = torch.empty_like(dy) if dh is not None else dx  # without dh, x's whole gradient is dx: not copied
    block = row_block(n_cols)
    rows = [t if t is not None else dy for t in (dr, dx, dh, x2d)]  # absent ones: any tensor, never read
    _rms_norm_add_bwd_kernel[(n_rows,)](
        rows[0], dy, rows[1], rows[2], rows[3], y2d, weight, weight2 if weight2 is not None else weight, rstd,
        rstd2 if rstd2 is not None else rstd, *(t.stride(0) for t in (rows[0], dy, rows[1], rows[2], rows[3], y2d)),
        n_cols, float(offset), BLOCK=block, HAS_DX=dx is not None, HAS_DH=dh is not None,
        num_warps=num_warps_for(block),
    )
    return dr, dy


class RMSNormAddFunction(torch.autograd.Function):
    """(x, h) = (r + RMSNorm(y) * (offset + w), RMSNorm(x) * (offset + w2) or None); gradients for r and y."""

    @staticmethod
    def forward(ctx, r, y, weight, eps, weight2, eps2, offset):
        ctx.set_materialize_grads(False)
        next_norm = (weight2, eps2) if weight2 is not None else None
        x, h, rstd, rstd2 = rms_norm_add_fwd(contiguous_rows(r), contiguous_rows(y), weight, eps, offset,
                                             next_norm)
        ctx.save_for_backward(x if h is not None else None, contiguous_rows(y), weight, weight2, rstd, rstd2)
        ctx.offset = offset
        return x.view(y.shape), (h.view(y.shape) if h is not None else None)

    @staticmethod
    def backward(ctx, dx, dh):
        x2d, y2d, weight, weight2, rstd, rstd2 = ctx.saved_tensors
        if dx is None and (dh is None or x2d is None):
            return None, None, None, None, None, None, None
        dr, dy = rms_norm_add_bwd(dx, dh, x2d, y2d, weight, weight2, rstd, rstd2, ctx.offset)
        shape = (dx if dx is not None else dh).shape
        return dr.view(shape), dy.view(shape), None, None, None, None, None


def rms_norm_add(residual: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                 next_norm: tuple[torch.Tensor, float] | None = None):
    """residual + RMSNorm(y) * (offset + weight) over the last dim of (..., N); with next_norm (weight2, eps2),
    (that sum x, RMSNorm(x) * (offset + weight2)). The weights get no gradient: frozen norms only."""
    if any(w is not None and w.requires_grad for w in (weight, next_norm[0] if next_norm else None)):
        raise PpalliError("rms_norm_add gives the norm weights no gradient; run the norms one by one "
                          "(ppalli.kernels.rms_norm) when they train")
    weight2, eps2 = next_norm if next_norm is not None else (None, 0.0)
    x, h = RMSNormAddFunction.apply(residual, y, weight, float(eps), weight2, float(eps2), float(offset))
    return (x, h) if next_norm is not None else x
