"""Attention of one new token per row against a KV cache, split along the cache (flash-decoding), GQA native.

A decode step's query is one token: SDPA's flash and cuDNN kernels give each (row, head group) one program that
walks the whole cache, so a batch of one keeps 8 of an H200's 132 SMs busy (Llama's 8 kv heads). On an H200 the
cuDNN kernel took 8.9 us a layer of Llama-3.1-8B with 256 slots (2026-12-04, results/2026-12-04-h200-s22-decode-
profile-8b-layers-2.txt), and its work grows with the slots while the grid does not. Here the cache is cut into
splits that run side by side and a second launch folds them:

    split s of kv head j:  m_s = max_l score,  l_s = sum_l exp(score - m_s),  acc_s = sum_l exp(score - m_s) v_l
    fold:                  out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s,   M = max_s m_s

with score = scale q . k_l over the slots l that `valid` keeps (Gemma 2: softcap tanh(score / softcap), the logit
softcapping HF's eager attention applies before its mask). The G = Hq / Hk query heads of a kv head are the rows
of one (G, D) tile against that head's keys, so the cache is read once per kv head (no repeated copy). fp32
inside; q, k, v in the model's dtype, k and v any strides with a unit one on D (a StaticCache's tensors in place).
"""

from __future__ import annotations

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import (
    cdiv,
    check_tensors,
    dot,
    dot_upcast,
    jit,
    next_power_of_2,
    program_count,
    tanh,
    tl,
)

# Cache slots a program takes at least (and a step of its loop): fewer would make the fold's reads outweigh the
# split's. At most MAX_SPLITS splits: the fold holds a head's partials in one (splits, D) register tile. The first
# fold (a program per kv head walking its splits one by one) took 37.6 us a layer at 4096 slots (64 splits) against
# 8.8 for the splits themselves (H200, results/2026-12-04-h200-s22-decode-layers-8b-4096.txt).
MIN_SPLIT = 64
MAX_SPLITS = 64


@jit
def _decode_attention_fwd_kernel(ACC, ML, Q, K, V, VALID, q_sb, q_sh, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, n_kv,
                                 group, n_slots, split_len, dim, scale, softcap, HAS_VALID: tl.constexpr,
                                 SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BG: tl.constexpr,
                                 BL: tl.constexpr, BD: tl.constexpr):
    # Program (b * n_kv + j, s): query heads j*group.. of row b against slots s*split_len.. of kv head j.
    bj, split = tl.program_id(0), tl.program_id(1)
    b, j = (bj // n_kv).to(tl.int64), bj % n_kv
    g, d = tl.arange(0, BG), tl.arange(0, BD)
    g_ok, d_ok = g < group, d < dim
    q = tl.load(Q + b * q_sb + (j * group + g[:, None]) * q_sh + d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                other=0.0)  # (BG, BD)
    m = tl.full((BG,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BG,), dtype=tl.float32)
    acc = tl.zeros((BG, BD), dtype=tl.float32)
    start = split * split_len
    for l0 in range(start, tl.minimum(start + split_len, n_slots), BL):
        slots = l0 + tl.arange(0, BL)
        keep = slots < n_slots
        if HAS_VALID:
            keep &= tl.load(VALID + b * n_slots + slots, mask=slots < n_slots, other=0) != 0
        kv_mask = keep[:, None] & d_ok[None, :]
        k = tl.load(K + b * k_sb + j * k_sh + slots[:, None] * k_sl + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * v_sb + j * v_sh + slots[:, None] * v_sl + d[None, :], mask=kv_mask, other=0.0)
        s = dot(q, tl.trans(k), IEEE, UPCAST) * scale  # (BG, BL)
        if SOFTCAP:
            s = softcap * tanh(s / softcap)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no slot kept yet: exp(-inf) = 0, not nan
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE, UPCAST)
        m = m_new
    row = (bj * tl.num_programs(1) + split) * BG + g  # (BG,) rows of the (B*Hk, splits, BG) partials
    tl.store(ACC + row[:, None] * BD + d[None, :], acc, mask=g_ok[:, None])  # the padding rows stay unwritten
    tl.store(ML + row * 2, m, mask=g_ok)
    tl.store(ML + row * 2 + 1, total, mask=g_ok)


