"""rope_lora_fwd (ppalli/kernels/rope.py) on one GPU against the ops it replaces in lora_qkv's forward.

    python benchmarks/bench_rope.py --out benchmarks/results/rope-lora.json

Before, q and k each took an addmm_ of the LoRA term s (x A^T) B^T into the base output (reading and writing it)
and then RoPE's pass; rope_lora_fwd adds the term inside RoPE's pass. Shapes: Llama-3.2-1B at 8x2048 tokens
(q: 32 heads, k: 8, head dim 64) and Llama-3.1-8B at 4x2048 (32 and 8 heads of 128), bf16, rank 16, x A^T a
column block of the stacked (N, 3r) product. Settings (tokens a program, heads a step, warps) are swept (until
2026-12-03 a program took a block of heads, not all: results/2026-12-03-h200-rope-lora.json, compared in
*-rope-best.txt); times are medians of triton.testing.do_bench, ms; GB/s counts y read and the output written.
Also lora_qkv's backward RoPE (dq and dk here both of the row's shape, so twice its work) with dv copied apart
or inside dk's launch.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from _sweep import main, median_ms, print_settings, setting_row  # noqa: E402

from ppalli.kernels.rope import LORA_BLOCKS, rope_fwd, rope_lora_fwd  # noqa: E402

# name: (batch, T, heads, head dim)
SHAPES = {"1b q": (8, 2048, 32, 64), "1b k": (8, 2048, 8, 64), "8b q": (4, 2048, 32, 128), "8b k": (4, 2048, 8, 128)}
SWEEP = [(16, 1, 4), (16, 2, 4), (16, 4, 4), (16, 4, 8), (32, 2, 4), (32, 4, 8), (64, 1, 4), (64, 2, 8)]
RANK, S, DTYPE = 16, 2.0, torch.bfloat16


def bench_shape(name: str, b: int, t: int, h: int, d: int) -> dict:
    n = b * t
    y = torch.randn(n, h * d, device="cuda", dtype=DTYPE)
    xa = torch.randn(n, 3 * RANK, device="cuda", dtype=DTYPE)[:, :RANK]
    lora_b = torch.randn(h * d, RANK, device="cuda", dtype=DTYPE) * 0.1
    angle = torch.randn(1, t, d // 2, device="cuda")
    angle = torch.cat([angle, angle], dim=-1)  # as HF's tables: both halves equal
    cos, sin = angle.cos().to(DTYPE), angle.sin().to(DTYPE)

    def before():
        q = y.clone()  # stands for the base GEMM's output that addmm_ wrote into
        q.addmm_(xa, lora_b.t(), alpha=S)
        heads = q.view(b, t, h, d).transpose(1, 2)
        return rope_fwd(heads, heads, cos, sin)[0]

    ref = before()
    row = {"shape": name, "n": n, "heads": h, "head_dim": d,
           "before_ms": round(median_ms(before) - median_ms(lambda: y.clone()), 4), "fused": []}
    for blocks in SWEEP:
        if blocks[1] * d // 2 > 512:  # a (tokens, heads * D/2) tile wider than 512 columns spills
            continue
        row["fused"].append(setting_row(
            blocks, lambda blocks: rope_lora_fwd(y, xa, lora_b, S, cos, sin, b, d, blocks=blocks), ref,
            2 * y.numel() * 2))
    row["default"] = list(LORA_BLOCKS[64 if d <= 64 else 128])
    # lora_qkv's backward for k and v: RoPE's transpose of dk and a copy of dv into their column blocks of the
    # (N, q + 2 kv) gradient buffer, dv's copy as its own copy_ or inside dk's launch (rope_fwd's v=).
    buf = torch.empty(n, 2 * h * d, device="cuda", dtype=DTYPE)
    dk_out, dv_out = (c.view(b, t, h, d).transpose(1, 2) for c in buf.split(h * d, dim=1))
    dk = y.view(b, t, h, d).transpose(1, 2)
    dv = torch.randn(b, h, t, d, device="cuda", dtype=DTYPE).transpose(1, 2).contiguous().transpose(1, 2)

    def copy_apart():
        rope_fwd(dk, dk, cos, sin, backward=True, out=(dk_out, dk_out))
        dv_out.copy_(dv)

    row["bwd_dv_copy_ms"] = round(median_ms(copy_apart), 4)
    row["bwd_dv_in_launch_ms"] = round(median_ms(
        lambda: rope_fwd(dk, dk, cos, sin, backward=True, out=(dk_out, dk_out), v=(dv, dv_out))), 4)
    return row


def report(r: dict) -> None:
    print(f"{r['shape']} (N {r['n']}, {r['heads']} heads of {r['head_dim']}): addmm_ + rope {r['before_ms']:.4f} ms")
    print_settings("rope_lora_fwd", r["fused"])
    print(f"  backward (q and k as this shape): rope + dv copy_ {r['bwd_dv_copy_ms']:.4f} ms, dv in the launch "
          f"{r['bwd_dv_in_launch_ms']:.4f} ms")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
