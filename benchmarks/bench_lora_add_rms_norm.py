"""lora_add_rms_norm (ppalli/kernels/lora_add_rms_norm.py) on one GPU against the ops it replaces.

    python benchmarks/bench_lora_add_rms_norm.py --out benchmarks/results/lora-add-rms-norm.json

After attention the plain fast path ran: addmm_ of s (a Ao^T) Bo^T into o, x = h + o, n = rms_norm(x); the
backward ran rms_norm's backward and autograd's add of the residual gradient. The fused kernel writes x and
n in one pass and adds the residual gradient inside rms_norm's backward. Shapes: (N, d) = (8192, 4096)
(Llama-3.1-8B at 4x2048) and (16384, 2048) (Llama-3.2-1B at 8x2048), bf16, rank 16. Forward settings
(rows, columns a step, warps) are swept; times are medians of triton.testing.do_bench, ms.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from _sweep import main, median_ms  # noqa: E402

from ppalli.kernels.lora_add_rms_norm import BLOCKS, lora_add_rms_norm_fwd  # noqa: E402
from ppalli.kernels.rms_norm import rms_norm_bwd, rms_norm_fwd  # noqa: E402

SHAPES = {"8b": (8192, 4096), "1b": (16384, 2048)}
SWEEP = [(16, 128, 4), (16, 256, 4), (16, 512, 4), (16, 256, 8), (16, 512, 8), (32, 256, 8)]
RANK, S, EPS, DTYPE = 16, 2.0, 1e-5, torch.bfloat16



def bench_shape(name: str, n: int, d: int) -> dict:
    def t(*shape):
        return torch.randn(*shape, device="cuda", dtype=DTYPE)

    h, o, xa, b, w, dn, dx = t(n, d), t(n, d), t(n, RANK), t(d, RANK) * 0.1, t(d), t(n, d), t(n, d)

    def plain_fwd():
        y = o.clone()  # stands for the o GEMM's output that addmm_ wrote into
        y.addmm_(xa, b.t(), alpha=S)
        x = h + y
        return rms_norm_fwd(x, w, EPS)

    _, x2d, rstd = plain_fwd()
    row = {"shape": name, "n": n, "d": d,
           "plain_fwd_ms": round(median_ms(plain_fwd) - median_ms(lambda: o.clone()), 4),  # without the stand-in copy
           "plain_bwd_ms": round(median_ms(lambda: rms_norm_bwd(dn, x2d, w, rstd, compute_dw=False)[0] + dx), 4),
           "fused_bwd_ms": round(median_ms(lambda: rms_norm_bwd(dn, x2d, w, rstd, compute_dw=False, dres=dx)), 4),
           "fwd": []}
    for blocks in SWEEP:
        ms = median_ms(lambda blocks=blocks: lora_add_rms_norm_fwd(h, o, xa, b, S, w, EPS, blocks=blocks))
        row["fwd"].append({"blocks": list(blocks), "ms": round(ms, 4), "gbps": round(4 * n * d * 2 / ms / 1e6, 1)})
    row["default"] = list(BLOCKS)
    return row


def report(r: dict) -> None:
    print(f"{r['shape']} (N {r['n']}, d {r['d']}): plain fwd {r['plain_fwd_ms']} ms, bwd {r['plain_bwd_ms']} "
          f"-> fused bwd {r['fused_bwd_ms']} ms")
    for x in sorted(r["fwd"], key=lambda x: x["ms"]):
        print(f"  fused fwd {x['blocks']}: {x['ms']:.3f} ms, {x['gbps']} GB/s")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
