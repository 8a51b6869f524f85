"""Gemma-2's softcapped attention on one GPU: the eager path against compiled flex_attention (ppalli's attend).

    python benchmarks/bench_softcap_attention.py --out benchmarks/results/softcap-attention.json

SDPA has no logit softcap, so without flash-attn the fast path ran Gemma-2's attention eagerly: (B, H, T, T)
scores written out, their softmax saved for the backward. Shapes: Gemma-2-2B's layer (8 heads of 256, 4 kv
heads) and Gemma-2-9B's (16 of 256, 8 kv) at 4 x 2048 tokens, bf16, softcap 50; "packed" is the same tokens as
one row of uneven samples (block-diagonal). Per row: forward + backward time (median of triton.testing.do_bench),
the memory one forward + backward adds over its inputs, and the output's error against fp32 eager.
"""

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _sweep import fwd_bwd_row, fwd_bwd_text, main  # noqa: E402

from ppalli.models.attention import attend  # noqa: E402

SHAPES = {"gemma-2-2b": (4, 8, 4, 2048, 256), "gemma-2-9b": (4, 16, 8, 2048, 256)}  # B, heads, kv heads, T, D
SOFTCAP = 50.0
LENGTHS = [700, 1, 1500, 2000, 3, 3988]  # 8192 tokens, uneven, two of them tiny


def _run(q, k, v, backend: str, packed: bool):
    if not packed:
        return attend(q, k, v, backend=backend, softcap=SOFTCAP, scale=q.shape[-1] ** -0.5)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device=q.device, dtype=torch.int32)
    return attend(q, k, v, backend=backend, softcap=SOFTCAP, scale=q.shape[-1] ** -0.5, cu_seqlens=cu,
                  max_seqlen=max(LENGTHS))


def bench_shape(name: str, b: int, h: int, hk: int, t: int, d: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for packed in (False, True):
        shape = (1, b * t) if packed else (b, t)
        q, k, v = (torch.randn(shape[0], n, shape[1], d, device="cuda", dtype=torch.bfloat16, generator=gen)
                   .requires_grad_() for n in (h, hk, hk))
        with torch.no_grad():
            truth = _run(q.float(), k.float(), v.float(), "eager", packed).float()
        for backend, label in (("eager", "eager"), ("sdpa", "flex (attend's default)")):
            run = functools.partial(_run, backend=backend, packed=packed)
            row = fwd_bwd_row(label, run, (q, k, v), truth)
            rows.append({**row, "packed": packed})
    return {"shape": name, "dims": dict(batch=b, heads=h, kv_heads=hk, seq=t, head_dim=d), "rows": rows}


def report(r: dict) -> None:
    print(f"{r['shape']}: {r['dims']}, softcap {SOFTCAP}")
    for x in r["rows"]:
        print(f"  {'packed ' if x['packed'] else 'dense  '}{x['kernel']:<24} {fwd_bwd_text(x)}")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
