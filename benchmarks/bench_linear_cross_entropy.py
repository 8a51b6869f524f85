"""The cross-entropy kernel of linear_cross_entropy (ppalli/kernels/linear_cross_entropy.py) on one chunk of
logits, on one GPU: grid and vocab block swept.

    python benchmarks/bench_linear_cross_entropy.py --out benchmarks/results/linear-cross-entropy.json

The kernel reads a row twice (online max and sum, then the gradient) and writes it once: at V = 128256 in bf16
a row is 251 KiB, more than an SM's shared memory, so the second read comes from L2 only if the row is still
there. One program per row (the default) keeps as many rows in flight as fit on the SMs (1-2 at 32 warps, more
at smaller blocks), 33-66 MB or more on 132 SMs against the H200's 50 MB L2; a grid of k programs per SM, each
walking every (k x SMs)-th row, holds at most k x 33 MB. GB/s counts the least traffic, one read and one write
of the chunk (a copy moves the same): reading every row twice from HBM caps it at 2/3 of the copy's figure,
and above that the second read hit L2. Shapes: the chunk linear_cross_entropy makes for Llama-3's vocab (1024
x 128256) and Qwen2.5's (512 x 151936), bf16.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from _sweep import main, median_ms  # noqa: E402

from ppalli.kernels._utils import program_count  # noqa: E402
from ppalli.kernels.linear_cross_entropy import MAX_BLOCK_V, _cross_entropy_rows  # noqa: E402

SHAPES = {"llama3": (1024, 128256), "qwen2.5": (512, 151936)}
PROGRAMS_PER_SM = [None, 1, 2, 3, 4]  # None: one program per row
BLOCKS = [MAX_BLOCK_V, 16384, 8192]


def bench_shape(name: str, n: int, vocab: int) -> dict:
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16) * 2
    labels = torch.randint(0, vocab, (n,), device="cuda")
    loss = torch.empty(n, device="cuda")
    other = torch.empty_like(logits)
    gb = 2 * logits.numel() * logits.element_size() / 1e9  # one read, one write
    copy_ms = median_ms(lambda: other.copy_(logits))
    row = {"shape": name, "n": n, "vocab": vocab, "copy_ms": round(copy_ms, 4), "copy_gbps": round(gb / copy_ms * 1e3),
           "sms": program_count(logits.device), "runs": []}
    for block in BLOCKS:
        for per_sm in PROGRAMS_PER_SM:
            programs = per_sm * row["sms"] if per_sm else None
            # the kernel overwrites the logits with their gradient: later repeats read gradients, same traffic
            ms = median_ms(lambda b=block, p=programs: _cross_entropy_rows(logits, labels, loss, -100, None, p, b))
            row["runs"].append({"block": block, "programs_per_sm": per_sm, "ms": round(ms, 4),
                                "gbps": round(gb / ms * 1e3)})
    return row


def report(r: dict) -> None:
    print(f"{r['shape']} ({r['n']} x {r['vocab']} bf16, {r['sms']} SMs): copy {r['copy_ms']:.3f} ms, "
          f"{r['copy_gbps']} GB/s")
    for x in sorted(r["runs"], key=lambda x: x["ms"]):
        grid = f"{x['programs_per_sm']} per SM" if x["programs_per_sm"] else "one per row"
        print(f"  block {x['block']:>5}, {grid:>11}: {x['ms']:.3f} ms, {x['gbps']} GB/s")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
