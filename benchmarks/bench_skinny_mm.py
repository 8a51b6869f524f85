"""The LoRA layers' rank-r products, cuBLAS against ppalli's skinny_mm / skinny_tmm, with a sweep of tiles.

    python benchmarks/bench_skinny_mm.py --out benchmarks/results/skinny-mm.json

Per shape: X (N, K) bf16 and a rank-r factor, as the fast path calls them: x A^T and s dy B (skinny_mm, the
factor (K, r), A^T read in place), dB = s dy^T (x A^T) and dA^T = x^T dxa (skinny_tmm). Llama-3.1-8B at
4x2048 tokens (T1) and Llama-3.2-1B at 8x2048 (T4). GB/s counts X, the factor and the output once; times
are medians of triton.testing.do_bench.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _sweep import main, median_ms  # noqa: E402

from ppalli.kernels.skinny_mm import MM_TILES, TMM_TILES, SkinnyTiles, skinny_mm, skinny_tmm  # noqa: E402

# (N, K, r) per product: K = hidden (q/o/down's dy B, x [Aq;Ak;Av]^T at r = 48, [Ag;Au] at 32), kv width, I.
SHAPES = {
    "8b": [(8192, 4096, 16), (8192, 4096, 32), (8192, 4096, 48), (8192, 1024, 16), (8192, 14336, 16)],
    "1b": [(16384, 2048, 16), (16384, 2048, 32), (16384, 2048, 48), (16384, 512, 16), (16384, 8192, 16)],
}
MM_SWEEP = [MM_TILES, SkinnyTiles(16, 128, 4, 4), SkinnyTiles(32, 256, 4, 3), SkinnyTiles(64, 128, 4, 3),
            SkinnyTiles(32, 64, 4, 4), SkinnyTiles(16, 256, 4, 4), SkinnyTiles(32, 128, 8, 4)]
TMM_SWEEP = [TMM_TILES, SkinnyTiles(32, 64, 4, 3, 4), SkinnyTiles(64, 128, 4, 3, 2), SkinnyTiles(64, 64, 4, 3, 8),
             SkinnyTiles(128, 64, 8, 3, 4), SkinnyTiles(64, 32, 4, 4, 4)]


def _row(label, nbytes, fn):
    ms = median_ms(fn)
    return {"what": label, "us": round(ms * 1e3, 1), "gb_s": round(nbytes / ms / 1e6)}


def _product_rows(n: int, k: int, r: int) -> list[dict]:
    x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)  # lora_A layout
    s = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
    nbytes = 2 * (n * k + k * r + n * r)
    tag = f"N={n} K={k} r={r}"
    rows = [_row(f"{tag} mm cuBLAS x A^T", nbytes, lambda: torch.mm(x, a.t()))]
    rows += [_row(f"{tag} mm skinny {tuple(t)}", nbytes, lambda t=t: skinny_mm(x, a.t(), 1.0, t)) for t in MM_SWEEP]
    rows.append(_row(f"{tag} tmm cuBLAS x^T s", nbytes, lambda: torch.mm(x.t(), s)))
    rows += [_row(f"{tag} tmm skinny {tuple(t)}", nbytes, lambda t=t: skinny_tmm(x, s, 1.0, torch.float32, t))
             for t in TMM_SWEEP]
    ref = x.float() @ a.float().t()
    err = ((skinny_mm(x, a.t()).float() - ref).abs().max() / ref.abs().max()).item()
    ref_t = x.float().t() @ s.float()
    err_t = ((skinny_tmm(x, s, 1.0, torch.float32) - ref_t).abs().max() / ref_t.abs().max()).item()
    rows.append({"what": f"{tag} max relative error mm / tmm", "mm": err, "tmm": err_t})
    return rows


def bench_shape(name: str, *products) -> dict:
    return {"shape": name, "rows": [row for p in products for row in _product_rows(*p)]}


def report(r: dict) -> None:
    print(r["shape"])
    for row in r["rows"]:
        if "us" in row:
            print(f"  {row['what']:<60} {row['us']:8.1f} us {row['gb_s']:6d} GB/s")
        else:
            print(f"  {row['what']:<60} {row['mm']:.1e} / {row['tmm']:.1e}")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
