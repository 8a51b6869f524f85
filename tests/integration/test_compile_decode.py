"""The decode step compiled by torch.compile (StaticDecoder(compile=True), `--compile` on chat / generate / eval), run
on the CPU through inductor: the eager step's logits, the cache's slots rounded up (compiled_slots), and one compile
shared by decoders whose caches round to the same size (a chat's turns, eval's batches). On CUDA the compiled step
is also captured in the graph (tests/gpu/test_graph_decode_gpu.py)."""

import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from fast.fast_reference import tiny_lora_model  # noqa: E402

from ppalli.infer.generate import _Decoder, _decoder  # noqa: E402
from ppalli.infer.graph import COMPILE_SLOTS, StaticDecoder, compiled_slots  # noqa: E402

CPU = torch.device("cpu")


def _model():
    model = tiny_lora_model("llama")
    for p in model.parameters():
        p.data.normal_(0, 0.2)  # LoRA B = 0 at init would hide the adapters
    return model


def _steps(decoder, ids, n):
    logits = [decoder.prefill(ids)]
    for _ in range(n):
        logits.append(decoder(logits[-1].argmax(-1, keepdim=True)).clone())
    return torch.stack(logits)


def test_compiled_caches_come_in_powers_of_two_from_the_minimum():
    assert [compiled_slots(n) for n in (1, 30, 256, 257, 700, 1024, 1025)] == [COMPILE_SLOTS] * 3 + [512, 1024,
                                                                                                 1024, 2048]


def test_the_compiled_step_gives_the_eager_logits_and_compiles_once_per_cache_size():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _model()
    with torch.inference_mode():
        ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
        eager = _steps(StaticDecoder(model, 30, CPU, graph=False), ids, 6)
        compiled = StaticDecoder(model, 30, CPU, graph=False, compile=True)
        assert compiled.max_len == COMPILE_SLOTS
        got = _steps(compiled, ids, 6)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        # another prompt and answer length, the same rounded cache: the compiled step is reused as it is
        _steps(StaticDecoder(model, 60, CPU, graph=False, compile=True), ids[:, :5], 3)
        assert counters["stats"]["unique_graphs"] == graphs


def test_compile_without_the_graph_is_logged_and_left_out(caplog):
    model = tiny_lora_model("llama", use_dora=True)  # DoRA: not the decode layers' (they would take over)
    with caplog.at_level(logging.INFO, logger="ppalli.infer"):
        step = _decoder(model, CPU, 40, graph=None, compile=True)
    assert isinstance(step, _Decoder)
    assert "without torch.compile" in caplog.text and "cpu" in caplog.text


def test_compile_problem_names_a_missing_triton_and_quantized_bases(monkeypatch):
    import importlib.util

    import pytest

    from ppalli.infer.graph import compile_problem

    pytest.importorskip("triton")
    model = _model()
    assert compile_problem(model) is None

    class Linear4bit(torch.nn.Linear):
        pass

    model.add_module("probe", Linear4bit(2, 2))
    assert "quantized" in compile_problem(model)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert "triton is not installed" in compile_problem(_model())
