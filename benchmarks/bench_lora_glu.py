"""Launch settings of lora_glu (ppalli/kernels/lora_glu.py) on one GPU: time and bandwidth per tile setting.

    python benchmarks/bench_lora_glu.py --out benchmarks/results/lora-glu-tiles.json

Shapes: Llama-3.1-8B's MLP at 4x2048 tokens (N 8192, I 14336) and Llama-3.2-1B's at 8x2048 (N 16384,
I 8192), bf16, rank 16, every adapter present. The kernels are bound by memory: the forward reads g0, u0 and
writes h (3 passes of (N, I)); the backward reads dh0, g0, u0 and writes dg, du (5 passes) while it sums
dBg, dBu and down's dA. fwd_had also sums down's h Ad^T (runs of columns per program, runs_per_sm
swept), against the forward followed by cuBLAS's GEMM reading h back. GB/s counts those passes only,
against a plain device copy's rate. "before" is the backward as it ran until the sums moved into the
kernel: the activation backward writing h as well, then three cuBLAS GEMMs reading dg, du and h again.
Times: medians of triton.testing.do_bench, ms.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from _sweep import main, median_ms  # noqa: E402

from ppalli.kernels.lora_glu import (  # noqa: E402
    BWD_TILES,
    FWD_HAD_TILES,
    FWD_TILES,
    Tiles,
    lora_glu_bwd,
    lora_glu_fwd,
    lora_glu_fwd_had,
)

SHAPES = {"8b": (8192, 14336), "1b": (16384, 8192)}
RANK, S, DTYPE = 16, 2.0, torch.bfloat16
# Candidates: the H100 sweeps' winners (2026-11-25) and, for the H200 (4.3 TB/s against the H100's 2.9, where
# the H100 winners ran at ~1.7-2.3 TB/s), wider tiles, more warps and more programs per SM.
FWD = [Tiles(32, 128, 4), Tiles(64, 128, 8), Tiles(32, 128, 8)]
FWD_HAD = [Tiles(32, 64, 4, 16), Tiles(32, 64, 4, 32), Tiles(32, 64, 4, 8), Tiles(64, 64, 4, 16), Tiles(64, 64, 8, 16),
           Tiles(32, 128, 4, 16), Tiles(32, 128, 8, 16), Tiles(64, 128, 8, 16), Tiles(32, 64, 2, 16),
           Tiles(32, 64, 4, 16, 4), Tiles(32, 64, 2, 8), Tiles(32, 64, 2, 32), Tiles(64, 64, 2, 16),
           Tiles(16, 64, 2, 16), Tiles(32, 128, 2, 16)]
BWD = [Tiles(16, 64, 4, 8), Tiles(16, 64, 4, 16), Tiles(16, 64, 4, 4), Tiles(32, 64, 4, 8), Tiles(16, 128, 8, 8),
       Tiles(32, 64, 8, 8), Tiles(32, 128, 8, 8), Tiles(16, 64, 2, 8), Tiles(16, 32, 2, 8), Tiles(16, 64, 4, 8, 4),
       Tiles(16, 64, 4, 8, 3, 5), Tiles(16, 64, 4, 8, 3, 4), Tiles(16, 64, 4, 8, 3, 6)]  # fixed row runs: 5, 4, 6
# fwd_had's column runs fixed (2026-12-03): on the H200 the 1B shape ran 11% faster on 3 runs (8 programs a SM)
# than on the 5 that 16 a SM give it, while 8B was fastest on the 9 that 16 a SM give (results/2026-12-03-
# h200-lora-glu-prefetch.txt): the run count, not the programs per SM, is what to pick.
FWD_HAD += [Tiles(32, 64, 2, 16, 3, r) for r in (2, 3, 4, 5, 6, 7, 8, 9, 10, 12)]
if os.environ.get("BENCH_GLU_VARIANTS") == "only":  # the variants below without the sweeps
    FWD, FWD_HAD, BWD = [], [], [BWD_TILES]


def _gbps(passes: int, n: int, i: int, ms: float) -> float:
    return passes * n * i * 2 / ms / 1e6


def _row(tiles: Tiles, fn, passes: int, n: int, i: int) -> dict:
    """One setting's time and bandwidth, or the error a setting the card cannot run raised (shared memory)."""
    try:
        ms = median_ms(fn)
    except Exception as e:  # noqa: BLE001 - a setting over the card's limits is a result, not a stop
        return {"tiles": list(tiles), "ms": float("inf"), "gbps": 0.0, "error": f"{type(e).__name__}: {e}"[:200]}
    return {"tiles": list(tiles), "ms": round(ms, 4), "gbps": round(_gbps(passes, n, i, ms), 1)}


