"""benchmarks/count_launches.py on the CPU: one decoder layer's launches in a fast-path train step, and the
ones the factor cache removed stay removed (the A-stacks and the factors' bf16 copies come from one
multi-tensor copy a pass, not a cat and a cast a use)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import count_launches  # noqa: E402


def test_a_layers_launches():
    one, two = count_launches.count_step(1, "cpu"), count_launches.count_step(2, "cpu")
    layer = {name: two[name] - one.get(name, 0) for name in two}
    assert 40 <= sum(layer.values()) <= 70, layer  # 65 seen on 2026-12-02
    # lora_add_rms_norm's kernel twice: o's term + residual + the MLP's norm, and down's term + residual
    for kernel, n in (("_lora_glu_fwd_kernel", 1), ("_lora_glu_bwd_kernel", 1), ("_lora_add_rms_norm_fwd_kernel", 2)):
        assert layer["triton:" + kernel] == n, kernel
    assert layer.get("cat.default", 0) <= 2, "only the backward's (N, sum r) dxa cats: the A-stacks are cached"
    assert layer.get("_to_copy.default", 0) <= 9, "only the CPU's factor-gradient casts: the forward's are cached"
    assert two["_foreach_copy_.default"] == 1, "one multi-tensor copy of the factors a pass"
