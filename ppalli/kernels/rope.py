"""Fused rotary position embedding in HF's rotate_half convention.

out = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1), so per half of the head dim:
    out1 = x1 * cos1 - x2 * sin1,   out2 = x2 * cos2 + x1 * sin2.
The backward is the transpose of that linear map (dx1 = g1 * cos1 + g2 * sin2, dx2 = g2 * cos2 - g1 * sin1),
which for HF's cos/sin (both halves equal) is rope with -sin. cos/sin come per token (B, T, D), so packed
sequences with restarting position_ids work; a batch of 1 broadcasts over B (HF builds position_ids (1, T)).

Out of place on purpose: q and k before rope are dead once rotated (nothing else saves them), so the new
tensor costs a transient allocation only, while writing in place would trip autograd's version check
whenever another op did save them. The outputs use (B, T, H, D) memory seen as (B, H, T, D), the layout
the q/k projections produce and the attention kernels read without a copy.
"""

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import check_tensors, dot, dot_upcast, jit, next_power_of_2, tl


@jit
def _cos_sin(COS, SIN, offs, half, mask):
    """cos and sin of both halves of the head dim at offs (the first half's), in fp32."""
    return (tl.load(COS + offs, mask=mask, other=0.0).to(tl.float32),
            tl.load(COS + offs + half, mask=mask, other=0.0).to(tl.float32),
            tl.load(SIN + offs, mask=mask, other=0.0).to(tl.float32),
            tl.load(SIN + offs + half, mask=mask, other=0.0).to(tl.float32))


@jit
def _rotated(x1, x2, cos1, cos2, sin1, sin2, BACKWARD: tl.constexpr):
    """The two halves of rope(x), or of its transpose (BACKWARD), from x's halves; fp32."""
    if BACKWARD:
        return x1 * cos1 + x2 * sin2, x2 * cos2 - x1 * sin1
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


@jit(rows=("n_out_t", "n_t"))  # n_out_t: OUT's token count, n_t unless AT_SLOT (a step's packed total when training)
def _rope_fwd_kernel(
    OUT, X, COS, SIN,  # OUT, X: (B, H, T, D) any strides with unit stride on D; COS, SIN: (B or 1, T, D)
    VOUT, V,  # with HAS_V, a (B, H, T, D) tensor copied unrotated: lora_qkv's dv beside dk
    SLOT, n_out_t,  # with AT_SLOT, a device scalar added to t where OUT and VOUT (n_out_t long) are written
    W, eps, offset,  # with NORM, each head RMSNormed over D with weight (offset + W) (D,) before the rotation
    o_sb, o_sh, o_st, x_sb, x_sh, x_st, vo_sb, vo_sh, vo_st, v_sb, v_sh, v_st, c_sb, c_st, n_t, n_heads, half,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr, HAS_V: tl.constexpr,
    AT_SLOT: tl.constexpr, NORM: tl.constexpr,
):
    pid = tl.program_id(0)  # one program per token (b, t) and block of heads
    b = (pid // n_t).to(tl.int64)
    t = (pid % n_t).to(tl.int64)
    t_out = t + tl.load(SLOT).to(tl.int64) if AT_SLOT else t
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    cs = b * c_sb + t * c_st + d  # (BLOCK_D,)
    cos1, cos2, sin1, sin2 = _cos_sin(COS, SIN, cs, half, d_mask)
    h_ok = heads < n_heads
    if AT_SLOT:  # a full cache drops the token, as no slot is left for it (the scalar broadcast by hand:
        h_ok = h_ok & ((heads * 0 + t_out) < n_out_t)  # Triton 3.9's interpreter rejects block & scalar masks)
    mask = h_ok[:, None] & d_mask[None, :]  # (BLOCK_H, BLOCK_D)
    xs = b * x_sb + t * x_st + heads[:, None] * x_sh + d[None, :]
    x1 = tl.load(X + xs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + xs + half, mask=mask, other=0.0).to(tl.float32)
    if NORM:  # Qwen3's q_norm / k_norm; rounded to x's dtype as the norm's own output would be
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + eps)[:, None]
        w1 = tl.load(W + d, mask=d_mask, other=0.0).to(tl.float32)[None, :] + offset
        w2 = tl.load(W + d + half, mask=d_mask, other=0.0).to(tl.float32)[None, :] + offset
        x1 = (x1 * rstd * w1).to(X.dtype.element_ty).to(tl.float32)
        x2 = (x2 * rstd * w2).to(X.dtype.element_ty).to(tl.float32)
    o1, o2 = _rotated(x1, x2, cos1[None, :], cos2[None, :], sin1[None, :], sin2[None, :], BACKWARD)
    offs_out = b * o_sb + t_out * o_st + heads[:, None] * o_sh + d[None, :]
    tl.store(OUT + offs_out, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + offs_out + half, o2.to(OUT.dtype.element_ty), mask=mask)
    if HAS_V:
        vs = b * v_sb + t * v_st + heads[:, None] * v_sh + d[None, :]
        vos = b * vo_sb + t_out * vo_st + heads[:, None] * vo_sh + d[None, :]
        tl.store(VOUT + vos, tl.load(V + vs, mask=mask, other=0.0), mask=mask)
        tl.store(VOUT + vos + half, tl.load(V + vs + half, mask=mask, other=0.0), mask=mask)


