"""ppalli.train.recompute over the fused layers: every mode gives the gradients of no recompute, the recompute
skips the MLP's down projection (its output is thrown away) and its activation (h Ad^T comes from the
forward's stash), offload chains its layers so each backward prefetches the layer below, and selective
recomputes exactly the layers it names."""

import pytest
import torch
from fast_reference import CPU_TIER, assert_close, grads_of, tiny_lora_model

pytest.importorskip("triton")
import ppalli.kernels.lora_mlp as lora_mlp  # noqa: E402
from ppalli.kernels._utils import current_stash, is_recomputing, recompute_stash, recomputing  # noqa: E402
from ppalli.models.fast import apply_fast_path, backbone_of  # noqa: E402
from ppalli.models.fast_loss import fast_causal_lm_loss  # noqa: E402
from ppalli.train import recompute  # noqa: E402

pytestmark = CPU_TIER


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


def _loss_and_grads(mode, layers=None, counter=None, family="llama"):
    model = tiny_lora_model(family).train()
    handle = apply_fast_path(model, attention_backend="auto")
    recompute.apply_recompute(model, mode, layers)
    ids, labels = _batch()
    loss, _ = fast_causal_lm_loss(model, ids, labels)
    loss.backward()
    handle.revert()
    return loss.detach(), grads_of(model)


@pytest.mark.parametrize("mode,layers", [("full", None), ("offload", None), ("selective", 1)])
def test_every_mode_gives_the_gradients_of_no_recompute(mode, layers):
    ref_loss, ref = _loss_and_grads("none")
    loss, grads = _loss_and_grads(mode, layers)
    assert_close("loss", loss, ref_loss, "loss")
    assert ref.keys() == grads.keys() and len(ref) > 0
    for name, g in grads.items():
        assert_close(name, g, ref[name], "grad")


def test_qk_norm_family_recomputes_to_the_same_gradients():
    """Qwen3's q/k norms inside lora_qkv's RoPE pass, its saved base outputs packed and unpacked by the recompute."""
    ref_loss, ref = _loss_and_grads("none", family="qwen3")
    loss, grads = _loss_and_grads("full", family="qwen3")
    assert_close("loss", loss, ref_loss, "loss")
    assert ref.keys() == grads.keys() and len(ref) > 0
    for name, g in grads.items():
        assert_close(name, g, ref[name], "grad")


@pytest.mark.parametrize("mode", ["full", "offload"])
def test_recompute_skips_the_down_projection(mode, monkeypatch):
    """Forward: gate, up and down base GEMMs per MLP; the recompute makes gate and up only."""
    calls = []
    base_mm = lora_mlp.base_mm

    def record(x, b, xq=None):
        calls.append(("down" if b.in_features > b.out_features else "gate/up", is_recomputing()))  # (64 -> 96 -> 64)
        return base_mm(x, b, xq)

    monkeypatch.setattr(lora_mlp, "base_mm", record)
    _loss_and_grads(mode)
    layers = 2
    assert calls.count(("gate/up", False)) == 2 * layers and calls.count(("gate/up", True)) == 2 * layers
    assert calls.count(("down", False)) == layers and calls.count(("down", True)) == 0


@pytest.mark.parametrize("mode,layers", [("full", None), ("offload", None), ("selective", 1)])
def test_recompute_reads_down_lora_product_from_the_forward(mode, layers, monkeypatch):
    """The recompute takes h Ad^T from the stash its forward filled: no activation kernel runs again."""
    calls = []
    glu = lora_mlp.lora_glu_fwd_had
    monkeypatch.setattr(lora_mlp, "lora_glu_fwd_had", lambda *a, **k: calls.append(is_recomputing()) or glu(*a, **k))
    _loss_and_grads(mode, layers)
    assert calls.count(False) == 2 and calls.count(True) == 0  # one forward per layer, none in the recompute


def test_stash_is_scoped_per_call():
    assert current_stash() is None
    outer, inner = {}, {}
    with recompute_stash(outer):
        assert current_stash() is outer
        with recompute_stash(inner):
            assert current_stash() is inner
        assert current_stash() is outer
    assert current_stash() is None


def test_offload_prefetches_the_layer_below(monkeypatch):
    """Each layer's backward starts the copy of the layer below's input before recomputing itself."""
    order = []
    real = recompute._prefetch
    monkeypatch.setattr(recompute, "_prefetch", lambda ctx: order.append(id(ctx)) or real(ctx))
    _loss_and_grads("offload")
    # top layer: its own fetch, then the one below; the bottom layer finds its input already fetched
    assert len(order) == 3 and order[1] == order[2]


def test_recomputing_flag_is_scoped():
    assert not is_recomputing()
    with recomputing():
        assert is_recomputing()
        with recomputing(False):
            assert not is_recomputing()
        assert is_recomputing()
    assert not is_recomputing()


def test_selected_layers_spread_evenly():
    assert recompute.selected_layers(32, 16) == list(range(0, 32, 2))
    assert recompute.selected_layers(32, 4) == [0, 8, 16, 24]
    assert recompute.selected_layers(32, 32) == list(range(32))
    assert recompute.selected_layers(32, 0) == []
    assert recompute.selected_layers(5, 9) == list(range(5))


def test_selective_wraps_the_layers_it_names():
    model = tiny_lora_model("llama").train()
    assert recompute.apply_recompute(model, "selective", 1) == 1
    wrapped = ["forward" in layer.__dict__ for layer in backbone_of(model).layers]
    assert wrapped == [True, False]
    assert recompute.apply_recompute(model, "selective") == 1  # default: half of 2
    recompute.remove_recompute(model)
    assert not any("forward" in layer.__dict__ for layer in backbone_of(model).layers)
