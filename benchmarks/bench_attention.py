"""Causal GQA attention, forward + backward, per SDPA kernel and torch's varlen kernel, on one GPU.

    python benchmarks/bench_attention.py --out benchmarks/results/attention.json

Shapes: Llama-3.1-8B's (4 x 32 heads x 2048 x 128, 8 kv heads: T1) and Llama-3.2-1B's (8 x 32 x 2048 x 64,
8 kv heads: T4), bf16. BENCHMARKS.md measured only the first (cuDNN 1.41 ms, flash 2.29 ms), and the fast
path picks cuDNN for both head sizes. Each row: SDPA with one kernel forced (GQA native, or k/v expanded to
all heads first), ppalli's attend over the batch packed into one row, and torch's varlen_attn, the kernel
packed samples of several lengths run (2026-11-25, results/*-attention.txt: 2.57 ms at 8B and 2.80 at 1B
against cuDNN's 1.19 and 1.48, which is why samples of one length now run as a dense batch), and flash-attn
4 (`flash_attn.cute`, CuTe DSL kernels compiled at first call; its compile time is printed) where installed.
q, k, v live as (B, T, H, D) memory viewed as (B, H, T, D), as the fast path's lora_qkv hands them over.
Times are medians of triton.testing.do_bench; TFLOP/s counts the causal half: forward 2 * 2 * B H S^2 D / 2,
the backward 2.5 times that. err: the largest relative error (norm) of the output and dq, dk, dv against
fp32 math on the same inputs.
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _sweep import main, median_ms  # noqa: E402

SHAPES = {"8b": (4, 32, 8, 2048, 128), "1b": (8, 32, 8, 2048, 64)}  # batch, heads, kv heads, seq, head dim


def _sdpa(kernel, expand: bool):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        if expand:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        with sdpa_kernel([kernel]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand)
    return run


def _packed(q, k, v):
    """ppalli's attend over the batch packed into one row of samples of one length (cu_seqlens): since
    2026-11-25 a dense batch again (before: torch's varlen_attn, the row below)."""
    from ppalli.models.attention import attend

    b, _, s, _ = q.shape
    cu = torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)
    return attend(q, k, v, backend="sdpa_cudnn", cu_seqlens=cu, max_seqlen=s).transpose(1, 2)  # (B, H, T, D)


def _varlen(q, k, v):
    """The kernel packed samples of several lengths run: torch's varlen_attn through ppalli's wrapper (k/v
    expanded where the installed torch has no enable_gqa), here over the same equal-length samples."""
    from ppalli.models.attention import _varlen_torch

    b, _, s, _ = q.shape
    cu = torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)
    return _varlen_torch(q, k, v, None, None, cu, s).transpose(1, 2)  # (B, H, T, D)


def _fa4(q, k, v):
    """flash-attn 4's CuTe DSL kernels (Hopper and Blackwell): (B, T, H, D) in and out, GQA native."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)  # (B, H, T, D) view


def _grads(fn, q, k, v, dout):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), *(t.grad.clone() for t in (q, k, v))


def _time(fn, q, k, v, backward: bool) -> float:
    if not backward:
        return median_ms(lambda: fn(q, k, v))
    out = fn(q, k, v)
    grad = torch.randn_like(out)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(grad)
    return median_ms(step)


def bench_shape(name: str, b: int, h: int, hkv: int, s: int, d: int) -> dict:
    from torch.nn.attention import SDPBackend

    def t(heads):  # (B, T, H, D) memory as a (B, H, T, D) view
        x = torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        return x.requires_grad_()

    q, k, v = t(h), t(hkv), t(hkv)
    dout = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    exact = _grads(_sdpa(SDPBackend.MATH, True), *(x.detach().float().requires_grad_() for x in (q, k, v)),
                   dout.float())
    fwd_flop = 2 * 2 * b * h * s * s * d / 2
    runs = {"cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION, False), "flash": _sdpa(SDPBackend.FLASH_ATTENTION, False),
            "cudnn, k/v expanded": _sdpa(SDPBackend.CUDNN_ATTENTION, True),
            "flash, k/v expanded": _sdpa(SDPBackend.FLASH_ATTENTION, True),
            "efficient, k/v expanded": _sdpa(SDPBackend.EFFICIENT_ATTENTION, True),
            "packed, one length (attend)": _packed, "varlen_attn (packed, uneven)": _varlen,
            "flash-attn 4 (cute)": _fa4}
    rows = []
    for label, fn in runs.items():
        try:
            start = time.perf_counter()
            got = _grads(fn, q, k, v, dout)  # the first call compiles where a kernel is JIT-built
            first_s = time.perf_counter() - start
            fwd, both = _time(fn, q, k, v, False), _time(fn, q, k, v, True)
        except (RuntimeError, TypeError, ImportError, AssertionError) as exc:  # a kernel that refuses says why
            rows.append({"kernel": label, "error": str(exc).splitlines()[0][:160]})
            continue
        err = max(((g.float() - r).norm() / r.norm()).item() for g, r in zip(got, exact))
        rows.append({"kernel": label, "fwd_ms": round(fwd, 4), "fwd_bwd_ms": round(both, 4),
                     "fwd_tflops": round(fwd_flop / fwd / 1e9, 1),
                     "fwd_bwd_tflops": round(3.5 * fwd_flop / both / 1e9, 1), "err": float(f"{err:.2e}"),
                     "first_call_s": round(first_s, 2)})
    return {"shape": name, "dims": dict(batch=b, heads=h, kv_heads=hkv, seq=s, head_dim=d), "rows": rows}


def report(r: dict) -> None:
    print(f"{r['shape']}: {r['dims']}")
    for x in r["rows"]:
        if "error" in x:
            print(f"  {x['kernel']:<26} refused: {x['error']}")
        else:
            print(f"  {x['kernel']:<26} fwd {x['fwd_ms']:.3f} ms ({x['fwd_tflops']} TFLOP/s), fwd+bwd "
                  f"{x['fwd_bwd_ms']:.3f} ms ({x['fwd_bwd_tflops']} TFLOP/s), err {x['err']}, first call "
                  f"{x['first_call_s']} s")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