@jit
def _over_heads(t, BT: tl.constexpr, BH: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BT, BLOCK_D) -> (BT, BH * BLOCK_D): the same columns repeated for each of BH heads."""
    return tl.reshape(tl.broadcast_to(t[:, None, :], (BT, BH, BLOCK_D)), (BT, BH * BLOCK_D))


@jit(rows=("n_rows", "n_t"))
def _rope_lora_fwd_kernel(
    OUT, Y, XA, B, COS, SIN,  # OUT, Y: (N, H*D) rows of unit stride; XA (N, R); B (H*D, R); COS, SIN: (B or 1, T, D)
    o_sn, y_sn, xa_sn, c_sb, c_st, n_rows, n_t, n_heads, half, R, s,
    HEAD_D: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    # Program: BT tokens across all heads, BH heads a step as (BT, BH * BLOCK_D) tiles whose column j is head
    # j // BLOCK_D, dim j % BLOCK_D (the first half; the second is `half` further). x A^T and cos/sin are read
    # once for the tokens, cos/sin as (BT, BLOCK_D) broadcast over the step's heads.
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    row_ok = rows < n_rows
    k = tl.arange(0, RP)
    xa = tl.load(XA + rows[:, None] * xa_sn + k[None, :], mask=row_ok[:, None] & (k[None, :] < R), other=0.0)
    dd = tl.arange(0, BLOCK_D)
    cs = (rows // n_t * c_sb + rows % n_t * c_st)[:, None] + dd[None, :]  # (BT, BLOCK_D)
    cs_mask = row_ok[:, None] & (dd < half)[None, :]
    cos1, cos2, sin1, sin2 = _cos_sin(COS, SIN, cs, half, cs_mask)  # (BT, BLOCK_D) each
    cos1, cos2 = _over_heads(cos1, BT, BH, BLOCK_D), _over_heads(cos2, BT, BH, BLOCK_D)  # (BT, BH * BLOCK_D)
    sin1, sin2 = _over_heads(sin1, BT, BH, BLOCK_D), _over_heads(sin2, BT, BH, BLOCK_D)
    j = tl.arange(0, BH * BLOCK_D)
    for h0 in range(0, n_heads, BH):
        heads = h0 + j // BLOCK_D
        d = j % BLOCK_D
        col = (heads * HEAD_D + d).to(tl.int64)
        col_ok = (heads < n_heads) & (d < half)
        mask = row_ok[:, None] & col_ok[None, :]
        b_mask = (k[:, None] < R) & col_ok[None, :]
        b1 = tl.load(B + col[None, :] * R + k[:, None], mask=b_mask, other=0.0)  # (RP, BH * BLOCK_D) of B^T
        b2 = tl.load(B + (col[None, :] + half) * R + k[:, None], mask=b_mask, other=0.0)
        ys = rows[:, None] * y_sn + col[None, :]
        x1 = tl.load(Y + ys, mask=mask, other=0.0).to(tl.float32) + s * dot(xa, b1, IEEE, UPCAST)
        x2 = tl.load(Y + ys + half, mask=mask, other=0.0).to(tl.float32) + s * dot(xa, b2, IEEE, UPCAST)
        o1, o2 = _rotated(x1, x2, cos1, cos2, sin1, sin2, False)
        os = rows[:, None] * o_sn + col[None, :]
        tl.store(OUT + os, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + os + half, o2.to(OUT.dtype.element_ty), mask=mask)


def _check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    if out.shape != x.shape or out.stride(-1) != 1 or out.dtype != x.dtype:
        raise PpalliError(f"rope: out must be {tuple(x.shape)} {x.dtype} with a unit last stride, got "
                          f"{tuple(out.shape)} {out.dtype}")


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
              out: torch.Tensor | None = None, copy: tuple | None = None,
              slot: torch.Tensor | None = None, norm: tuple | None = None) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B, T, D) with unit last stride -> rotated x in (B, T, H, D) memory, or into
    `out` (B, H, T, D), any strides with a unit one on D (lora_qkv writes q's and k's gradients into the
    column blocks of one (N, Hq*D + 2 Hk*D) buffer this way). copy: (v, v_out) of x's shape, v written into
    v_out unrotated in the same launch (dv into that buffer: no launch of its own). slot: a device scalar; x's
    token t is then written at t + slot of out and v_out, which are a KV cache (B, H, L, D) (rope_into_cache).
    norm: (weight (D,), eps, offset): each head RMSNormed before the rotation (forward only: decoding)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_b, n_h, n_t, n_d = x.shape
    if out is None:
        out = torch.empty((n_b, n_t, n_h, n_d), dtype=x.dtype, device=x.device).transpose(1, 2)  # (B, H, T, D)
    else:
        _check_out(out if slot is None else out[:, :, :n_t], x)
    v, v_out = copy or (x, out)
    if copy is not None:
        v = v if v.stride(-1) == 1 else v.contiguous()
        _check_out(v, x)
        _check_out(v_out if slot is None else v_out[:, :, :n_t], x)
    block_d = next_power_of_2(n_d // 2)
    # A program rotates up to 4096 pairs (32 heads of D=128): 4 fp32 tiles of 32 elements per thread.
    block_h = min(next_power_of_2(n_h), max(1, 4096 // block_d))
    grid = (n_b * n_t, (n_h + block_h - 1) // block_h)
    # q and k go through two launches of one kernel rather than one launch with two sets of strides:
    # cos/sin are read twice, about 1/H of the q traffic, for a kernel half as long.
    weight, eps, offset = norm or (cos, 0.0, 0.0)
    if norm is not None and (backward or weight.shape != (n_d,)):
        raise PpalliError(f"rope's per-head norm runs forward only, with a weight of shape ({n_d},), got "
                          f"{tuple(weight.shape)}{' backward' if backward else ''}")
    _rope_fwd_kernel[grid](
        out, x, cos, sin, v_out, v, slot if slot is not None else cos, out.shape[2], weight, float(eps),
        float(offset), *out.stride()[:3], *x.stride()[:3], *v_out.stride()[:3], *v.stride()[:3],
        cos.stride(0), cos.stride(1), n_t, n_h, n_d // 2,
        BLOCK_H=block_h, BLOCK_D=block_d, BACKWARD=backward, HAS_V=copy is not None, AT_SLOT=slot is not None,
        NORM=norm is not None, num_warps=4,
    )
    return out


def _prepare_cos_sin(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """cos/sin (B or 1, T, D) or (T, D) -> (B, T, D) views (stride 0 over a broadcast batch), unit last stride."""
    n_b, _, n_t, n_d = q.shape
    if q.shape[-1] % 2:
        raise PpalliError(f"rope needs an even head dim, got {n_d}")
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.shape[1:] != (n_t, n_d) or sin.shape != cos.shape or cos.shape[0] not in (1, n_b):
        raise PpalliError(f"rope needs cos/sin of shape ({n_b}, {n_t}, {n_d}), got {tuple(cos.shape)}")
    cos, sin = (c if c.stride(-1) == 1 else c.contiguous() for c in (cos, sin))
    return cos.expand(n_b, n_t, n_d), sin.expand(n_b, n_t, n_d)


def _norm_pair(qk_norms) -> tuple:
    """((wq, eps), (wk, eps), offset) or None -> q's and k's (weight, eps, offset) or (None, None)."""
    if qk_norms is None:
        return None, None
    (wq, eq), (wk, ek), offset = qk_norms
    check_tensors(wq, wk)
    return (wq, eq, offset), (wk, ek, offset)


def rope_fwd(q, k, cos, sin, backward: bool = False, out: tuple | None = None, v: tuple | None = None,
             qk_norms: tuple | None = None):
    """q (B, Hq, T, D), k (B, Hk, T, D), cos/sin (B, T, D) -> rotated (q, k); backward=True applies the transpose.
    out: (q_out, k_out) to write into (see _rope_one), else new tensors. v: (v, v_out) of k's shape, v copied
    into v_out unrotated by k's launch. qk_norms: ((wq, eps), (wk, eps), offset), q's and k's per-head RMSNorm
    applied first in the same launches (Qwen3's decoding; forward only)."""
    check_tensors(q, k, cos, sin, *(v or ()))
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise PpalliError(f"rope needs q and k to share B, T and D, got {tuple(q.shape)} and {tuple(k.shape)}")
    cos, sin = _prepare_cos_sin(q, cos, sin)
    q_out, k_out = out or (None, None)
    q_norm, k_norm = _norm_pair(qk_norms)
    return (_rope_one(q, cos, sin, backward, q_out, norm=q_norm),
            _rope_one(k, cos, sin, backward, k_out, v, norm=k_norm))


def rope_into_cache(q, k, v, cos, sin, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor,
                    qk_norms: tuple | None = None):
    """Decoding's RoPE with the cache write folded in: q (B, Hq, T, D) rotated into new memory as rope_fwd does; k
    rotated and v copied straight into keys, values (B, Hk, L, D) at slots slot.. slot + T - 1, slot a device
    scalar (a static cache's length, so a CUDA graph replays it at every step) -> rotated q. The caller moves
    slot on. Replaces the cache's own update (arange, two adds, two index_copy_) and rope's k output. qk_norms
    as rope_fwd takes them."""
    check_tensors(q, k, v, cos, sin, keys, values, slot)
    if keys.shape[:2] != k.shape[:2] or keys.shape[3] != k.shape[3] or values.shape != keys.shape \
            or v.shape != k.shape:
        raise PpalliError(f"rope_into_cache needs k, v (B, Hk, T, D) and a cache (B, Hk, L, D), got "
                          f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    cos, sin = _prepare_cos_sin(q, cos, sin)
    q_norm, k_norm = _norm_pair(qk_norms)
    _rope_one(k, cos, sin, False, keys, (v, values), slot=slot, norm=k_norm)
    return _rope_one(q, cos, sin, False, norm=q_norm)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q_out, k_out = rope_fwd(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = rope_fwd(dq_out, dk_out, cos, sin, backward=True)
        return dq, dk, None, None  # cos/sin come from a no-grad buffer in HF (inv_freq): no gradient


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) by HF's cos/sin (B, T, D); returns (q_out, k_out)."""
    return RoPEFunction.apply(q, k, cos, sin)


# (tokens a program, heads a step, warps) of rope_lora_fwd for a head dim of 64 or less / above 64. H200,
# 2026-12-03, medians of three runs (results/2026-12-03-h200-rope-best.txt): 1B q 0.0551 ms, k 0.0202; 8B q
# 0.0599, k 0.0200. The kernel before it (a program per token block and head block, 16 x 2 x 4 / 16 x 1 x 4,
# results/2026-12-03-h200-rope-lora.json) took 0.0692, 0.0228, 0.0746, 0.0226 in the same runs, and the addmm_
# then RoPE that both replace 0.1268 / 0.0599 / 0.1305 / 0.0580. Reading cos/sin's first half only (HF's
# tables repeat it) gained 2% at these settings (0.0539 at 1B q): not worth assuming it.
LORA_BLOCKS = {64: (16, 2, 4), 128: (16, 2, 4)}


def rope_lora_fwd(y: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, s: float, cos: torch.Tensor,
                  sin: torch.Tensor, batch: int, head_dim: int, blocks: tuple[int, int, int] | None = None):
    """RoPE of y + s xa b^T, the LoRA term added in the same pass instead of by an addmm_ that reads and writes y
    first. y (N, H*D) a projection's base output (rows of unit stride), xa (N, r) = x A^T, b (H*D, r) in y's
    dtype, cos/sin as rope_fwd takes them, N = batch * T -> rotated (B, H, T, D) in new (B, T, H, D) memory.
    The sum is rotated in fp32, not rounded to y's dtype first."""
    check_tensors(y, xa, b, cos, sin)
    n, width = y.shape
    r = b.shape[1]
    if width % head_dim or n % batch or b.shape[0] != width or xa.shape != (n, r) or y.stride(1) != 1 \
            or xa.stride(1) != 1:
        raise PpalliError(f"rope_lora_fwd needs y (N, H*D) with D = {head_dim}, xa (N, r) and b (H*D, r) with "
                          f"unit-stride rows, got {tuple(y.shape)}, {tuple(xa.shape)}, {tuple(b.shape)}")
    heads, n_t = width // head_dim, n // batch
    view = y.view(batch, n_t, heads, head_dim).transpose(1, 2)  # (B, H, T, D), to check cos/sin against
    cos, sin = _prepare_cos_sin(view, cos, sin)
    bt, bh, warps = blocks or LORA_BLOCKS[64 if head_dim <= 64 else 128]
    block_d = next_power_of_2(head_dim // 2)
    out = torch.empty_like(y)
    _rope_lora_fwd_kernel[((n + bt - 1) // bt,)](
        out, y, xa, b.contiguous(), cos, sin, out.stride(0), y.stride(0), xa.stride(0), cos.stride(0),
        cos.stride(1), n, n_t, heads, head_dim // 2, r, float(s), HEAD_D=head_dim, BT=bt, BH=bh, BLOCK_D=block_d,
        RP=max(16, next_power_of_2(r)), IEEE=y.dtype == torch.float32, UPCAST=dot_upcast(y.dtype), num_warps=warps)
    return out.view(batch, n_t, heads, head_dim).transpose(1, 2)
