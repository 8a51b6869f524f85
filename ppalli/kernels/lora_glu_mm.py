"""The down projection's input-gradient GEMM with the gated activation's backward in its epilogue.

lora_mlp's backward ran dh0 = dy Wd (cuBLAS, (N, I) written) and then lora_glu_bwd, which reads dh0, g0 and
u0 back and writes dg and du over g0 and u0: 5 passes over (N, I), 1.34 GB a layer for Llama-3.2-1B at
N = 16384. Here each (BM, BN) tile of dy Wd stays in registers and the activation's backward runs on it
before anything is written, as lora_glu_bwd's tiles do:

    dh = dy Wd + (sd dy Bd) Ad                                  (BM, BN), never stored
    dg = dh * u * act'(g),  du = dh * act(g)                    written over g0 and u0
    dBg = sg dg^T (x Ag^T),  dBu = su du^T (x Au^T),  dAd = (sd dy Bd)^T h      summed over rows

which leaves 4 passes (g0, u0 read; dg, du written). The weight-gradient sums run over rows, so the tiles
are dealt out column-major: each persistent program takes a contiguous range of tiles, walks down each
column block it meets, keeps the (BN, r) sums in registers and adds them into fp32 (I, r) buffers once per
column block (atomic adds: at most a few per column, in no fixed order).

The GEMM's main loop reads dy and Wd through TMA descriptors (Hopper and newer). Tile settings: MMTiles.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import cdiv, check_tensors, dot, interpreting, jit, program_count, tl, triton
from ppalli.kernels.lora_glu import ACTS, GLUGrads, _act, _b_tile, _factors, _gate_up, _launch_args, _offsets, _xa_tile


class MMTiles(NamedTuple):
    """A launch setting: the (bm, bn) output tile, bk the step along d, warps, Triton's pipeline stages for the
    main loop, and programs per SM."""

    bm: int = 128
    bn: int = 128
    bk: int = 64
    warps: int = 8
    stages: int = 3
    per_sm: int = 1


MM_TILES = MMTiles()


@jit
def _mm_tile(A, B, off_m, off_n, K, IEEE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr):
    """(BM, BN) fp32 tile of A B at (off_m, off_n), A (., K) and B (K, .) read through TMA descriptors (zeros
    past their edges)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = A.load([off_m, k])  # (BM, BK)
        b = B.load([k, off_n])  # (BK, BN)
        if UPCAST:  # the CPU interpreter's bf16 dot is wrong: multiply fp32 copies
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@jit
def _add_sums(S, acc, cols, M, RP: tl.constexpr):
    """S[cols, :] += acc, (BN, RP) fp32 into an (M, RP) fp32 buffer."""
    k = tl.arange(0, RP)
    tl.atomic_add(S + cols[:, None] * RP + k[None, :], acc, mask=cols[:, None] < M, sem="relaxed")


