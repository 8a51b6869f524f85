"""plan.fp8 on tiny random PEFT models (CPU, Triton's interpreter): with fp8 copies on every base layer the
fused path's loss and LoRA gradients stay within e4m3's error of the reference and differ from the bf16-exact
ones (the fp8 GEMMs ran); every base layer got both copies (forward and input gradient); revert() takes them
off again."""

import pytest
import torch
from fast_reference import CPU_TIER, grads_of, reference_loss, tiny_lora_model

pytest.importorskip("triton")
from ppalli.kernels import fp8  # noqa: E402
from ppalli.kernels.fp8 import FP8_ATTR  # noqa: E402
from ppalli.models.fast import apply_fast_path, backbone_of  # noqa: E402
from ppalli.models.fast_loss import fast_causal_lm_loss  # noqa: E402

pytestmark = CPU_TIER


def _batch(b=2, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _bases(model):
    return [m for layer in backbone_of(model).layers for m in layer.modules() if FP8_ATTR in m.__dict__]


@pytest.fixture
def every_gemm_in_fp8(monkeypatch):
    """The tiny batches have 22 rows: below FP8_MIN_ROWS, where plan.fp8 keeps bf16 GEMMs."""
    monkeypatch.setattr(fp8, "FP8_MIN_ROWS", 1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fp8_loss_and_gradients_stay_near_the_reference(family, every_gemm_in_fp8):
    model = tiny_lora_model(family)
    ids, labels = _batch()
    ref, _ = reference_loss(model, ids, labels)
    ref.backward()
    g_ref = grads_of(model)
    lines = []
    handle = apply_fast_path(model, log=lines.append, fp8=True)
    assert any("fp8 (e4m3, per-row scales) GEMMs for 14 frozen base layers" in line for line in lines), lines
    loss, _ = fast_causal_lm_loss(model, ids, labels)
    loss.backward()
    grads = grads_of(model)
    bases = _bases(model)
    assert len(bases) == 14  # q, k, v, o, gate, up, down of 2 layers
    for base in bases:  # each made its forward copy, and its input-gradient copy (q's holds the q/k/v stack's)
        kinds = {key[2] for key in base.__dict__[FP8_ATTR]._made}
        assert False in kinds, base
    # input-gradient copies: o, gate, up, down of both layers, q/k/v's stack in layer 1 (layer 0's input, the
    # frozen embeddings' output, needs no gradient)
    assert sum(True in {k[2] for k in b.__dict__[FP8_ATTR]._made} for b in bases) == 9
    handle.revert()
    assert not _bases(model) and any("back to bf16 GEMMs" in line for line in lines)

    # e4m3 operands: ~3e-2 relative error a GEMM on random data. The summed loss averages it out (seen 5.5e-5
    # llama, 1.4e-4 qwen2); the gradients carry it through 2 layers' forward and backward with reductions of
    # only 64 terms (seen 0.015-0.073 per tensor llama, 0.036-0.160 qwen2): ~2x margin. A wrong scale or layout
    # moves them by O(1).
    loss_rel = abs(loss.item() - ref.item()) / abs(ref.item())
    assert loss_rel < 2e-3, loss_rel
    worst = max(_rel(g, g_ref[n]) for n, g in grads.items())
    assert worst < 0.3, worst
    assert loss_rel > 0 and worst > 1e-3  # the fp32 fused path matches to ~1e-6: these moved by fp8


def test_fp8_off_by_default_leaves_the_layers_alone():
    model = tiny_lora_model("llama")
    handle = apply_fast_path(model, log=lambda _: None)
    assert not _bases(model)
    handle.revert()


def test_short_batches_keep_bf16_gemms():
    """Below FP8_MIN_ROWS tokens the layers with fp8 copies still run bf16: same numbers as without them."""
    model = tiny_lora_model("llama")
    ids, labels = _batch()
    handle = apply_fast_path(model, log=lambda _: None)
    plain, _ = fast_causal_lm_loss(model, ids, labels)
    handle.revert()
    handle = apply_fast_path(model, log=lambda _: None, fp8=True)
    short, _ = fast_causal_lm_loss(model, ids, labels)
    made = sum(len(b.__dict__[FP8_ATTR]._made) for b in _bases(model))
    handle.revert()
    assert short.item() == plain.item() and made == 0


def test_fp8_with_recompute_gives_the_gradients_of_fp8_without(every_gemm_in_fp8):
    """A recomputed layer quantizes its input again, to the same codes: full recompute changes nothing."""
    from ppalli.train import recompute

    results = []
    for mode in ("none", "full"):
        model = tiny_lora_model("llama").train()
        handle = apply_fast_path(model, log=lambda _: None, fp8=True)
        recompute.apply_recompute(model, mode, None)
        ids, labels = _batch()
        loss, _ = fast_causal_lm_loss(model, ids, labels)
        loss.backward()
        handle.revert()
        results.append((loss.detach(), grads_of(model)))
    (l0, g0), (l1, g1) = results
    assert l0.item() == l1.item()
    for name, g in g1.items():
        torch.testing.assert_close(g, g0[name], rtol=1e-6, atol=1e-7)
