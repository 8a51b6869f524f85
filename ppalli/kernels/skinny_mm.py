"""Products of a tall (N, K) matrix with a rank-r factor: the LoRA GEMMs that cuBLAS runs below bandwidth.

Every LoRA layer's rank-r products read one big activation and touch r = 8..64 columns of anything else:

    skinny_mm:   out = s X W         X (N, K), W (K, R) -> (N, R)   x A^T, s dy B
    skinny_tmm:  out = s X^T S       X (N, K), S (N, R) -> (K, R)   dB = s dy^T (x A^T), dA^T = x^T (s dy B)

Both are bound by reading X once (N K bf16: 64 MB for Llama-3.1-8B at N = 8192, K = 4096, ~23 us at the
H100's ~2.9 TB/s). cuBLAS's kernels for them (`nvjet_*_32x64_*`, `*_splitK_*` in
benchmarks/results/*-t1-profile-ppalli-s5.txt) took 41 and 24-31 us there, 7 and 7 calls a layer.

skinny_mm: each program owns BM rows and walks K in BK chunks, the (BM, R) sums in registers.
skinny_tmm: each program owns BK columns of X and walks a run of rows, the (BK, R) sums in registers; a run's
sums go to an fp32 buffer (runs, K, R) that one torch.sum folds (the reduction runs over N, the long side,
so splitting it is what gives enough programs). fp32 accumulation, bf16/fp16 tl.dot inputs, as cuBLAS.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import cdiv, check_tensors, dot_upcast, jit, next_power_of_2, program_count, tl


class SkinnyTiles(NamedTuple):
    """bm rows x bk columns of X a step, warps, pipeline stages; skinny_tmm: programs per SM (runs)."""

    bm: int
    bk: int
    warps: int
    stages: int
    runs_per_sm: int = 4


MM_TILES = SkinnyTiles(32, 128, 4, 4)
TMM_TILES = SkinnyTiles(64, 64, 4, 3, 4)


@jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation (UPCAST: fp32 copies, for the CPU interpreter's bf16 dot, see _utils)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@jit
def _skinny_mm_fwd_kernel(OUT, X, W, N, K, R, sxn, swk, swr, scale, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                          BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, STAGES: tl.constexpr):
    # Program i: rows i*BM.., out[rows, :] = scale * X[rows, :] @ W, K walked in BK chunks.
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    r = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        k = k0 + tl.arange(0, BK)
        x = tl.load(X + rows[:, None] * sxn + k[None, :], mask=(rows[:, None] < N) & (k[None, :] < K), other=0.0)
        w = tl.load(W + k[:, None] * swk + r[None, :] * swr, mask=(k[:, None] < K) & (r[None, :] < R), other=0.0)
        acc += _dot(x, w, IEEE, UPCAST)  # (BM, BK) @ (BK, RP)
    tl.store(OUT + rows[:, None] * R + r[None, :], (acc * scale).to(OUT.dtype.element_ty),
             mask=(rows[:, None] < N) & (r[None, :] < R))


@jit
def _skinny_tmm_fwd_kernel(P, X, S, N, K, R, sxn, ssn, run_rows, scale, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                           BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, STAGES: tl.constexpr):
    # Program (run, j): columns j*BK.. of X over rows run*run_rows..;
    # P[run, cols, :] = scale * X[rows, cols]^T S[rows, :] (the scale here, not in a launch after the fold).
    run = tl.program_id(0)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    r = tl.arange(0, RP)
    acc = tl.zeros((BK, RP), dtype=tl.float32)
    start = run.to(tl.int64) * run_rows
    for r0 in tl.range(start, tl.minimum(start + run_rows, N), BM, num_stages=STAGES):
        rows = r0 + tl.arange(0, BM)
        x = tl.load(X + rows[:, None] * sxn + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K),
                    other=0.0)
        s = tl.load(S + rows[:, None] * ssn + r[None, :], mask=(rows[:, None] < N) & (r[None, :] < R), other=0.0)
        acc += _dot(tl.trans(x), s, IEEE, UPCAST)  # (BK, BM) @ (BM, RP)
    tl.store(P + (run * K + cols[:, None]) * RP + r[None, :], acc * scale, mask=cols[:, None] < K)


def _check(x: torch.Tensor, f: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or f.dim() != 2 or x.stride(1) != 1:
        raise PpalliError(f"{name} needs a 2-D X with unit column stride and a 2-D factor, got {tuple(x.shape)} "
                          f"(strides {x.stride()}) and {tuple(f.shape)}")
    if f.shape[1] > 128:
        raise PpalliError(f"{name} is for rank-r factors (at most 128 columns), got {tuple(f.shape)}")
    check_tensors(x, f)


def skinny_mm(x: torch.Tensor, w: torch.Tensor, scale: float = 1.0, tiles: SkinnyTiles = MM_TILES) -> torch.Tensor:
    """scale * x @ w: x (N, K) with unit column stride, w (K, R) any strides (A.t() of a lora_A weight is
    read in place) -> (N, R) in x's dtype."""
    _check(x, w, "skinny_mm")
    n, k = x.shape
    if w.shape[0] != k:
        raise PpalliError(f"skinny_mm: x is {tuple(x.shape)} but w is {tuple(w.shape)}")
    w = w.to(x.dtype)
    rank = w.shape[1]
    out = torch.empty(n, rank, dtype=x.dtype, device=x.device)
    _skinny_mm_fwd_kernel[(cdiv(n, tiles.bm),)](
        out, x, w, n, k, rank, x.stride(0), w.stride(0), w.stride(1), float(scale),
        IEEE=x.dtype == torch.float32, UPCAST=dot_upcast(x.dtype), BM=tiles.bm, BK=tiles.bk,
        RP=max(16, next_power_of_2(rank)), STAGES=tiles.stages, num_warps=tiles.warps)
    return out


