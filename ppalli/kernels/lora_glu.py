"""The gated activation of a LoRA MLP with the adapters' rank-r terms folded in: SwiGLU or GeGLU.

With LoRA on gate and up, g = g0 + sg (x Ag^T) Bg^T and u = u0 + su (x Au^T) Bu^T, where g0 = x Wg^T and
u0 = x Wu^T come from the base GEMMs. Adding each rank-r product with cuBLAS (addmm_ into g0) reads and
writes the whole (N, I) output: for Llama-3.1-8B at N = 8192 tokens, 4 passes of 235 MB per layer forward,
~0.4 ms on an H100 (the `badd` kernels of benchmarks/results/*-t1-profile-ppalli-1.txt). Here each tile of
the activation kernel computes its own (BM, r) x (r, BN) products with tl.dot and never writes g or u:

    forward:   h  = act(g) * u                                       reads g0, u0; writes h
    backward:  dh = dh0 + (sd dy Bd) Ad    (down's LoRA input-gradient term, same trick)
               dg = dh * u * act'(g),  du = dh * act(g)              written over g0 and u0
               dBg = sg dg^T (x Ag^T), dBu = su du^T (x Au^T), dAd = (sd dy Bd)^T h     summed over rows

The three weight gradients are sums over the N rows of products of tiles the backward already holds, so
each program walks a column block down a run of rows and keeps its (BN, r) sums in registers; a run's sums
go to a small fp32 buffer that one torch.sum folds. Done with cuBLAS they read dg, du and h (written only
for this) from memory again: 4 passes of (N, I) a layer, ~1 GB for Llama-3.2-1B at 16384 tokens.
The block saves g0 and u0 (the same bytes as g and u) and the backward re-forms g and u in registers.
fp32 inside; the rank-r products take bf16/fp16 inputs with fp32 accumulation, as cuBLAS's GEMMs do, and
the weight gradients are those of the rounded dg, du, h that cuBLAS would have read.
act: 0 = silu (SwiGLU: Llama, Qwen, Mistral), 1 = gelu_tanh (GeGLU: Gemma).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import (
    cdiv,
    check_tensors,
    device_name,
    dot,
    dot_upcast,
    fast_math,
    jit,
    next_power_of_2,
    program_count,
    sigmoid,
    tanh_fast,
    tl,
)
from ppalli.kernels.lora_linear import scaled_mm

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_COEF = tl.constexpr(0.044715)
ACTS = {"silu": 0, "gelu_tanh": 1}


class Tiles(NamedTuple):
    """A launch setting: (bm, bn) tile of the (N, I) activation, warps, the programs per SM that split the
    rows (backward) or columns (fwd_had) into runs (more runs: shorter tail, more partial sums to fold),
    Triton's software-pipeline stages for the tile loop (3 is its default on CUDA), and `runs`, when above 0,
    the row runs (backward) or column runs (fwd_had) whatever the shape and SM count (runs_per_sm is then
    unused)."""

    bm: int
    bn: int
    warps: int
    runs_per_sm: int = 4
    stages: int = 3
    runs: int = 0


# From benchmarks/bench_lora_glu.py on an H100 (2026-11-25, results/2026-11-25-h100-lora-glu-tiles.json), N x I
# 8192 x 14336 and 16384 x 8192 in bf16. Forward: 32 x 128 runs at 2774-2798 GB/s (a copy: 2938-2951), 64 x 128
# at 2324-2360. Backward: 32 x 64, 4 warps, 8 programs per SM: 0.557 and 0.627 ms (2107 and 2140 GB/s over
# its 5 passes) with the three sums; 64 x 128 tiles with 4 warps spill registers and take 2.5-3.0 ms.
FWD_TILES = Tiles(32, 128, 4)
# With down's h Ad^T summed in (lora_glu_fwd_had), programs walk runs of columns, runs_per_sm sets how many
# (results/2026-11-25-h100-lora-glu-fwd-had.json): 32 x 64 tiles with 16 programs per SM took 0.348 and
# 0.379 ms against 0.386 and 0.438 for the forward then cuBLAS's h Ad^T; 32 x 128 tiles lost (0.386-0.475).
FWD_HAD_TILES = Tiles(32, 64, 2, 16)
# Why 2 warps (the H100's and H200's sweeps below found them fastest, and other GPUs now take them too): with
# h Ad^T summed in, Triton lays the whole tile out for that dot, whose (BM, RP) output splits across at most
# BM / 16 warps, so more warps than that hold and compute the same elements again. sm_90 SASS of the loop
# (triton 3.6, 2026-12-06): 3.0 FMULs an element on 32 x 64 or 32 x 128 tiles with 2 warps, 6.0 with 4,
# 12.0 on 16 x 128 with 4 (tests/unit/kernels/test_lora_glu.py holds warps * 16 <= bm).
# On an H200 (2026-12-02, results/2026-12-02-h200-lora-glu-tiles.json) the same 32 x 64 tiles on 2 warps ran
# at 3236 / 2948 GB/s (0.218 / 0.273 ms, 8B / 1B shapes) against 2042 / 2121 GB/s (0.345 / 0.380 ms) on 4; a
# copy runs at ~4100.
# The column runs fixed at 3 (2026-12-03, results/2026-12-03-h200-lora-glu-runs.txt): 8B 0.210 ms, 1B 0.244,
# against 0.216 / 0.272 for the 9 / 5 runs that 16 programs a SM gave. Run counts that are multiples of 3 ran
# fastest at both shapes (3, 6, 9, 12: 0.210-0.215 / 0.243-0.251 ms; 4, 5, 7, 8, 10: 0.231-0.292 / 0.255-0.274).
# The H100's sweep with 2-warp settings (2026-12-05, results/2026-12-05-h100-s31-lora-glu-tiles.txt): 32 x 128
# tiles on 2 warps, 16 programs per SM, 0.284 / 0.322 ms (8B / 1B, 2481 / 2504 GB/s) against 0.341 / 0.379 for
# FWD_HAD_TILES; the H200's fixed 3 runs of 32 x 64 took 0.291 / 0.330 there (a copy: ~2930 GB/s).
FWD_HAD_TILES_BY_GPU = {"NVIDIA H200": Tiles(32, 64, 2, 16, 3, runs=3),
                        "NVIDIA H100 80GB HBM3": Tiles(32, 128, 2, 16)}
# Pipeline stages and 16-row tiles (results/2026-11-25-h100-lora-glu-stages.json): Triton's default 3 stages
# stay best for both kernels (1 or 2: 12-40% slower); the backward on 16 x 64 tiles took 0.536 / 0.602 ms
# against 0.554 / 0.615 for 32 x 64 (8B / 1B), the forward lost on them (0.59-0.68 against 0.35-0.39).
BWD_TILES = Tiles(16, 64, 4, 8)
# On the H200 (2026-12-02, results/2026-12-02-h200-lora-glu-tiles-2.json) both shapes were fastest with the
# rows in 5 runs, which programs per SM give only shape by shape: 8B (224 column blocks) 8 per SM = 5 runs,
# 0.472 ms (4 per SM = 3 runs: 0.596; 16 = 10 runs: 0.482); 1B (128 column blocks) 4 per SM = 5 runs, 0.487 ms
# (8 per SM = 9 runs: 0.529). So the H200 fixes the run count: 8B as before, 1B 0.04 ms a layer faster.
# The same H100 sweep: 32 x 64 tiles 0.503 / 0.560 ms against BWD_TILES' 0.523 / 0.591 (8B / 1B); the H200's 5
# row runs gave 0.523 / 0.540, so 1B's best there, but 8B's (T1's) is the 32-row tile.
BWD_TILES_BY_GPU = {"NVIDIA H200": Tiles(16, 64, 4, 8, 3, runs=5), "NVIDIA H100 80GB HBM3": Tiles(32, 64, 4, 8)}
# ncu on the H200 (2026-12-03, results/2026-12-03-h200-ncu-lora-glu.txt, 1B shape): the backward 464 us at 2.86
# TB/s, 96 registers, 5 programs an SM (31% occupancy), 45% of its stalls on loads into registers; fwd_had 233
# us at 3.42 TB/s. The (N, I) tiles moved through TMA descriptors instead, pipelined in shared memory (05afb50,
# results/2026-12-03-h200-lora-glu-tma.txt): backward 1B 0.522-1.08 ms against 0.473, 8B at best 0.451 against
# 0.455; fwd_had 0.241 against 0.246 (1B), 0.213 against 0.216 (8B), within run-to-run spread. Not kept.


@jit
def _xa_tile(XA, xa_stride, rows, N, R, RP: tl.constexpr):
    """Rows of an (N, R) rank-r product with row stride xa_stride (a column slice of the stacked x [Ag; Au]^T
    is read in place) as a (BM, RP) tile in its own dtype, zero past N and R."""
    k = tl.arange(0, RP)
    return tl.load(XA + rows[:, None] * xa_stride + k[None, :], mask=(rows[:, None] < N) & (k[None, :] < R),
                   other=0.0)


@jit
def _b_tile(B, cols, M, R, B_ROWS_ARE_COLS: tl.constexpr, RP: tl.constexpr):
    """(RP, BN) tile of B^T: B is (M, R) when B_ROWS_ARE_COLS (a lora_B weight), else (R, M) (a lora_A
    weight); M is the intermediate size I."""
    k = tl.arange(0, RP)
    mask = (cols[None, :] < M) & (k[:, None] < R)
    if B_ROWS_ARE_COLS:
        return tl.load(B + cols[None, :] * R + k[:, None], mask=mask, other=0.0)
    return tl.load(B + k[:, None] * M + cols[None, :], mask=mask, other=0.0)


@jit
def _act(g, ACT: tl.constexpr, FAST: tl.constexpr):
    """(act(g), act'(g)) in fp32; FAST: sigmoid's and tanh's PTX approximations (_utils.fast_math)."""
    if ACT == 0:
        sig = sigmoid(g, FAST)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    t = tanh_fast(SQRT_2_OVER_PI * (g + GELU_COEF * g * g * g), FAST)
    da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_COEF * g * g)
    return 0.5 * g * (1.0 + t), da


