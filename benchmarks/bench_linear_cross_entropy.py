"""Launch settings of linear_cross_entropy's row kernel (ppalli/kernels/linear_cross_entropy.py) on one GPU.

    python benchmarks/bench_linear_cross_entropy.py --out benchmarks/results/linear-cross-entropy-programs.json

One chunk of logits as the fused lm_head + loss makes it: 1024 rows of Llama-3's V = 128256 and of
Qwen2.5's V = 151936, bf16. The kernel reads each row twice (online max and sum, then the gradient) and
writes it once: GB/s counts those 3 passes, against a plain device copy. One program per row keeps ~2 rows a
SM in flight (32 warps each): 264 rows of 256 KB on an H200, more than its L2; programs that walk rows
(CE_PROGRAMS_PER_SM) keep fewer in flight, so the second pass may be served from L2.
Times: medians of triton.testing.do_bench, ms.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from _sweep import main, median_ms  # noqa: E402

from ppalli.kernels.linear_cross_entropy import _cross_entropy_rows  # noqa: E402

SHAPES = {"llama3": (1024, 128256), "qwen2.5": (1024, 151936)}
PROGRAMS_PER_SM = (0, 1, 2, 3, 4)


def bench_shape(name: str, rows: int, vocab: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=gen) * 2
    labels = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    loss = torch.empty(rows, device="cuda", dtype=torch.float32)
    work, dst = logits.clone(), torch.empty_like(logits)
    nbytes = logits.numel() * logits.element_size()
    copy_ms = median_ms(lambda: dst.copy_(logits))
    out = {"shape": name, "rows": rows, "vocab": vocab, "copy_gbps": round(2 * nbytes / copy_ms / 1e6, 1), "runs": []}
    for per_sm in PROGRAMS_PER_SM:
        # each repeat starts from the logits again (the kernel overwrites them): the copy's time is taken off
        ms = median_ms(lambda p=per_sm: (work.copy_(logits), _cross_entropy_rows(work, labels, loss, -100, None, p)))
        ms -= copy_ms
        out["runs"].append({"programs_per_sm": per_sm, "ms": round(ms, 4), "gbps": round(3 * nbytes / ms / 1e6, 1)})
    ref = loss.clone()
    work.copy_(logits)
    _cross_entropy_rows(work, labels, loss, -100, None, 0)
    out["max_loss_diff"] = float((loss - ref).abs().max())  # the last setting against one program per row
    return out


def report(r: dict) -> None:
    print(f"{r['shape']} ({r['rows']} x {r['vocab']}): copy {r['copy_gbps']} GB/s, loss diff {r['max_loss_diff']:.2e}")
    for x in r["runs"]:
        print(f"  programs per SM {x['programs_per_sm']}: {x['ms']:.4f} ms, {x['gbps']} GB/s")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