def skinny_tmm(x: torch.Tensor, s: torch.Tensor, scale: float = 1.0, out_dtype: torch.dtype | None = None,
               tiles: SkinnyTiles = TMM_TILES) -> torch.Tensor:
    """scale * x^T @ s: x (N, K) with unit column stride, s (N, R) with unit column stride -> (K, R) in
    out_dtype (default x's), summed in fp32 over the whole of N (a weight gradient: ask for the adapter's
    fp32 and it is never rounded to bf16 on the way)."""
    _check(x, s, "skinny_tmm")
    n, k = x.shape
    if s.shape[0] != n or s.stride(1) != 1:
        raise PpalliError(f"skinny_tmm: x is {tuple(x.shape)} but s is {tuple(s.shape)} (strides {s.stride()})")
    s = s.to(x.dtype)
    rank, rp = s.shape[1], max(16, next_power_of_2(s.shape[1]))
    col_blocks = cdiv(k, tiles.bk)
    runs = min(cdiv(n, tiles.bm), max(1, cdiv(tiles.runs_per_sm * program_count(x.device), col_blocks)))
    run_rows = cdiv(cdiv(n, tiles.bm), runs) * tiles.bm
    runs = cdiv(n, run_rows)
    part = torch.empty(runs, k, rp, dtype=torch.float32, device=x.device)
    _skinny_tmm_fwd_kernel[(runs, col_blocks)](
        part, x, s, n, k, rank, x.stride(0), s.stride(0), run_rows, float(scale),
        IEEE=x.dtype == torch.float32, UPCAST=dot_upcast(x.dtype), BM=tiles.bm, BK=tiles.bk, RP=rp,
        STAGES=tiles.stages, num_warps=tiles.warps)
    total = part.sum(0) if runs > 1 else part[0]  # (K, RP) fp32
    return total[:, :rank].to(out_dtype or x.dtype)