@jit
def _decode_attention_fold_kernel(OUT, ACC, ML, n_kv, group, n_splits, dim, o_sb, BG: tl.constexpr,
                                  BS: tl.constexpr, BD: tl.constexpr):
    # Program (b * n_kv + j) * group + g: query head j*group + g of row b, its n_splits partials in one (BS, BD) tile.
    pid = tl.program_id(0)
    bj, g = pid // group, pid % group
    b, j = (bj // n_kv).to(tl.int64), bj % n_kv
    s, d = tl.arange(0, BS), tl.arange(0, BD)
    s_ok = s < n_splits
    rows = (bj * n_splits + s) * BG + g  # (BS,)
    m = tl.load(ML + rows * 2, mask=s_ok, other=float("-inf"))
    big = tl.max(m, axis=0)
    w = tl.exp(m - tl.where(big == float("-inf"), 0.0, big))  # (BS,), 0 for splits that kept no slot
    total = tl.sum(w * tl.load(ML + rows * 2 + 1, mask=s_ok, other=0.0), axis=0)
    acc = tl.load(ACC + rows[:, None] * BD + d[None, :], mask=s_ok[:, None], other=0.0)  # (BS, BD)
    out = tl.sum(w[:, None] * acc, axis=0) / total  # (BD,)
    tl.store(OUT + b * o_sb + (j * group + g) * dim + d, out.to(OUT.dtype.element_ty), mask=d < dim)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None,
                     scale: float | None = None, splits: int | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """q (B, Hq, D) one new token a row; k, v (B, Hk, L, D) the cache; valid (B, L) bool, the slots each row
    attends to (None: all L) -> (B, Hq * D) in q's dtype. Every row needs at least one valid slot.
    softcap: scores become softcap * tanh(score / softcap) (Gemma 2's attn_logit_softcapping); None or 0: off.
    splits: cache splits (default: enough programs for ~4 a SM, each at least MIN_SPLIT slots, at most
    MAX_SPLITS)."""
    check_tensors(q, k, v, *([valid] if valid is not None else []))
    n_b, n_q, dim = q.shape
    n_kv, n_slots = k.shape[1], k.shape[2]
    if k.shape != (n_b, n_kv, n_slots, dim) or v.shape != k.shape or n_q % n_kv:
        raise PpalliError(f"decode_attention needs q (B, Hq, D) and k, v (B, Hk, L, D) with Hk dividing Hq, got "
                          f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if valid is not None and (valid.shape != (n_b, n_slots) or valid.dtype != torch.bool):
        raise PpalliError(f"decode_attention: valid must be ({n_b}, {n_slots}) bool, got {tuple(valid.shape)} "
                          f"{valid.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    group = n_q // n_kv
    if splits is None:
        splits = max(1, min(cdiv(n_slots, MIN_SPLIT), cdiv(4 * program_count(q.device), n_b * n_kv)))
    splits = min(splits, MAX_SPLITS)
    split_len = cdiv(cdiv(n_slots, splits), MIN_SPLIT) * MIN_SPLIT
    splits = cdiv(n_slots, split_len)
    bg, bd = max(16, next_power_of_2(group)), next_power_of_2(dim)  # tl.dot's least M is 16
    acc = torch.empty(n_b * n_kv * splits * bg, bd, dtype=torch.float32, device=q.device)
    ml = torch.empty(n_b * n_kv * splits * bg, 2, dtype=torch.float32, device=q.device)
    valid_arg = valid.contiguous().view(torch.uint8) if valid is not None else q
    _decode_attention_fwd_kernel[(n_b * n_kv, splits)](
        acc, ml, q, k, v, valid_arg, q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3], n_kv, group,
        n_slots, split_len, dim, float(scale if scale is not None else dim ** -0.5), float(softcap or 1.0),
        HAS_VALID=valid is not None, SOFTCAP=bool(softcap), IEEE=q.dtype == torch.float32, UPCAST=dot_upcast(q.dtype),
        BG=bg, BL=MIN_SPLIT, BD=bd, num_warps=4)
    out = torch.empty(n_b, n_q * dim, dtype=q.dtype, device=q.device)
    _decode_attention_fold_kernel[(n_b * n_q,)](out, acc, ml, n_kv, group, splits, dim, out.stride(0), BG=bg,
                                                BS=next_power_of_2(splits), BD=bd, num_warps=4)
    return out
