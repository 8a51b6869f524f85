"""Sliding-window attention of a dense batch on one GPU: SDPA with a (T, T) mask against the kernels that skip
the key blocks outside the window (ppalli/models/attention.py WINDOW_KERNEL).

    python benchmarks/bench_window_attention.py --out benchmarks/results/window-attention.json

Layers whose window is shorter than the sequence: Mistral-7B's (32 heads of 128, 8 kv heads, window 4096) at
1 x 8192 tokens, Gemma-3-4B's local layers (8 heads of 256, 4 kv, window 1024) at 2 x 4096 and 1 x 8192, bf16.
Rows: "sdpa + mask" is what the fast path ran before (SDPA picks a kernel that takes a mask and computes every
block below the diagonal); "varlen" torch's varlen flash kernel with window_size, each row one sample; "flex"
compiled flex_attention with the window in its block mask; "attend" is the fast path's call as it is now. Per
row: forward + backward time (median of triton.testing.do_bench), the memory it adds, the error against fp32.
"""

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _sweep import fwd_bwd_row, fwd_bwd_text, main  # noqa: E402

from ppalli.models.attention import _flex, _sdpa, _varlen_torch, attend  # noqa: E402

# B, heads, kv heads, T, D, window
SHAPES = {"mistral-7b": (1, 32, 8, 8192, 128, 4096), "gemma-3-4b-4k": (2, 8, 4, 4096, 256, 1024),
          "gemma-3-4b-8k": (1, 8, 4, 8192, 256, 1024)}


def _kernel(q, k, v, how: str, window: int):
    scale = q.shape[-1] ** -0.5
    if how == "sdpa + mask":
        return _sdpa(q, k, v, None, scale, window, "sdpa_cudnn")
    if how == "varlen":
        cu = torch.arange(0, (q.shape[0] + 1) * q.shape[2], q.shape[2], device=q.device, dtype=torch.int32)
        return _varlen_torch(q, k, v, scale, window, cu, q.shape[2])
    if how == "flex":
        return _flex(q, k, v, scale, window, None)
    return attend(q, k, v, backend="sdpa_cudnn", scale=scale, window=window)


def bench_shape(name: str, b: int, h: int, hk: int, t: int, d: int, window: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, n, t, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for n in (h, hk, hk))
    with torch.no_grad():  # fp32 through SDPA's math kernel with the same window
        truth = _sdpa(q.float(), k.float(), v.float(), None, d ** -0.5, window, "sdpa_math").float()
    rows = [fwd_bwd_row(how, functools.partial(_kernel, how=how, window=window), (q, k, v), truth)
            for how in ("sdpa + mask", "varlen", "flex", "attend")]
    return {"shape": name, "dims": dict(batch=b, heads=h, kv_heads=hk, seq=t, head_dim=d, window=window),
            "rows": rows}


def report(r: dict) -> None:
    print(f"{r['shape']}: {r['dims']}")
    for x in r["rows"]:
        print(f"  {x['kernel']:<12} {fwd_bwd_text(x)}")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