def bench_shape(name: str, n: int, i: int) -> dict:
    def t(*shape):
        return torch.randn(*shape, device="cuda", dtype=DTYPE)

    g0, u0, dh0 = t(n, i), t(n, i), t(n, i)
    xag, xau, dxad = t(n, RANK), t(n, RANK), t(n, RANK)
    bg, bu, ad = t(i, RANK) * 0.1, t(i, RANK) * 0.1, t(RANK, i) * 0.1
    dst = torch.empty_like(g0)
    copy_ms = median_ms(lambda: dst.copy_(g0))
    out = {"shape": name, "n": n, "i": i, "copy_gbps": round(_gbps(2, n, i, copy_ms), 1), "fwd": [], "bwd": []}
    for tiles in FWD:
        out["fwd"].append(_row(tiles, lambda tiles=tiles: lora_glu_fwd(g0, u0, xag, bg, S, xau, bu, S, tiles=tiles),
                               3, n, i))
    # With down's h Ad^T: the same 3 passes, against the forward then cuBLAS reading h back (a 4th pass)
    out["fwd_had"] = []
    for tiles in FWD_HAD:
        out["fwd_had"].append(_row(tiles, lambda tiles=tiles: lora_glu_fwd_had(g0, u0, xag, bg, S, xau, bu, S, ad,
                                                                               tiles=tiles), 3, n, i))
    out["fwd_then_mm_ms"] = round(median_ms(lambda: torch.mm(lora_glu_fwd(g0, u0, xag, bg, S, xau, bu, S), ad.t())), 4)
    # The backward writes over g0 and u0: values drift over repeats, the timing does not (no data-dependent work).
    sums = (True, True, True)
    for tiles in BWD:
        out["bwd"].append(_row(tiles, lambda tiles=tiles: lora_glu_bwd(dh0, g0, u0, xag, bg, S, xau, bu, S, dxad, ad,
                                                                       sums=sums, tiles=tiles), 5, n, i))

    # Variants (BENCH_GLU_VARIANTS=1, or =only to skip the sweeps): the backward without gate's and up's sums,
    # or without any, and what would then read dg and du for them: lora_b_bwd's one pass (dxa and dB) against
    # cuBLAS's dg Bg as the fast path runs it now. (The sums' accumulators as (r, BN), dot(xa^T, dg), took
    # 0.712 / 0.917 ms against 0.455 / 0.472 at 8B / 1B on the H200: results/2026-12-03-h200-glu-variants.txt.)
    if os.environ.get("BENCH_GLU_VARIANTS"):
        from ppalli.kernels.lora_b_bwd import lora_b_bwd
        from ppalli.kernels.lora_linear import scaled_mm

        def bwd(**kw):
            return lambda: lora_glu_bwd(dh0, g0, u0, xag, bg, S, xau, bu, S, dxad, ad, **kw)
        out["variants"] = {
            "bwd sums as now": median_ms(bwd(sums=sums)),
            "bwd down's sum only": median_ms(bwd(sums=(False, False, True))),
            "bwd no sums": median_ms(bwd()),
            "cuBLAS dg Bg": median_ms(lambda: scaled_mm(g0, bg, S)),
            "lora_b_bwd dg (dxa, dBg)": median_ms(lambda: lora_b_bwd(g0, xag, bg, S, torch.float32)),
        }

    def before():
        lora_glu_bwd(dh0, g0, u0, xag, bg, S, xau, bu, S, dxad, ad)  # no sums
        h = lora_glu_fwd(g0, u0, xag, bg, S, xau, bu, S)  # stands for the h the old backward wrote
        torch.mm(g0.t(), xag), torch.mm(u0.t(), xau), torch.mm(dxad.t(), h)

    out["before_ms"] = round(median_ms(before), 4)
    out["default_fwd"], out["default_fwd_had"] = list(FWD_TILES), list(FWD_HAD_TILES)
    out["default_bwd"] = list(BWD_TILES)
    return out


def report(r: dict) -> None:
    for k, ms in r.get("variants", {}).items():
        print(f"  variant {k}: {ms:.4f} ms")
    print(f"{r['shape']} (N {r['n']}, I {r['i']}): copy {r['copy_gbps']} GB/s; old backward + 3 GEMMs "
          f"{r['before_ms']} ms; forward then h Ad^T by cuBLAS {r['fwd_then_mm_ms']} ms")
    for kind in ("fwd", "fwd_had", "bwd"):
        for x in sorted(r[kind], key=lambda x: x["ms"]):
            print(f"  {kind} tiles {x['tiles']}: {x['ms']:.3f} ms, {x['gbps']} GB/s {x.get('error', '')}")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
