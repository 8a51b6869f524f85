"""linear_cross_entropy (lm_head GEMM, CE kernel, dgrad GEMM per chunk of rows), forward and backward, at the
benchmarks' shapes, for several chunk heights: time, TFLOP/s of its two GEMMs' work, and the peak memory it
adds on top of its inputs. The chunk height sets the GEMMs' M, and cuBLAS's 192- and 256-row tiles leave the
last row tile of a 1024-row chunk part-empty (bench_gemm.py's "rows:" rows time the GEMMs alone).

    python benchmarks/bench_linear_cross_entropy.py --out benchmarks/results/linear-cross-entropy.json
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from _sweep import main, median_ms  # noqa: E402

from ppalli.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402

# (tokens, hidden, vocab): T4's Llama-3.2-1B at 8 x 2048, T1's Llama-3.1-8B at 4 x 2048.
SHAPES = {"1b": (16384, 2048, 128256), "8b": (8192, 4096, 128256)}
ROWS = (1024, 1152, 1536, 2048, 2304, 3072, 4096)


def bench_shape(name: str, n: int, d: int, vocab: int) -> dict:
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, d, device="cuda", dtype=torch.bfloat16) / d**0.5
    labels = torch.randint(0, vocab, (n,), device="cuda")
    out = {"shape": name, "dims": {"tokens": n, "hidden": d, "vocab": vocab}, "chunks": []}
    ref = None
    for rows in ROWS:
        def step(rows=rows):
            hidden.grad = None
            loss = linear_cross_entropy(hidden, weight, labels, reduction="mean", chunk_size=rows)
            loss.backward()
            return loss

        loss = step()
        torch.cuda.synchronize()
        ref = loss.item() if ref is None else ref
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() - base
        ms = median_ms(step)
        out["chunks"].append({"rows": rows, "ms": round(ms, 3), "tflops": round(4 * n * d * vocab / ms / 1e9, 1),
                              "extra_peak_mib": round(peak / 2**20), "loss_diff": abs(loss.item() - ref)})
    return out


def report(r: dict) -> None:
    print(f"{r['shape']}: {r['dims']}")
    for c in r["chunks"]:
        print(f"  chunk {c['rows']:>4} rows: {c['ms']:7.3f} ms {c['tflops']:6.1f} TFLOP/s (GEMM work), "
              f"+{c['extra_peak_mib']} MiB peak, loss diff {c['loss_diff']:.1e}")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
