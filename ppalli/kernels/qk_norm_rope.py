"""Per-head RMSNorm of q or k, then RoPE, in one pass, the projection's LoRA term added inside: what lora_qkv
runs for the families that norm q and k before rotating them (self_attn.q_norm / k_norm: Qwen3, Gemma 3, EXAONE 4).

    x   = y + s xa B^T                                   (N, H*D): y the base GEMM's output, xa = x A^T
    n_h = x_h rstd_h (offset + w),   rstd_h = 1 / sqrt(mean(x_h^2) + eps)       over each head's D
    out = rope(n)                                        (B, H, T, D) views of (B, T, H, D) memory

    backward, from the attention's d_out:   g = rope^T(d_out),  dn = g (offset + w),  x_hat = x rstd
                                            dx_h = rstd_h (dn_h - x_hat_h mean(dn_h x_hat_h))

Done op by op (addmm_ for the LoRA term, the norm, RoPE) the forward reads and writes q twice more and the
backward once more, and the norm keeps its input for the backward. Here the forward keeps y (the same bytes,
the base GEMM's output, which nothing else reads), and the backward re-forms x, rstd and x_hat from y, xa and B
in registers. fp32 inside, one rounding at the output. w is frozen (LoRA trains no norm): the caller checks.
A program takes BT tokens and walks the heads one by one, each as two (BT, D/2) halves.
"""

from __future__ import annotations

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import cdiv, check_tensors, dot, dot_upcast, jit, next_power_of_2, tl
from ppalli.kernels.rope import _cos_sin, _prepare_cos_sin, _rotated

BT, WARPS = 16, 4  # tokens a program, warps: rope_lora_fwd's setting (kernels/rope.py LORA_BLOCKS)


@jit
def _setup(XA, W, COS, SIN, xa_sn, c_sb, c_st, n_rows, n_t, half, R, offset, BT: tl.constexpr,
           BLOCK_D: tl.constexpr, RP: tl.constexpr):
    """What a program reads once for its BT tokens: rows (BT,) and their batch and position indices, the head
    dim's half d, its mask and the (BT, BLOCK_D) tile mask, cos/sin's halves (BT, BLOCK_D), the norm weight's
    halves (offset added), k = arange(RP), and the tokens' xa rows (BT, RP) (zeros without a LoRA term: R = 0)."""
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    row_ok = rows < n_rows
    bb, tt = rows // n_t, rows % n_t
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < half
    mask = row_ok[:, None] & d_ok[None, :]
    cos1, cos2, sin1, sin2 = _cos_sin(COS, SIN, (bb * c_sb + tt * c_st)[:, None] + dd[None, :], half, mask)
    w1 = tl.load(W + dd, mask=d_ok, other=0.0).to(tl.float32) + offset
    w2 = tl.load(W + half + dd, mask=d_ok, other=0.0).to(tl.float32) + offset
    k = tl.arange(0, RP)
    xa = tl.load(XA + rows[:, None] * xa_sn + k[None, :], mask=row_ok[:, None] & (k[None, :] < R), other=0.0)
    return rows, bb, tt, dd, d_ok, mask, cos1, cos2, sin1, sin2, w1, w2, k, xa


