"""linear_logps (ppalli/train/linear_logps.py) forward + backward against the plain path (full logits,
fp32 log-softmax, gather), for a frozen head (d logp / d h made in the forward: by the fused cross entropy's
Triton kernel, what CUDA runs, or by torch's ops) and for the recompute path (the backward makes each chunk's
logits again; what a trained head takes, forced here on a frozen one).

    python benchmarks/bench_linear_logps.py --out benchmarks/results/linear-logps.json

Shapes: 4096 trained tokens through Llama-3.2-1B's and Llama-3.1-8B's heads (V 128256), bf16. Medians of
triton.testing.do_bench, ms; peak: the most memory the call allocated over its inputs, GiB.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from _sweep import main, median_ms  # noqa: E402

import ppalli.train.linear_logps as linear_logps_module  # noqa: E402
from ppalli.train.linear_logps import CHUNK_ROWS, LinearLogpsFunction  # noqa: E402

SHAPES = {"1b": (4096, 2048), "8b": (4096, 4096)}
VOCAB, DTYPE = 128256, torch.bfloat16


def _plain(h, w, t):
    return (h @ w.t()).float().log_softmax(-1).gather(1, t[:, None]).squeeze(1)


def _kernel(h, w, t):
    return LinearLogpsFunction.apply(h, w, t, None, CHUNK_ROWS, True, False)


def _made(h, w, t):
    real = linear_logps_module._use_kernel
    linear_logps_module._use_kernel = lambda *_: False  # torch's ops for the chunk, d logp / d h still in the forward
    try:
        return LinearLogpsFunction.apply(h, w, t, None, CHUNK_ROWS, True, False)
    finally:
        linear_logps_module._use_kernel = real


def _recompute(h, w, t):
    # need_dw=True takes the recompute path; the frozen weight gets no gradient from autograd all the same
    return LinearLogpsFunction.apply(h, w, t, None, CHUNK_ROWS, True, True)


def bench_shape(name: str, n: int, d: int) -> dict:
    torch.manual_seed(0)
    h = (torch.randn(n, d, device="cuda", dtype=DTYPE)).requires_grad_(True)
    w = torch.randn(VOCAB, d, device="cuda", dtype=DTYPE) * 0.02
    t = torch.randint(0, VOCAB, (n,), device="cuda")
    g = torch.randn(n, device="cuda")
    row = {"shape": name, "rows": n, "hidden": d}
    ref_logp = _plain(h, w, t)
    ref = torch.autograd.grad(ref_logp, h, g)[0]
    for label, fn in (("plain", _plain), ("kernel", _kernel), ("made_in_forward", _made), ("recompute", _recompute)):
        def step(fn=fn):
            return torch.autograd.grad(fn(h, w, t), h, g)[0]

        logp_err = ((fn(h, w, t).detach() - ref_logp.detach()).abs().max()).item()
        got = step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        row[label] = {"ms": round(median_ms(step), 3), "peak_gib": round(peak, 2), "rel_err_dh": float(f"{err:.2e}"),
                      "max_err_logp": float(f"{logp_err:.2e}")}
    return row


def report(row: dict) -> None:
    print(f"{row['shape']} ({row['rows']} x {row['hidden']}):", "; ".join(
        f"{k} {v['ms']} ms, +{v['peak_gib']} GiB, dh rel err {v['rel_err_dh']}, logp max err {v['max_err_logp']}"
        for k, v in row.items()
        if isinstance(v, dict)))


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
