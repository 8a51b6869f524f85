"""nf4_linear_fwd (decode rows through a bitsandbytes NF4 weight, LoRA branch inside) against bitsandbytes'
own matmul_4bit plus PEFT-style rank-r GEMMs, on Llama-3.1-8B's and Llama-3.2-1B's projection shapes, one GPU.

    python benchmarks/bench_nf4_linear.py --out benchmarks/results/nf4-linear.txt [--sweep]

Per shape and row count (1, 4): the kernel's median time replayed from a CUDA graph (decoding replays its steps
so; launched eagerly both sides are bound by the host: ~80-170 us a call on the H200, 2026-12-04) at the tiles
`_blocks`
picks, and with --sweep at each (BLOCK_N, UNROLL, warps) of a small grid; bnb.matmul_4bit (its gemv kernel for
one row, dequantize + GEMM for more) followed by x A^T and (x A^T) B^T added, as PEFT's branch runs; GB/s counts
the 4-bit weight's bytes (packed codes and the double-quantized absmax). The relative error is against bnb's
dequantized weight multiplied in fp32.
"""

import argparse
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from ppalli.kernels.nf4_linear import _blocks, nf4_linear_fwd  # noqa: E402

SHAPES = {"8b q/o": (4096, 4096), "8b k/v": (1024, 4096), "8b gate/up": (14336, 4096), "8b down": (4096, 14336),
          "1b q/o": (2048, 2048), "1b gate/up": (8192, 2048), "1b down": (2048, 8192)}  # (out, in)
SWEEP = [(bn, unroll, w) for bn in (8, 16, 32, 64) for unroll in (2, 4, 8) for w in (2, 4, 8)]


def _device_ms(fn, rep: int = 50) -> float:
    """Median ms of fn's device work: replayed from a CUDA graph, so Python's launch time is not counted."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def bench_shape(bnb, name: str, n: int, k: int, g: torch.Generator, sweep: bool) -> list[str]:
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    packed, qs = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    nbytes = packed.numel() + qs.absmax.numel() + 4 * qs.state2.absmax.numel()
    a = torch.randn(16, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, 16, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    w16 = bnb.functional.dequantize_4bit(packed, qs).float()
    lines = []
    for m in (1, 4):
        x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
        xa = x @ a.t()
        want = x.float() @ w16.t() + xa.float() @ b.float().t()

        def ours(blocks=None, x=x, xa=xa):
            return nf4_linear_fwd(x, packed, qs, None, xa, b, blocks=blocks)

        def peft_like(x=x):
            y = bnb.matmul_4bit(x, packed.t(), quant_state=qs)
            return y.add_((x @ a.t()) @ b.t())

        err = ((ours().float() - want).norm() / want.norm()).item()
        t_ours, t_bnb = _device_ms(ours), _device_ms(peft_like)
        row = (f"{name} (out {n}, in {k}), {m} row(s): ours {1e3 * t_ours:.1f} us ({nbytes / t_ours / 1e6:.0f} "
               f"GB/s, tiles {_blocks(n, k, 64)}, rel err {err:.1e}); bnb matmul_4bit + rank-r GEMMs "
               f"{1e3 * t_bnb:.1f} us ({t_bnb / t_ours:.2f}x ours)")
        if sweep:
            times = {s: _device_ms(lambda s=s: ours(s), rep=20) for s in SWEEP}
            best = sorted(times, key=times.get)[:3]
            row += "; best tiles " + ", ".join(f"{s} {1e3 * times[s]:.1f} us" for s in best)
        print(row, flush=True)
        lines.append(row)
    return lines


def main() -> None:
    import bitsandbytes as bnb

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb.__version__}"]
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        lines += bench_shape(bnb, name, n, k, g, args.sweep)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