@jit
def _lora_glu_mm_bwd_kernel(DY, W, G0, U0, XAG, xag_stride, BG, XAU, xau_stride, BU, XAD, AD, SBG, SBU, SAD,
                            N, M, K, R, sg, su, ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr,
                            HAS_D: tl.constexpr, SUM_BG: tl.constexpr, SUM_BU: tl.constexpr,
                            SUM_AD: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, PROGRAMS: tl.constexpr):
    # Tiles numbered column-major (t -> column block t // row_blocks, row block t % row_blocks); this program
    # takes tiles [first, last), column block by column block.
    row_blocks = tl.cdiv(N, BM)
    tiles = row_blocks * tl.cdiv(M, BN)
    pid = tl.program_id(0)
    first = pid * tiles // PROGRAMS
    last = (pid + 1) * tiles // PROGRAMS
    for c in range(first // row_blocks, tl.cdiv(last, row_blocks)):
        cols = c * BN + tl.arange(0, BN)
        bg = _b_tile(BG, cols, M, R, True, RP) if HAS_G else None  # (RP, BN), once per column block
        bu = _b_tile(BU, cols, M, R, True, RP) if HAS_U else None
        ad = _b_tile(AD, cols, M, R, False, RP) if HAS_D else None
        sum_bg = tl.zeros((BN, RP), dtype=tl.float32)
        sum_bu = tl.zeros((BN, RP), dtype=tl.float32)
        sum_ad = tl.zeros((BN, RP), dtype=tl.float32)
        r_first = tl.maximum(first - c * row_blocks, 0)
        r_last = tl.minimum(last - c * row_blocks, row_blocks)
        for rb in range(r_first, r_last):
            dh = _mm_tile(DY, W, rb * BM, c * BN, K, IEEE, UPCAST, BM, BN, BK)  # dy Wd, (BM, BN) fp32
            rows = tl.arange(0, BM).to(tl.int64) + rb * BM
            offs, mask = _offsets(rows, cols, M, N, M)
            g0 = tl.load(G0 + offs, mask=mask, other=0.0)
            u0 = tl.load(U0 + offs, mask=mask, other=0.0)
            zero = tl.zeros((BM, RP), dtype=G0.dtype.element_ty)
            xag = _xa_tile(XAG, xag_stride, rows, N, R, RP) if HAS_G else zero
            xau = _xa_tile(XAU, xau_stride, rows, N, R, RP) if HAS_U else zero
            g, u = _gate_up(g0, u0, xag, bg, xau, bu, sg, su, HAS_G, HAS_U, IEEE, UPCAST)
            if HAS_D:  # XAD is sd dy Bd, (N, R) contiguous
                xad = _xa_tile(XAD, R, rows, N, R, RP)
                dh += dot(xad, ad, IEEE, UPCAST)
            a, da = _act(g, ACT)
            du = (dh * a).to(G0.dtype.element_ty)
            dg = (dh * u * da).to(G0.dtype.element_ty)
            tl.store(U0 + offs, du, mask=mask)
            tl.store(G0 + offs, dg, mask=mask)
            if SUM_BG:
                sum_bg += dot(tl.trans(dg), xag, IEEE, UPCAST)  # (BN, BM) @ (BM, RP)
            if SUM_BU:
                sum_bu += dot(tl.trans(du), xau, IEEE, UPCAST)
            if SUM_AD:
                sum_ad += dot(tl.trans((a * u).to(G0.dtype.element_ty)), xad, IEEE, UPCAST)
        if SUM_BG:
            _add_sums(SBG, sum_bg * sg, cols, M, RP)
        if SUM_BU:
            _add_sums(SBU, sum_bu * su, cols, M, RP)
        if SUM_AD:
            _add_sums(SAD, sum_ad, cols, M, RP)


def _descriptor(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def lora_glu_mm_supported(dy: torch.Tensor, wd: torch.Tensor) -> bool:
    """Whether this kernel can take dy (N, d) and the down projection's weight wd (d, I): triton with tensor
    descriptors, a Hopper or newer GPU (or the CPU interpreter), 16-bit or fp32 tensors of one dtype, rows
    16-byte aligned (TMA's rule)."""
    if triton is None or dy.dtype != wd.dtype or wd.dim() != 2 or dy.dim() != 2:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:  # triton before 3.4
        return False
    if dy.is_cuda:
        if torch.cuda.get_device_capability(dy.device)[0] < 9:
            return False
    elif not (dy.device.type == "cpu" and interpreting()):
        return False
    width = dy.element_size()
    return all(t.stride(1) == 1 and (t.stride(0) * width) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (dy, wd))


def lora_glu_mm_bwd(dy: torch.Tensor, wd: torch.Tensor, g0: torch.Tensor, up0: torch.Tensor, xag, bg, sg: float,
                    xau, bu, su: float, dxad=None, ad=None, act: str = "silu",
                    sums: tuple[bool, bool, bool] = (False, False, False), tiles: MMTiles = MM_TILES) -> GLUGrads:
    """lora_glu_bwd with dh0 = dy wd formed inside: dy (N, d), wd (d, I) the down projection's base weight as
    stored; the rest as lora_glu_bwd takes it. dg and du are written over g0 and up0."""
    n, i, rank, meta = _launch_args(g0, up0, act, [(xag, bg), (xau, bu), (dxad, ad)])
    check_tensors(dy, wd)
    if dy.shape[0] != n or wd.shape != (dy.shape[1], i) or dy.dtype != g0.dtype or wd.dtype != g0.dtype:
        raise PpalliError(f"lora_glu_mm_bwd: dy must be ({n}, d) and wd (d, {i}) in {g0.dtype}, got "
                          f"{tuple(dy.shape)} {dy.dtype} and {tuple(wd.shape)} {wd.dtype}")
    has = (xag is not None, xau is not None, dxad is not None)
    if any(s and not h for s, h in zip(sums, has)):
        raise PpalliError(f"lora_glu_mm_bwd: weight-gradient sums {sums} asked for adapters that are absent {has}")
    xag, xag_stride, bg = _factors(g0, xag, bg, rank)
    xau, xau_stride, bu = _factors(g0, xau, bu, rank)
    dxad = dxad.to(g0.dtype).contiguous() if has[2] else g0
    ad = ad.to(g0.dtype).contiguous() if has[2] else g0
    wanted = sum(sums)
    buffer = torch.zeros(wanted, i, meta["RP"], dtype=torch.float32, device=g0.device) if wanted else None
    slots = iter(range(wanted))
    partials = [buffer[next(slots)] if s else g0 for s in sums]
    tiles_total = cdiv(n, tiles.bm) * cdiv(i, tiles.bn)
    programs = min(tiles_total, tiles.per_sm * program_count(g0.device))
    _lora_glu_mm_bwd_kernel[(programs,)](
        _descriptor(dy, [tiles.bm, tiles.bk]), _descriptor(wd, [tiles.bk, tiles.bn]), g0, up0, xag, xag_stride,
        bg, xau, xau_stride, bu, dxad, ad, *partials, n, i, dy.shape[1], rank, float(sg), float(su),
        ACT=ACTS[act], HAS_G=has[0], HAS_U=has[1], HAS_D=has[2], SUM_BG=sums[0], SUM_BU=sums[1], SUM_AD=sums[2],
        BM=tiles.bm, BN=tiles.bn, BK=tiles.bk, PROGRAMS=programs, **meta, num_warps=tiles.warps,
        num_stages=tiles.stages)
    folded = iter(buffer[..., :rank] if wanted else ())  # (sums, I, r)
    dbg, dbu, dad = (next(folded) if s else None for s in sums)
    return GLUGrads(g0, up0, dbg, dbu, dad.t() if sums[2] else None)
