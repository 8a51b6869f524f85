"""lora_glu_mm_bwd (ppalli/kernels/lora_glu_mm.py) against what it replaces: cuBLAS's dh0 = dy Wd, then
lora_glu_bwd over dh0, g0 and u0. Per tile setting, the fused kernel's time and its error against the two-step
path; "mm" rows time the same persistent column-major GEMM main loop storing its tile (no activation), to
read how far Triton's main loop is from cuBLAS's on this GPU.

    python benchmarks/bench_lora_glu_mm.py --out benchmarks/results/lora-glu-mm.json

Shapes: Llama-3.2-1B's MLP at 8x2048 tokens (N 16384, d 2048, I 8192) and Llama-3.1-8B's at 4x2048 (N 8192,
d 4096, I 14336), bf16, rank 16, every adapter present, all three weight-gradient sums. Medians of
triton.testing.do_bench, ms.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from _sweep import main, median_ms, rel_err  # noqa: E402

from ppalli.kernels._utils import jit, program_count, tl  # noqa: E402
from ppalli.kernels.lora_glu import lora_glu_bwd  # noqa: E402
from ppalli.kernels.lora_glu_mm import MMTiles, _descriptor, _mm_tile, lora_glu_mm_bwd  # noqa: E402

SHAPES = {"1b": (16384, 2048, 8192), "8b": (8192, 4096, 14336)}
RANK, DTYPE, SUMS = 16, torch.bfloat16, (True, True, True)
SETTINGS = [MMTiles(128, 128, 64, 8, 3), MMTiles(128, 128, 64, 8, 4), MMTiles(128, 256, 64, 8, 3),
            MMTiles(128, 128, 64, 4, 3), MMTiles(64, 128, 64, 4, 3), MMTiles(64, 128, 64, 4, 4),
            MMTiles(64, 256, 64, 8, 3), MMTiles(128, 64, 64, 4, 4), MMTiles(64, 128, 64, 4, 3, 2),
            MMTiles(128, 128, 64, 8, 3, 2)]


@jit
def _mm_kernel(A, B, C, N, M, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PROGRAMS: tl.constexpr):
    row_blocks = tl.cdiv(N, BM)
    tiles = row_blocks * tl.cdiv(M, BN)
    pid = tl.program_id(0)
    for t in range(pid * tiles // PROGRAMS, (pid + 1) * tiles // PROGRAMS):
        c, rb = t // row_blocks, t % row_blocks
        acc = _mm_tile(A, B, rb * BM, c * BN, K, False, False, BM, BN, BK)
        C.store([rb * BM, c * BN], acc.to(tl.bfloat16))


def _mm(a, b, c, t: MMTiles):
    tiles = -(-a.shape[0] // t.bm) * -(-b.shape[1] // t.bn)
    programs = min(tiles, t.per_sm * program_count(a.device))
    _mm_kernel[(programs,)](_descriptor(a, [t.bm, t.bk]), _descriptor(b, [t.bk, t.bn]), _descriptor(c, [t.bm, t.bn]),
                            a.shape[0], b.shape[1], a.shape[1], BM=t.bm, BN=t.bn, BK=t.bk, PROGRAMS=programs,
                            num_warps=t.warps, num_stages=t.stages)
    return c


def bench_shape(name: str, n: int, d: int, i: int) -> dict:
    torch.manual_seed(0)
    dev = "cuda"
    dy = torch.randn(n, d, device=dev, dtype=DTYPE) * 0.02
    wd = torch.randn(d, i, device=dev, dtype=DTYPE) * 0.02
    g0, u0 = torch.randn(n, i, device=dev, dtype=DTYPE), torch.randn(n, i, device=dev, dtype=DTYPE)
    xag, xau, dxad = (torch.randn(n, RANK, device=dev, dtype=DTYPE) for _ in range(3))
    bg, bu = torch.randn(i, RANK, device=dev, dtype=DTYPE) * 0.02, torch.randn(i, RANK, device=dev, dtype=DTYPE) * 0.02
    ad = torch.randn(RANK, i, device=dev, dtype=DTYPE) * 0.02
    args = (xag, bg, 0.5, xau, bu, 2.0, dxad * 1e-3, ad, "silu", SUMS)
    ref = lora_glu_bwd(dy @ wd, g0.clone(), u0.clone(), *args)
    gw, uw = g0.clone(), u0.clone()  # the timed calls write over these

    def two_step():
        return lora_glu_bwd(dy @ wd, gw, uw, *args)

    out = {"shape": name, "cublas_mm_ms": round(median_ms(lambda: dy @ wd), 4),
           "two_step_ms": round(median_ms(two_step), 4), "settings": []}
    c = torch.empty(n, i, device=dev, dtype=DTYPE)
    for t in SETTINGS:
        row = {"tiles": list(t)}
        try:
            got = lora_glu_mm_bwd(dy, wd, g0.clone(), u0.clone(), *args, tiles=t)
            row["rel_err"] = rel_err(tuple(got), tuple(ref))
            row["fused_ms"] = round(median_ms(lambda t=t: lora_glu_mm_bwd(dy, wd, gw, uw, *args, tiles=t)), 4)
            row["mm_ms"] = round(median_ms(lambda t=t: _mm(dy, wd, c, t)), 4)
            row["mm_rel_err"] = rel_err(_mm(dy, wd, c, t), dy @ wd)
        except Exception as exc:  # a setting that does not compile (shared memory) is a row, not the end
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        out["settings"].append(row)
    return out


def report(row: dict) -> None:
    print(f"{row['shape']}: cuBLAS mm {row['cublas_mm_ms']} ms; mm + lora_glu_bwd {row['two_step_ms']} ms")
    for s in sorted(row["settings"], key=lambda s: s.get("fused_ms", 1e9)):
        print(f"  {s['tiles']}: " + (s.get("error") or f"fused {s['fused_ms']} ms (rel err {s['rel_err']}), "
                                     f"mm alone {s['mm_ms']} ms (rel err {s['mm_rel_err']})"))


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