@jit
def _normed(Y, B, ys, mask, col, k, xa, d_ok, R, s, half, eps, HAS_LORA: tl.constexpr, HEAD_D: tl.constexpr,
            IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One head's halves of x = y + s xa B^T in fp32 (ys: their first half's offsets in Y), and its rstd (BT,)."""
    x1 = tl.load(Y + ys, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(Y + ys + half, mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        b_mask = (k[:, None] < R) & d_ok[None, :]
        b1 = tl.load(B + col[None, :] * R + k[:, None], mask=b_mask, other=0.0)  # (RP, BLOCK_D) of B^T
        b2 = tl.load(B + (col[None, :] + half) * R + k[:, None], mask=b_mask, other=0.0)
        x1 += s * dot(xa, b1, IEEE, UPCAST)
        x2 += s * dot(xa, b2, IEEE, UPCAST)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_D + eps)
    return x1, x2, rstd


@jit(rows=("n_rows", "n_t"))
def _qk_norm_rope_fwd_kernel(
    OUT, Y, XA, B, W, COS, SIN,  # OUT, Y (N, H*D) rows of unit stride; XA (N, R); B (H*D, R); W (D,); COS/SIN (B, T, D)
    o_sn, y_sn, xa_sn, c_sb, c_st, n_rows, n_t, n_heads, half, R, s, eps, offset,
    HEAD_D: tl.constexpr, BT: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr, HAS_LORA: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    rows, _, _, dd, d_ok, mask, cos1, cos2, sin1, sin2, w1, w2, k, xa = _setup(
        XA, W, COS, SIN, xa_sn, c_sb, c_st, n_rows, n_t, half, R, offset, BT, BLOCK_D, RP)
    for h in range(0, n_heads):
        col = (h * HEAD_D + dd).to(tl.int64)
        x1, x2, rstd = _normed(Y, B, rows[:, None] * y_sn + col[None, :], mask, col, k, xa, d_ok, R, s, half, eps,
                               HAS_LORA, HEAD_D, IEEE, UPCAST)
        n1 = x1 * rstd[:, None] * w1[None, :]
        n2 = x2 * rstd[:, None] * w2[None, :]
        o1, o2 = _rotated(n1, n2, cos1, cos2, sin1, sin2, False)
        os = rows[:, None] * o_sn + col[None, :]
        tl.store(OUT + os, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + os + half, o2.to(OUT.dtype.element_ty), mask=mask)


@jit(rows=("n_rows", "n_t"))
def _qk_norm_rope_bwd_kernel(
    DX, DO, Y, XA, B, W, COS, SIN, VOUT, V,  # DX, Y, VOUT (N, H*D) rows; DO, V (B, H, T, D) any strides, unit on D
    dx_sn, do_sb, do_sh, do_st, y_sn, xa_sn, c_sb, c_st, vo_sn, v_sb, v_sh, v_st, n_rows, n_t, n_heads, half, R, s,
    eps, offset,
    HEAD_D: tl.constexpr, BT: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr, HAS_LORA: tl.constexpr,
    HAS_V: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    # HAS_V: V copied unrotated into VOUT in the same launch (dv into its column block of lora_qkv's buffer).
    rows, bb, tt, dd, d_ok, mask, cos1, cos2, sin1, sin2, w1, w2, k, xa = _setup(
        XA, W, COS, SIN, xa_sn, c_sb, c_st, n_rows, n_t, half, R, offset, BT, BLOCK_D, RP)
    for h in range(0, n_heads):
        col = (h * HEAD_D + dd).to(tl.int64)
        gs = (bb * do_sb + tt * do_st + h * do_sh)[:, None] + dd[None, :]
        g1, g2 = _rotated(tl.load(DO + gs, mask=mask, other=0.0).to(tl.float32),
                          tl.load(DO + gs + half, mask=mask, other=0.0).to(tl.float32),
                          cos1, cos2, sin1, sin2, True)
        x1, x2, rstd = _normed(Y, B, rows[:, None] * y_sn + col[None, :], mask, col, k, xa, d_ok, R, s, half, eps,
                               HAS_LORA, HEAD_D, IEEE, UPCAST)
        xh1, xh2 = x1 * rstd[:, None], x2 * rstd[:, None]
        dn1, dn2 = g1 * w1[None, :], g2 * w2[None, :]
        c = (tl.sum(dn1 * xh1, axis=1) + tl.sum(dn2 * xh2, axis=1)) / HEAD_D
        dxs = rows[:, None] * dx_sn + col[None, :]
        tl.store(DX + dxs, (rstd[:, None] * (dn1 - xh1 * c[:, None])).to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + dxs + half, (rstd[:, None] * (dn2 - xh2 * c[:, None])).to(DX.dtype.element_ty), mask=mask)
        if HAS_V:
            vs = (bb * v_sb + tt * v_st + h * v_sh)[:, None] + dd[None, :]
            vos = rows[:, None] * vo_sn + col[None, :]
            tl.store(VOUT + vos, tl.load(V + vs, mask=mask, other=0.0), mask=mask)
            tl.store(VOUT + vos + half, tl.load(V + vs + half, mask=mask, other=0.0), mask=mask)


def _check(y, xa, b, weight, batch: int, head_dim: int) -> tuple[int, int, int]:
    """(heads, tokens a row, rank) of y (N, H*D), xa (N, r) / b (H*D, r) or None, weight (D,)."""
    n, width = y.shape
    r = b.shape[1] if b is not None else 0
    lora_ok = xa is None or (b.shape[0] == width and xa.shape == (n, r) and xa.stride(1) == 1)
    if width % head_dim or head_dim % 2 or n % batch or y.stride(1) != 1 or not lora_ok \
            or weight.shape != (head_dim,):
        raise PpalliError(f"qk_norm_rope needs y (N, H*D) with an even D = {head_dim}, xa (N, r) and b (H*D, r) "
                          f"with unit-stride rows and a (D,) norm weight, got {tuple(y.shape)}, "
                          f"{None if xa is None else tuple(xa.shape)}, {None if b is None else tuple(b.shape)}, "
                          f"{tuple(weight.shape)}")
    if weight.requires_grad:
        raise PpalliError("qk_norm_rope: the q/k norm weight trains, and this kernel gives it no gradient; "
                          "run the layer's own norm (the fast path does so by itself)")
    return width // head_dim, n // batch, r


def _meta(y, xa, r: int, head_dim: int) -> dict:
    return dict(HEAD_D=head_dim, BT=BT, BLOCK_D=next_power_of_2(head_dim // 2), RP=max(16, next_power_of_2(max(r, 1))),
                HAS_LORA=xa is not None, IEEE=y.dtype == torch.float32, UPCAST=dot_upcast(y.dtype))


def qk_norm_rope_fwd(y: torch.Tensor, xa, b, s: float, weight: torch.Tensor, eps: float, offset: float,
                     cos: torch.Tensor, sin: torch.Tensor, batch: int, head_dim: int) -> torch.Tensor:
    """rope(RMSNorm_per_head(y + s xa b^T) * (offset + weight)): y (N, H*D) a projection's base output, xa (N, r)
    and b (H*D, r) its LoRA factors in y's dtype (or None), weight (D,) the frozen q_norm / k_norm weight,
    cos/sin as rope_fwd takes them, N = batch * T -> (B, H, T, D) views of new (B, T, H, D) memory."""
    check_tensors(y, weight, cos, sin, *[t for t in (xa, b) if t is not None])
    heads, n_t, r = _check(y, xa, b, weight, batch, head_dim)
    cos, sin = _prepare_cos_sin(y.view(batch, n_t, heads, head_dim).transpose(1, 2), cos, sin)
    out = torch.empty_like(y)
    n = y.shape[0]
    _qk_norm_rope_fwd_kernel[(cdiv(n, BT),)](
        out, y, xa if xa is not None else y, b.contiguous() if b is not None else y, weight, cos, sin,
        out.stride(0), y.stride(0), xa.stride(0) if xa is not None else 0, cos.stride(0), cos.stride(1), n, n_t,
        heads, head_dim // 2, r, float(s), float(eps), float(offset), **_meta(y, xa, r, head_dim), num_warps=WARPS)
    return out.view(batch, n_t, heads, head_dim).transpose(1, 2)


def qk_norm_rope_bwd(d_out: torch.Tensor, y: torch.Tensor, xa, b, s: float, weight: torch.Tensor, eps: float,
                     offset: float, cos: torch.Tensor, sin: torch.Tensor, batch: int, head_dim: int,
                     out: torch.Tensor | None = None, v: tuple | None = None) -> torch.Tensor:
    """The gradient of qk_norm_rope_fwd's input x = y + s xa b^T, (N, H*D), from d_out (B, H, T, D) (any strides,
    unit on D); y, xa, b, weight as the forward took them. out: an (N, H*D) view with unit-stride rows to write
    into (a column block of lora_qkv's gradient buffer), else new. v: (dv (B, H, T, D), its (N, H*D) block),
    dv copied unrotated in the same launch."""
    check_tensors(d_out, y, weight, cos, sin, *[t for t in (xa, b) if t is not None])
    heads, n_t, r = _check(y, xa, b, weight, batch, head_dim)
    if d_out.shape != (batch, heads, n_t, head_dim) or d_out.stride(-1) != 1:
        raise PpalliError(f"qk_norm_rope_bwd needs d_out ({batch}, {heads}, {n_t}, {head_dim}) with a unit last "
                          f"stride, got {tuple(d_out.shape)} strides {d_out.stride()}")
    cos, sin = _prepare_cos_sin(d_out, cos, sin)
    out = torch.empty_like(y) if out is None else out
    if out.shape != y.shape or out.stride(1) != 1:
        raise PpalliError(f"qk_norm_rope_bwd: out must be {tuple(y.shape)} with unit-stride rows")
    dv, dv_out = v or (d_out, out)
    if v is not None and (dv.shape != d_out.shape or dv.stride(-1) != 1 or dv_out.shape != out.shape
                          or dv_out.stride(1) != 1):
        raise PpalliError("qk_norm_rope_bwd: v must be (dv of d_out's shape, an (N, H*D) block of unit-stride rows)")
    n = y.shape[0]
    _qk_norm_rope_bwd_kernel[(cdiv(n, BT),)](
        out, d_out, y, xa if xa is not None else y, b.contiguous() if b is not None else y, weight, cos, sin,
        dv_out, dv, out.stride(0), *d_out.stride()[:3], y.stride(0), xa.stride(0) if xa is not None else 0,
        cos.stride(0), cos.stride(1), dv_out.stride(0), *dv.stride()[:3], n, n_t, heads, head_dim // 2, r,
        float(s), float(eps), float(offset), **_meta(y, xa, r, head_dim), HAS_V=v is not None, num_warps=WARPS)
    return out
