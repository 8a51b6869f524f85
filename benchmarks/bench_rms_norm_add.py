"""rms_norm_add (ppalli/kernels/rms_norm_add.py) on one GPU against the ops it replaces.

    python benchmarks/bench_rms_norm_add.py --out benchmarks/results/rms-norm-add.json

Gemma-2/3's attention side ran x = r + rms_norm(y), h = rms_norm(x) (the RMSNorm kernel, torch's add, the
kernel again) and, backward, two norm backwards with autograd's sum of x's two gradients between them; the
MLP side the same without h. Shapes: (N, d) at 4 x 2048 tokens for Gemma-3-4B (d 2560) and 12B (3840), and
EXAONE-4-32B's d 5120. bf16, times are medians of triton.testing.do_bench, ms; GB/s counts the fused
kernel's own reads and writes (forward 4 passes with h, 3 without; backward 6).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from _sweep import main, median_ms, rel_err  # noqa: E402

from ppalli.kernels.rms_norm import rms_norm  # noqa: E402
from ppalli.kernels.rms_norm_add import rms_norm_add  # noqa: E402

SHAPES = {"gemma3-4b": (8192, 2560), "gemma3-12b": (8192, 3840), "exaone4-32b": (8192, 5120)}
EPS, OFFSET, DTYPE = 1e-6, 1.0, torch.bfloat16


def _ops(r, y, w, w2):
    x = r + rms_norm(y, w, EPS, OFFSET)
    return (x, rms_norm(x, w2, EPS, OFFSET)) if w2 is not None else (x,)


def _fused(r, y, w, w2):
    out = rms_norm_add(r, y, w, EPS, OFFSET, (w2, EPS) if w2 is not None else None)
    return out if w2 is not None else (out,)


def _times(fn, r, y, w, w2, grads) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of fn on leaves r, y with the given output gradients."""
    def fwd_bwd():
        r.grad = y.grad = None
        outs = fn(r, y, w, w2)
        torch.autograd.backward(outs, grads[:len(outs)])

    with torch.no_grad():
        fwd = median_ms(lambda: fn(r, y, w, w2))
    return fwd, median_ms(fwd_bwd)


def bench_shape(name: str, n: int, d: int) -> dict:
    def t(*shape, grad=False):
        return torch.randn(*shape, device="cuda", dtype=DTYPE).requires_grad_(grad)

    r, y, w, w2 = t(n, d, grad=True), t(n, d, grad=True), t(d) * 0.1, t(d) * 0.1
    grads = (t(n, d), t(n, d))
    row = {"shape": name, "n": n, "d": d, "cases": []}
    for label, next_w in (("attention side (with the next norm)", w2), ("MLP side (post-norm alone)", None)):
        ops_f, ops_fb = _times(_ops, r, y, w, next_w, grads)
        fu_f, fu_fb = _times(_fused, r, y, w, next_w, grads)
        passes = 4 if next_w is not None else 3
        outs_ref, outs = _ops(r, y, w, next_w), _fused(r, y, w, next_w)
        row["cases"].append({
            "case": label, "ops_fwd_ms": round(ops_f, 4), "ops_fwd_bwd_ms": round(ops_fb, 4),
            "fused_fwd_ms": round(fu_f, 4), "fused_fwd_bwd_ms": round(fu_fb, 4),
            "fused_fwd_gbps": round(passes * n * d * 2 / fu_f / 1e6, 1),
            "fused_bwd_gbps": round(6 * n * d * 2 / (fu_fb - fu_f) / 1e6, 1) if fu_fb > fu_f else None,
            "rel_err": rel_err(tuple(outs), tuple(outs_ref))})
    return row


def report(r: dict) -> None:
    print(f"{r['shape']} (N {r['n']}, d {r['d']}):")
    for c in r["cases"]:
        print(f"  {c['case']}: ops fwd {c['ops_fwd_ms']:.4f} ms, fwd+bwd {c['ops_fwd_bwd_ms']:.4f}; fused fwd "
              f"{c['fused_fwd_ms']:.4f} ({c['fused_fwd_gbps']} GB/s), fwd+bwd {c['fused_fwd_bwd_ms']:.4f} "
              f"(bwd {c['fused_bwd_gbps']} GB/s); rel err {c['rel_err']}")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
