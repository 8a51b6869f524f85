"""plan.fp8's pieces at the T1 and T4 shapes on one GPU: the row quantization (fp8_rows) against a copy, and each
base GEMM as the fast path calls it, bf16 against fp8 with the quantization of its activation counted.

    python benchmarks/bench_fp8.py > benchmarks/results/<date>-<gpu>-fp8.txt
    python benchmarks/bench_fp8.py --rows 512,1024,2048,4096   # the 1B GEMMs at fewer tokens

Shapes: Llama-3.1-8B at 4x2048 tokens, Llama-3.2-1B at 8x2048 (x (N, in), W (out, in)). "fwd": y = x W^T;
"dgrad": dx = dy W. fp8 rows: e4m3 operands with per-row scales through torch._scaled_mm (the weight copies
made once, as the fast path keeps them); "+q" adds fp8_rows of the activation (the forward of q, k, v and of
gate, up shares one). Medians of triton.testing.do_bench.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from ppalli.kernels.fp8 import Fp8Weights, fp8_mm, fp8_rows  # noqa: E402

MODELS = {"8b": (8192, 4096, 4096, 1024, 14336), "1b": (16384, 2048, 2048, 512, 8192)}


def ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def gemms(n, d, q, kv, inter):
    """(name, out, in) of a decoder layer's base GEMMs."""
    return [("q", q, d), ("k", kv, d), ("o", d, q), ("gate", inter, d), ("down", d, inter)]


def quantize_rows(model, n, width, dev) -> None:
    x = torch.randn(n, width, device=dev, dtype=torch.bfloat16)
    t, copy = ms(lambda: fp8_rows(x)), ms(lambda: x.clone())
    print(f"{model} fp8_rows ({n} x {width}): {t:.4f} ms, {n * width * 3 / t / 1e6:,.0f} GB/s (bf16 clone "
          f"{copy:.4f} ms, {n * width * 4 / copy / 1e6:,.0f} GB/s)")


def one_gemm(model, name, n, out, inp, dev) -> None:
    x = torch.randn(n, inp, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(n, out, device=dev, dtype=torch.bfloat16)
    w = torch.randn(out, inp, device=dev, dtype=torch.bfloat16) * 0.02
    cache = Fp8Weights()
    wq, sw = cache.forward_operand(w)
    wtq, swt = cache.grad_operand(w)
    xq, sx = fp8_rows(x)
    dyq, sdy = fp8_rows(dy)
    rows = {
        "fwd bf16": lambda: torch.mm(x, w.t()),
        "fwd fp8": lambda: fp8_mm(xq, sx, wq, sw),
        "fwd fp8+q": lambda: fp8_mm(*fp8_rows(x), wq, sw),
        "dgrad bf16": lambda: torch.mm(dy, w),
        "dgrad fp8": lambda: fp8_mm(dyq, sdy, wtq, swt),
        "dgrad fp8+q": lambda: fp8_mm(*fp8_rows(dy), wtq, swt),
    }
    flops = 2 * n * out * inp
    line = ", ".join(f"{k} {v:.4f} ms ({flops / v / 1e9:,.0f} TFLOP/s)" for k, v in
                     ((k, ms(f)) for k, f in rows.items()))
    print(f"{model} {name} ({n} x {inp} -> {out}): {line}")
    exact = x.double() @ w.double().t()
    rel = ((fp8_mm(xq, sx, wq, sw).double() - exact).norm() / exact.norm()).item()
    rel16 = ((torch.mm(x, w.t()).double() - exact).norm() / exact.norm()).item()
    print(f"{model} {name} fwd relative error against fp64: fp8 {rel:.2e}, bf16 {rel16:.2e}")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="", help="comma-separated token counts: the 1B GEMMs at those N only "
                                               "(where fp8 starts to pay: ppalli/kernels/fp8.py FP8_MIN_ROWS)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    if args.rows:
        _, d, q, kv, inter = MODELS["1b"]
        for n in (int(r) for r in args.rows.split(",")):
            for name, out, inp in gemms(n, d, q, kv, inter):
                one_gemm("1b", name, n, out, inp, dev)
        return
    for model, (n, d, q, kv, inter) in MODELS.items():
        for width in sorted({d, inter, q + 2 * kv}):
            quantize_rows(model, n, width, dev)
        for name, out, inp in gemms(n, d, q, kv, inter):
            one_gemm(model, name, n, out, inp, dev)


if __name__ == "__main__":
    main()
