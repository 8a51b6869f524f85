"""benchmarks/bench_gemm.py on the CPU with small shapes: each row's FLOP count is the 2 M N K of the products
it times, summed (a wrong count would misstate every TFLOP/s the GPU run prints)."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_gemm  # noqa: E402


def test_each_row_counts_the_flops_of_its_product(monkeypatch):
    seen = []
    mm, addmm, addmm_ = torch.mm, torch.addmm, torch.Tensor.addmm_

    def record(a, b):
        seen.append(2 * a.shape[0] * a.shape[1] * b.shape[1])

    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: record(a, b) or mm(a, b, **kw))  # kw: out= (pad: rows)
    monkeypatch.setattr(torch, "addmm", lambda c, a, b: record(a, b) or addmm(c, a, b))
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, a, b: record(a, b) or addmm_(self, a, b))
    scaled_mm = torch._scaled_mm  # the fp8: rows
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, **kw: record(a, b) or scaled_mm(a, b, **kw))
    # tokens, hidden, q, kv, intermediate, vocab: all distinct, so a swapped factor changes the count
    rows = bench_gemm._rows(24, 16, 32, 8, 40, 50, device="cpu")
    assert rows
    for label, flops, fn in rows:
        seen.clear()
        fn()
        assert sum(seen) == flops and bool(seen) == bool(flops), label  # pad: "as now" times two skinny products;
        # a row of 0 FLOPs times no product (fp8: quantizing an activation)