@jit
def _offsets(rows, cols, M, row_end, col_end):
    """Offsets of a (rows, cols) tile of a row-major (N, M) tensor, and the mask of rows < row_end and
    cols < col_end (a run's limits, at most N and M)."""
    return rows[:, None] * M + cols[None, :], (rows[:, None] < row_end) & (cols[None, :] < col_end)


@jit
def _gate_up(g0, u0, xag, bg, xau, bu, sg, su, HAS_G: tl.constexpr, HAS_U: tl.constexpr,
             IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """g and u of one tile in fp32: the loaded base outputs plus the rank-r terms from the factor tiles."""
    g = g0.to(tl.float32)
    u = u0.to(tl.float32)
    if HAS_G:
        g += dot(xag, bg, IEEE, UPCAST) * sg
    if HAS_U:
        u += dot(xau, bu, IEEE, UPCAST) * su
    return g, u


@jit
def _fwd_loads(G0, U0, BG, BU, AD, offs, mask, cols, M, R, HAS_G: tl.constexpr, HAS_U: tl.constexpr,
               HAS_AD: tl.constexpr, RP: tl.constexpr):
    """What the forward reads for one (BM, BN) tile: g0, u0 at offs (zero outside mask) and the (RP, BN) factor
    tiles (an absent adapter's is a zero tile)."""
    zero = tl.zeros((RP, cols.shape[0]), dtype=G0.dtype.element_ty)
    return (tl.load(G0 + offs, mask=mask, other=0.0), tl.load(U0 + offs, mask=mask, other=0.0),
            _b_tile(BG, cols, M, R, True, RP) if HAS_G else zero, _b_tile(BU, cols, M, R, True, RP) if HAS_U else zero,
            _b_tile(AD, cols, M, R, False, RP) if HAS_AD else zero)


@jit
def _bwd_loads(G0, U0, DH0, XAG, xag_stride, XAU, xau_stride, XAD, offs, mask, rows, N, R, HAS_G: tl.constexpr,
               HAS_U: tl.constexpr, HAS_D: tl.constexpr, RP: tl.constexpr):
    """What the backward reads for one (BM, BN) tile: g0, u0, dh0 at offs (zero outside mask) and the (BM, RP)
    rank-r rows (an absent adapter's is a zero tile, all zero past N rows: the run's row limit)."""
    zero = tl.zeros((rows.shape[0], RP), dtype=G0.dtype.element_ty)
    return (tl.load(G0 + offs, mask=mask, other=0.0), tl.load(U0 + offs, mask=mask, other=0.0),
            tl.load(DH0 + offs, mask=mask, other=0.0),
            _xa_tile(XAG, xag_stride, rows, N, R, RP) if HAS_G else zero,
            _xa_tile(XAU, xau_stride, rows, N, R, RP) if HAS_U else zero,
            _xa_tile(XAD, R, rows, N, R, RP) if HAS_D else zero)


@jit
def _store_sums(P, acc, run, idx, M, RP: tl.constexpr):
    """A run's fp32 sums, (B, RP) for the B indices idx of M, into P[run, idx, :] of a (runs, M, RP) buffer:
    the backward's (BN, RP) weight-gradient sums over columns, the forward's (BM, RP) h Ad^T over rows."""
    k = tl.arange(0, RP)
    tl.store(P + (run * M + idx[:, None]) * RP + k[None, :], acc, mask=idx[:, None] < M)


@jit(rows=("N",))
def _lora_glu_fwd_kernel(H, P, G0, U0, XAG, xag_stride, BG, XAU, xau_stride, BU, AD, N, M, R, run_cols, sg, su,
                         ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, HAS_AD: tl.constexpr,
                         STORE_H: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr):
    # Program (i, run): rows i*BM.. across the columns run*run_cols.. in (BM, BN) tiles (one tile when
    # run_cols == BN). With AD (down's lora_A, (R, M)), the run's share of h Ad^T, (BM, RP) fp32, goes to
    # P[run, rows, :] and one torch.sum over the runs finishes it.
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    run = tl.program_id(1)
    xag = _xa_tile(XAG, xag_stride, rows, N, R, RP) if HAS_G else None  # (BM, RP), loaded once for the run
    xau = _xa_tile(XAU, xau_stride, rows, N, R, RP) if HAS_U else None
    had = tl.zeros((BM, RP), dtype=tl.float32)
    start = run * run_cols
    end = tl.minimum(start + run_cols, M)
    for c0 in range(start, end, BN):
        cols = c0 + tl.arange(0, BN)
        offs, mask = _offsets(rows, cols, M, N, end)
        g0, u0, bg, bu, ad = _fwd_loads(G0, U0, BG, BU, AD, offs, mask, cols, M, R, HAS_G, HAS_U, HAS_AD, RP)
        g, u = _gate_up(g0, u0, xag, bg, xau, bu, sg, su, HAS_G, HAS_U, IEEE, UPCAST)
        a, _ = _act(g, ACT, FAST)
        h = (a * u).to(H.dtype.element_ty)  # rounded as stored: the product cuBLAS would read back
        if STORE_H:
            tl.store(H + offs, h, mask=mask)
        if HAS_AD:
            had += dot(h, tl.trans(ad), IEEE, UPCAST)  # (BM, BN) @ (BN, RP)
    if HAS_AD:
        _store_sums(P, had, run, rows, N, RP)


@jit(rows=("N",))
def _lora_glu_bwd_kernel(DG, DU, DH0, G0, U0, XAG, xag_stride, BG, XAU, xau_stride, BU, XAD, AD,
                         PBG, PBU, PAD, N, M, R, run_rows, sg, su,
                         ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, HAS_D: tl.constexpr,
                         SUM_BG: tl.constexpr, SUM_BU: tl.constexpr, SUM_AD: tl.constexpr, IEEE: tl.constexpr,
                         UPCAST: tl.constexpr, FAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         RP: tl.constexpr):
    # Program (run, c): columns c*BN.. of rows run*run_rows.. in (BM, BN) tiles; DG, DU may be G0, U0 (each
    # tile is read before it is written, by the same program).
    run = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    bg = _b_tile(BG, cols, M, R, True, RP) if HAS_G else None  # (RP, BN), loaded once for the whole run
    bu = _b_tile(BU, cols, M, R, True, RP) if HAS_U else None
    ad = _b_tile(AD, cols, M, R, False, RP) if HAS_D else None
    sum_bg = tl.zeros((BN, RP), dtype=tl.float32)  # sum over rows of dg^T xag, then the same for du, h
    sum_bu = tl.zeros((BN, RP), dtype=tl.float32)
    sum_ad = tl.zeros((BN, RP), dtype=tl.float32)
    start = run.to(tl.int64) * run_rows
    end = tl.minimum(start + run_rows, N)
    # The next tile's loads issued one step early by hand (2026-12-03) ran 10-40% slower on the H200, in this
    # kernel and the forward (results/2026-12-03-h200-lora-glu-prefetch.txt): Triton's pipelining covers it.
    for r0 in range(start, end, BM):
        rows = r0 + tl.arange(0, BM)
        offs, mask = _offsets(rows, cols, M, end, M)
        g0, u0, dh0, xag, xau, xad = _bwd_loads(G0, U0, DH0, XAG, xag_stride, XAU, xau_stride, XAD, offs, mask,
                                                rows, end, R, HAS_G, HAS_U, HAS_D, RP)
        g, u = _gate_up(g0, u0, xag, bg, xau, bu, sg, su, HAS_G, HAS_U, IEEE, UPCAST)
        dh = dh0.to(tl.float32)
        if HAS_D:  # XAD is already s_d * dy Bd, (N, R) contiguous
            dh += dot(xad, ad, IEEE, UPCAST)
        a, da = _act(g, ACT, FAST)
        du = (dh * a).to(DU.dtype.element_ty)
        dg = (dh * u * da).to(DG.dtype.element_ty)
        tl.store(DU + offs, du, mask=mask)
        tl.store(DG + offs, dg, mask=mask)
        if SUM_BG:
            sum_bg += dot(tl.trans(dg), xag, IEEE, UPCAST)  # (BN, BM) @ (BM, RP)
        if SUM_BU:
            sum_bu += dot(tl.trans(du), xau, IEEE, UPCAST)
        if SUM_AD:
            sum_ad += dot(tl.trans((a * u).to(DG.dtype.element_ty)), xad, IEEE, UPCAST)
    if SUM_BG:
        _store_sums(PBG, sum_bg * sg, run, cols, M, RP)  # the scales here, not in a launch after the fold
    if SUM_BU:
        _store_sums(PBU, sum_bu * su, run, cols, M, RP)
    if SUM_AD:
        _store_sums(PAD, sum_ad, run, cols, M, RP)


def _factors(x: torch.Tensor, xa: torch.Tensor | None, b: torch.Tensor | None, rank: int):
    """(xa, its row stride, b) in x's dtype, xa's rows unit-stride (a column view of a stacked product is
    used in place), b contiguous; a dummy pointer when absent."""
    if xa is None:
        return x, 0, x
    if xa.shape[-1] != rank or b.shape[-1] != rank:
        raise PpalliError(f"lora_glu: every adapter needs the same rank, got {xa.shape[-1]} and {rank}")
    xa = xa.to(x.dtype)
    if xa.stride(-1) != 1:
        xa = xa.contiguous()
    return xa, xa.stride(0), b.to(x.dtype).contiguous()


def _launch_args(g0: torch.Tensor, up0: torch.Tensor, act: str, pairs) -> tuple:
    if act not in ACTS:
        raise PpalliError(f"lora_glu act must be one of {sorted(ACTS)}, got {act!r}")
    if g0.shape != up0.shape or g0.dim() != 2 or not (g0.is_contiguous() and up0.is_contiguous()):
        raise PpalliError(f"lora_glu needs contiguous (N, I) gate and up of one shape, got {tuple(g0.shape)}, "
                          f"{tuple(up0.shape)}")
    ranks = {xa.shape[-1] for xa, _ in pairs if xa is not None}
    rank = ranks.pop() if ranks else 1
    if ranks:
        raise PpalliError("lora_glu: the gate, up and down adapters must share one rank")
    check_tensors(g0, up0, *[t for pair in pairs for t in pair if t is not None])
    meta = dict(IEEE=g0.dtype == torch.float32, UPCAST=dot_upcast(g0.dtype), FAST=fast_math(),
                RP=max(16, next_power_of_2(rank)))
    return *g0.shape, rank, meta


def lora_glu_fwd(g0: torch.Tensor, up0: torch.Tensor, xag, bg, sg: float, xau, bu, su: float,
                 act: str = "silu", tiles: Tiles = FWD_TILES) -> torch.Tensor:
    """g0, up0 (N, I) base outputs; xag, xau (N, r) = x A^T or None; bg, bu (I, r) lora_B weights ->
    h = act(g0 + sg xag bg^T) * (up0 + su xau bu^T), (N, I) in g0's dtype."""
    return _fwd(g0, up0, xag, bg, sg, xau, bu, su, None, act, True, tiles)[0]


def lora_glu_fwd_had(g0: torch.Tensor, up0: torch.Tensor, xag, bg, sg: float, xau, bu, su: float, ad: torch.Tensor,
                     act: str = "silu", store_h: bool = True, tiles: Tiles | None = None):
    """lora_glu_fwd and, from the tiles it holds, h Ad^T for the down projection's lora_A ad (r, I) ->
    (h (N, I), or None when not store_h, and had (N, r)), both in g0's dtype. cuBLAS would read h back
    for that rank-r product: one more pass of (N, I), 235 MB a layer for Llama-3.1-8B at N = 8192.
    tiles: the launch setting swept for this GPU (FWD_HAD_TILES_BY_GPU), else FWD_HAD_TILES."""
    tiles = tiles or FWD_HAD_TILES_BY_GPU.get(device_name(g0.device), FWD_HAD_TILES)
    return _fwd(g0, up0, xag, bg, sg, xau, bu, su, ad, act, store_h, tiles)


def _fwd(g0, up0, xag, bg, sg, xau, bu, su, ad, act, store_h, tiles):
    has_ad = ad is not None
    n, i, rank, meta = _launch_args(g0, up0, act, [(xag, bg), (xau, bu), (ad.t() if has_ad else None, ad)])
    if has_ad and ad.shape != (rank, i):
        raise PpalliError(f"lora_glu: down's lora_A must be ({rank}, {i}), got {tuple(ad.shape)}")
    xag, xag_stride, bg = _factors(g0, xag, bg, rank)
    xau, xau_stride, bu = _factors(g0, xau, bu, rank)
    row_blocks = cdiv(n, tiles.bm)
    # without h Ad^T to sum, a program per tile; with it, runs of columns (partial sums per run)
    run_cols, runs = _runs(i, tiles.bn, row_blocks, tiles, g0.device) if has_ad else (tiles.bn, cdiv(i, tiles.bn))
    h = torch.empty_like(g0) if store_h else g0
    part = torch.empty(runs, n, meta["RP"], dtype=torch.float32, device=g0.device) if has_ad else g0
    _lora_glu_fwd_kernel[(row_blocks, runs)](
        h, part, g0, up0, xag, xag_stride, bg, xau, xau_stride, bu, ad.to(g0.dtype).contiguous() if has_ad else g0,
        n, i, rank, run_cols, float(sg), float(su), ACT=ACTS[act], HAS_G=xag is not g0,
        HAS_U=xau is not g0, HAS_AD=has_ad, STORE_H=store_h, BM=tiles.bm, BN=tiles.bn, **meta,
        num_warps=tiles.warps, num_stages=tiles.stages)
    had = part.sum(0)[:, :rank].to(g0.dtype) if has_ad else None  # (N, r)
    return (h if store_h else None), had


def _runs(n: int, block: int, other_blocks: int, tiles: Tiles, device: torch.device) -> tuple[int, int]:
    """(length per run, runs) that split n rows (backward) or columns (fwd_had) in `block`s among programs that
    each also take one of other_blocks: tiles.runs runs, else about runs_per_sm programs per SM in all; each run
    a whole number of blocks."""
    runs = tiles.runs or cdiv(tiles.runs_per_sm * program_count(device), other_blocks)
    runs = min(cdiv(n, block), max(1, runs))
    per_run = cdiv(cdiv(n, block), runs) * block
    return per_run, cdiv(n, per_run)


class GLUGrads(NamedTuple):
    """What lora_glu_bwd returns: dgate, dup (N, I), written over g0 and u0, and the adapters' weight
    gradients that were asked for (else None): dbg, dbu (I, r) and dad (r, I), in fp32."""

    dgate: torch.Tensor
    dup: torch.Tensor
    dbg: torch.Tensor | None
    dbu: torch.Tensor | None
    dad: torch.Tensor | None


def lora_glu_bwd(dh0: torch.Tensor, g0: torch.Tensor, up0: torch.Tensor, xag, bg, sg: float, xau, bu, su: float,
                 dxad=None, ad=None, act: str = "silu", sums: tuple[bool, bool, bool] = (False, False, False),
                 tiles: Tiles | None = None) -> GLUGrads:
    """The backward of lora_glu_fwd, written over g0 and up0.

    dh0 (N, I) = dy Wd, the down projection's base input gradient; dxad (N, r) = sd dy Bd and ad (r, I), its
    lora_A weight, add the adapter's term. sums = which of dBg = sg dg^T xag, dBu = su du^T xau and
    dAd = dxad^T h to form (each needs its adapter present). tiles: the launch setting swept for this GPU
    (BWD_TILES_BY_GPU), else BWD_TILES."""
    tiles = tiles or BWD_TILES_BY_GPU.get(device_name(g0.device), BWD_TILES)
    n, i, rank, meta = _launch_args(g0, up0, act, [(xag, bg), (xau, bu), (dxad, ad)])
    if dh0.shape != g0.shape or not dh0.is_contiguous():
        raise PpalliError(f"lora_glu_bwd: dh0 must be contiguous {tuple(g0.shape)}, got {tuple(dh0.shape)}")
    has = (xag is not None, xau is not None, dxad is not None)
    if any(s and not h for s, h in zip(sums, has)):
        raise PpalliError(f"lora_glu_bwd: weight-gradient sums {sums} asked for adapters that are absent {has}")
    xag, xag_stride, bg = _factors(g0, xag, bg, rank)
    xau, xau_stride, bu = _factors(g0, xau, bu, rank)
    dxad = dxad.to(g0.dtype).contiguous() if has[2] else g0
    ad = ad.to(g0.dtype).contiguous() if has[2] else g0
    n_cols = cdiv(i, tiles.bn)
    run_rows, runs = _runs(n, tiles.bm, n_cols, tiles, g0.device)
    # one (sums, runs, I, RP) buffer: each sum's (runs, I, RP) slice is contiguous, and one torch.sum folds all
    wanted = sum(sums)
    buffer = torch.empty(wanted, runs, i, meta["RP"], dtype=torch.float32, device=g0.device) if wanted else None
    slots = iter(range(wanted))
    partials = [buffer[next(slots)] if s else g0 for s in sums]
    _lora_glu_bwd_kernel[(runs, n_cols)](
        g0, up0, dh0, g0, up0, xag, xag_stride, bg, xau, xau_stride, bu, dxad, ad, *partials, n, i, rank,
        run_rows, float(sg), float(su), ACT=ACTS[act], HAS_G=has[0], HAS_U=has[1], HAS_D=has[2],
        SUM_BG=sums[0], SUM_BU=sums[1], SUM_AD=sums[2], BM=tiles.bm, BN=tiles.bn, **meta,
        num_warps=tiles.warps, num_stages=tiles.stages)
    folded = iter(buffer.sum(1)[..., :rank] if wanted else ())  # (sums, I, r)
    dbg, dbu, dad = (next(folded) if s else None for s in sums)  # (I, r) each
    return GLUGrads(g0, up0, dbg, dbu, dad.t() if sums[2] else None)


class LoRAGLUFunction(torch.autograd.Function):
    """h = act(g0 + sg xag bg^T) * (u0 + su xau bu^T) with gradients for all six tensors. The LoRA MLP block
    (lora_mlp.py) calls the launchers directly and owns a backward that writes over its saved g0 and u0;
    this Function keeps its inputs intact (autograd may hold them elsewhere), so it copies them first."""

    @staticmethod
    def forward(ctx, g0, u0, xag, bg, sg, xau, bu, su, act):
        ctx.save_for_backward(g0, u0, xag, bg, xau, bu)
        ctx.sg, ctx.su, ctx.act = sg, su, act
        return lora_glu_fwd(g0, u0, xag, bg, sg, xau, bu, su, act)

    @staticmethod
    def backward(ctx, dh):
        g0, u0, xag, bg, xau, bu = ctx.saved_tensors
        need = ctx.needs_input_grad
        sums = (xag is not None and need[3], xau is not None and need[6], False)
        dg, du, dbg, dbu, _ = lora_glu_bwd(dh.contiguous(), g0.clone(), u0.clone(), xag, bg, ctx.sg, xau, bu,
                                           ctx.su, act=ctx.act, sums=sums)
        grads = [dg if need[0] else None, du if need[1] else None]
        for d, xa, b, s, db in ((dg, xag, bg, ctx.sg, dbg), (du, xau, bu, ctx.su, dbu)):
            dxa = scaled_mm(d, b.to(d.dtype), s).to(xa.dtype) if xa is not None else None  # (N, r)
            grads += [dxa, db.to(b.dtype) if db is not None else None, None]
        return grads[0], grads[1], grads[2], grads[3], None, grads[5], grads[6], None, None


def lora_glu(g0: torch.Tensor, u0: torch.Tensor, xag=None, bg=None, sg: float = 1.0, xau=None, bu=None,
             su: float = 1.0, act: str = "silu") -> torch.Tensor:
    """act(g0 + sg xag bg^T) * (u0 + su xau bu^T), g0 and u0 (N, I), with a fused backward."""
    return LoRAGLUFunction.apply(g0, u0, xag, bg, sg, xau, bu, su, act)
