"""lora_b_bwd (ppalli/kernels/lora_b_bwd.py) on one GPU against the two cuBLAS GEMMs it replaces.

    python benchmarks/bench_lora_b_bwd.py --out benchmarks/results/lora-b-bwd.json

From a projection's output gradient dy (N, out), a LoRA backward needs dxa = s dy B (N, r) and dB = s dy^T xa
(out, r, fp32 for PEFT's fp32 adapters): two GEMMs that each read dy, or one kernel that reads it once. Shapes:
Llama-3.2-1B at 8x2048 tokens (q, o, down: out 2048; k, v: 512) and Llama-3.1-8B at 4x2048 (4096; 1024), bf16,
rank 16, dy contiguous or a column block of lora_qkv's (N, Hq*D + 2 Hk*D) buffer. The kernel's settings (rows
a program, columns a step, warps) are swept; times are medians of triton.testing.do_bench, ms; GB/s counts
dy read once.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from _sweep import main, median_ms, print_settings, setting_row  # noqa: E402

from ppalli.kernels._utils import program_count  # noqa: E402
from ppalli.kernels.lora_b_bwd import launch_blocks, lora_b_bwd  # noqa: E402
from ppalli.kernels.lora_linear import grad_mm, scaled_mm  # noqa: E402

# name: (N, out, width of the buffer dy is a column block of)
SHAPES = {"1b q/o/down": (16384, 2048, 2048), "1b k in qkv": (16384, 512, 3072), "1b q in qkv": (16384, 2048, 3072),
          "8b q/o/down": (8192, 4096, 4096), "8b k in qkv": (8192, 1024, 6144)}
SWEEP = [(32, 128, 4), (64, 64, 4), (64, 128, 4), (64, 128, 8), (64, 256, 8), (128, 64, 4), (128, 128, 8)]
RANK, S, DTYPE = 16, 2.0, torch.bfloat16


def bench_shape(name: str, n: int, m: int, width: int) -> dict:
    dy = torch.randn(n, width, device="cuda", dtype=DTYPE)[:, :m]
    xa = torch.randn(n, RANK, device="cuda", dtype=DTYPE)
    b = torch.randn(m, RANK, device="cuda", dtype=DTYPE) * 0.1

    def cublas():
        return scaled_mm(dy, b, S), grad_mm(dy.t(), xa, torch.float32, S)

    row = {"shape": name, "n": n, "out": m, "width": width, "cublas_ms": round(median_ms(cublas), 4), "fused": []}
    ref = cublas()
    for blocks in SWEEP:
        row["fused"].append(setting_row(blocks, lambda blocks: lora_b_bwd(dy, xa, b, S, torch.float32, blocks=blocks),
                                        ref, n * m * 2))
    row["default"] = list(launch_blocks(n, m, program_count(dy.device)))
    return row


def report(r: dict) -> None:
    print(f"{r['shape']} (N {r['n']}, out {r['out']} of {r['width']}): cuBLAS pair {r['cublas_ms']:.4f} ms")
    print_settings("one pass", r["fused"])


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
