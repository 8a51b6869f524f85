"""apply_fast_path on tiny random PEFT models built from configs: the fused layers compute what HF + PEFT
compute (logits, the summed loss, every LoRA gradient; packed and padded batches), revert() restores the
original layers exactly, importing ppalli changes nothing, and unsupported cases fall back with a reason."""

import subprocess
import sys
import textwrap

import pytest
import torch
from fast_reference import CPU_TIER, assert_close, grads_of, reference_loss, tiny_lora_model

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.models.fast import apply_fast_path, backbone_of, supports  # noqa: E402
from ppalli.models.fast_loss import fast_causal_lm_loss  # noqa: E402

pytestmark = CPU_TIER

# Gemma-2 logit softcapping is missing from HF's SDPA path: its reference runs eager.
FAMILIES = {"llama": "sdpa", "qwen2": "sdpa", "qwen3": "sdpa", "mistral": "sdpa", "gemma": "sdpa",
            "gemma2": "eager", "gemma3": "sdpa", "phi3": "sdpa", "exaone4": "sdpa"}


def _batch(b=2, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a masked prompt
    return ids, labels


def _apply(model, lines=None):
    return apply_fast_path(model, attention_backend="auto", log=(lines.append if lines is not None else None))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_match_reference(family):
    model = tiny_lora_model(family)
    ids, _ = _batch()
    ref = model(input_ids=ids).logits
    handle = _apply(model)
    assert_close("logits", model(input_ids=ids).logits, ref, "logits")
    handle.revert()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loss_and_lora_gradients_match_reference(family):
    _check_against_reference(tiny_lora_model(family, attn=FAMILIES[family]))


def _check_against_reference(model) -> dict:
    """The fast path's loss and every trained parameter's gradient against the reference path's; -> the
    reference's gradients."""
    ids, labels = _batch(t=11)  # longer than the tiny configs' sliding windows (6)
    ref, n_ref = reference_loss(model, ids, labels)
    ref.backward()
    g_ref = grads_of(model)
    handle = _apply(model)
    loss, n = fast_causal_lm_loss(model, ids, labels)
    loss.backward()
    handle.revert()
    assert n.item() == n_ref.item() == 2 * 8  # labels[:, 1:] minus the two masked prompt positions
    assert_close("loss", loss, ref, "loss")
    for name, g in grads_of(model).items():
        assert_close(name, g, g_ref[name], "grad")
    return g_ref


def test_trained_qk_norms_run_one_by_one_and_get_their_gradients():
    """Qwen3 with its q/k norm weights training: the fused norm + RoPE pass gives them no gradient, so the layers
    norm q and k op by op instead; the loss and every gradient, the norms' too, as the reference's."""
    model = tiny_lora_model("qwen3")
    for name, p in model.named_parameters():
        if "q_norm" in name or "k_norm" in name:
            p.requires_grad_()
    g_ref = _check_against_reference(model)
    assert any("q_norm" in name for name in g_ref) and any("k_norm" in name for name in g_ref)

def test_trained_post_norms_run_one_by_one_and_get_their_gradients():
    """Gemma-2 with its sandwich norms training: rms_norm_add gives norm weights no gradient, so those layers
    add and norm op by op; the loss and every gradient, the norms' too, as the reference's."""
    model = tiny_lora_model("gemma2", attn="eager")
    for name, p in model.named_parameters():
        if "feedforward_layernorm" in name or "post_attention_layernorm" in name:
            p.requires_grad_()
    g_ref = _check_against_reference(model)
    assert any("post_feedforward_layernorm" in name for name in g_ref)
    assert any("pre_feedforward_layernorm" in name for name in g_ref)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_packed_row_equals_samples_one_by_one(family):
    """A packed row (position_ids restart, cu_seqlens, first label of each sample -100) gives the sum of
    the per-sample losses and their summed gradients."""
    model = tiny_lora_model(family)
    lengths = [6, 4, 7]
    samples = [_batch(1, n, seed=i) for i, n in enumerate(lengths)]
    ref_total = 0.0
    for ids, labels in samples:
        ref, _ = reference_loss(model, ids, labels)
        ref.backward()  # gradients add up over the samples
        ref_total += ref.item()
    g_ref = grads_of(model)
    ids = torch.cat([s[0] for s in samples], 1)
    labels = torch.cat([s[1] for s in samples], 1)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 6, 10, 17], dtype=torch.int32)
    handle = _apply(model)
    loss, n = fast_causal_lm_loss(model, ids, labels, position_ids=pos, cu_seqlens=cu, max_seqlen=7)
    loss.backward()
    assert n.item() == sum(max(m - 3, 0) for m in lengths)
    assert abs(loss.item() - ref_total) <= 1e-4 * abs(ref_total), (loss.item(), ref_total)
    for name, g in grads_of(model).items():
        assert_close(name, g, g_ref[name], "grad")
    # positions alone (no cu_seqlens) find the same samples
    loss_pos, _ = fast_causal_lm_loss(model, ids, labels, position_ids=pos)
    assert_close("loss from position_ids", loss_pos, loss, "loss")
    handle.revert()


def test_right_padded_batch_equals_unpadded_rows():
    model = tiny_lora_model("llama")
    ids, labels = _batch(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    labels[1, 6:] = -100
    ref = reference_loss(model, ids[:1], labels[:1])[0] + reference_loss(model, ids[1:, :6], labels[1:, :6])[0]
    handle = _apply(model)
    loss, n = fast_causal_lm_loss(model, ids, labels, attention_mask=mask)
    handle.revert()
    assert n.item() == 6 + 3
    assert_close("loss", loss, ref, "loss")


@pytest.mark.parametrize("packed", [False, True])
def test_lm_head_on_the_trained_rows_only(packed):
    """loss_rows (objectives.loss_rows, from the host labels): the lm_head runs on the rows with a loss only;
    the loss and every LoRA gradient match the run over all rows, padded or packed, and a micro-batch with no
    trained row gives 0 and zero gradients."""
    from ppalli.train.objectives import loss_rows

    model = tiny_lora_model("llama")
    ids, labels = _batch(2, 9)
    labels[1, 4:6] = -100  # a second masked span inside the answer
    kwargs = {}
    if packed:
        ids, labels = ids.reshape(1, -1), labels.reshape(1, -1)
        kwargs = dict(position_ids=torch.arange(9).repeat(2)[None], cu_seqlens=torch.tensor([0, 9, 18]).int(),
                      max_seqlen=9)
    handle = _apply(model)
    loss_all, n_all = fast_causal_lm_loss(model, ids, labels, **kwargs)
    loss_all.backward()
    g_all = grads_of(model)
    model.zero_grad()
    rows = loss_rows(labels)
    assert rows is not None and rows.numel() == n_all.item() < labels.numel()
    loss, n = fast_causal_lm_loss(model, ids, labels, loss_rows=rows, **kwargs)
    loss.backward()
    assert n.item() == n_all.item()
    assert_close("loss", loss, loss_all, "loss")
    for name, g in grads_of(model).items():
        assert_close(name, g, g_all[name], "grad")
    model.zero_grad()
    none = torch.full_like(labels, -100)
    loss0, n0 = fast_causal_lm_loss(model, ids, none, loss_rows=torch.zeros(0, dtype=torch.long), **kwargs)
    loss0.backward()
    handle.revert()
    assert loss0.item() == 0.0 and n0.item() == 0
    assert all(g is None or not g.any() for g in (p.grad for p in model.parameters() if p.requires_grad))


def test_recompute_wrapper_reruns_the_fused_layers(monkeypatch):
    """ppalli.train.recompute wraps the layer's instance forward after the swap: the fused forward runs again
    in the backward, gradients are unchanged, and revert() restores the class forward under the wrapper."""
    recompute = pytest.importorskip("ppalli.train.recompute")
    from ppalli.models.fast import FusedDecoderLayer

    calls = []
    mlp = FusedDecoderLayer._mlp
    monkeypatch.setattr(FusedDecoderLayer, "_mlp", lambda self, *a: calls.append(1) or mlp(self, *a))
    model = tiny_lora_model("llama").train()
    ids, labels = _batch()
    ref, _ = reference_loss(model, ids, labels)
    ref.backward()
    g_ref = grads_of(model)
    handle = _apply(model)
    assert recompute.apply_recompute(model, "full") == 2
    loss, _ = fast_causal_lm_loss(model, ids, labels)
    assert len(calls) == 2
    loss.backward()
    assert len(calls) == 4  # each layer recomputed once
    handle.revert()  # also drops the recompute wrappers over the fused forward (the recipe's order)
    assert all("forward" not in layer.__dict__ for layer in backbone_of(model).layers)
    recompute.remove_recompute(model)  # then a no-op
    assert all("forward" not in layer.__dict__ for layer in backbone_of(model).layers)
    assert_close("loss", loss, ref, "loss")
    for name, g in grads_of(model).items():
        assert_close(name, g, g_ref[name], "grad")


def test_revert_restores_the_original_layers_exactly():
    model = tiny_lora_model("llama")
    layers = list(backbone_of(model).layers)
    cls_forward = type(layers[0]).forward
    ids, _ = _batch()
    before = model(input_ids=ids).logits
    handle = _apply(model)
    assert all("forward" in layer.__dict__ for layer in layers)
    assert type(layers[0]).forward is cls_forward  # the class is never touched
    handle.revert()
    assert not handle.active
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert all(layer.forward.__func__ is cls_forward for layer in layers)
    assert torch.equal(model(input_ids=ids).logits, before)  # the same code path: bit for bit
    _apply(model).revert()  # and it can be applied again


def test_each_swap_is_logged_and_a_second_apply_is_refused():
    model = tiny_lora_model("qwen2")
    lines = []
    handle = _apply(model, lines)
    assert sum("layers." in line and "-> fused" in line for line in lines) == 2
    assert any("attention sdpa" in line for line in lines)
    with pytest.raises(PpalliError, match="already applied"):
        _apply(model)
    # q/k/v go straight into RoPE in qwen2: their base weights are laid out as one block, and back on revert
    assert any("q/k/v base weights of 2 layers laid out as one" in line for line in lines)
    attn = model.base_model.model.model.layers[0].self_attn

    def storages():
        return {getattr(attn, n).get_base_layer().weight.untyped_storage().data_ptr() for n in ("q_proj", "k_proj",
                                                                                              "v_proj")}
    assert len(storages()) == 1
    handle.revert()
    assert "reverted 2 layers" in lines[-1] and "back in their own storage" in lines[-2]
    assert len(storages()) == 3


def test_runtime_fallbacks_run_the_original_forward():
    """A KV cache (generation) and merged adapters: the original layer runs, once-per-reason logged."""
    model = tiny_lora_model("llama")
    ids, _ = _batch(1, 5)
    lines = []
    handle = _apply(model, lines)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
    assert out.shape == (1, 8)
    assert sum("KV cache" in line for line in lines) == 1
    ref = model(input_ids=ids).logits
    model.merge_adapter()
    assert_close("merged", model(input_ids=ids).logits, ref, "logits")
    assert any("merged" in line for line in lines)
    with pytest.raises(PpalliError, match="merged"):
        fast_causal_lm_loss(model, ids, ids)  # the loss never silently falls back
    model.unmerge_adapter()
    handle.revert()


def test_disabled_adapter_runs_fused_as_the_base_model():
    model = tiny_lora_model("llama")
    ids, _ = _batch()
    with model.disable_adapter():
        ref = model(input_ids=ids).logits
        handle = _apply(model)
        assert_close("base logits", model(input_ids=ids).logits, ref, "logits")
        handle.revert()


def test_unsupported_cases_fall_back_with_a_reason():
    from peft import LoraConfig

    dora = tiny_lora_model("llama", use_dora=True)
    ok, why = supports(dora)
    assert not ok and "DoRA" in why
    dropout = tiny_lora_model("llama", lora_dropout=0.1)  # in eval mode still: training would apply it
    ok, why = supports(dropout)
    assert not ok and "dropout" in why
    partial = tiny_lora_model("llama", target_modules=["q_proj", "v_proj"])
    ok, why = supports(partial)
    assert not ok and "LoRA missing" in why and "k_proj" in why
    plain = tiny_lora_model("llama")
    assert supports(plain, LoraConfig(lora_dropout=0.05))[0] is False
    assert supports(plain, LoraConfig(use_dora=True)) == (False, "DoRA (use_dora) runs on the reference path")
    with pytest.raises(PpalliError, match="not applicable"):
        apply_fast_path(partial, attention_backend="auto")


def test_unsupported_family_falls_back():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"]))
    ok, why = supports(model)
    assert not ok and ("GPT2Block" in why or "no decoder stack" in why)


def test_without_cuda_or_interpreter_the_reason_says_so(monkeypatch):
    model = tiny_lora_model("llama")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = supports(model)
    assert not ok and "CUDA" in why


def test_importing_ppalli_changes_nothing_in_transformers():
    """In a fresh interpreter: every attribute of the model classes and modeling modules is the same object
    before and after importing ppalli's fast path, and before and after applying it to a model and running
    it (the baseline for the second check is taken after HF built and ran the model: HF caches values on its
    own classes then)."""
    code = textwrap.dedent("""
        import os, sys, torch
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import transformers.models.llama.modeling_llama as ml, transformers.models.qwen2.modeling_qwen2 as mq
        import peft.tuners.lora.layer as pl, torch.nn.functional as F
        def snap():
            out = {}
            for mod in (ml, mq, pl, F):
                out.update({(mod.__name__, k): v for k, v in vars(mod).items()})
                for k, v in vars(mod).items():
                    if isinstance(v, type):
                        out.update({(mod.__name__, k, a): b for a, b in vars(v).items()})
            return out
        def check(name, before, now):
            changed = [k for k in before if now.get(k) is not before[k]]
            assert not changed and set(now) == set(before), (name, changed[:5], set(now) ^ set(before))
        before = snap()
        import ppalli, ppalli.models.fast, ppalli.models.attention, ppalli.kernels.lora_mlp
        from ppalli.models.families import all_families
        all_families()
        check("import", before, snap())
        sys.path.insert(0, sys.argv[1])
        from fast_reference import tiny_lora_model
        model = tiny_lora_model("llama")
        ids = torch.randint(0, 256, (1, 5))
        model(input_ids=ids)
        before = snap()
        handle = ppalli.models.fast.apply_fast_path(model, attention_backend="auto", log=lambda s: None)
        model(input_ids=ids)
        check("apply", before, snap())
        handle.revert()
        check("revert", before, snap())
        print("unchanged")
    """)
    here = str(__import__("pathlib").Path(__file__).parent)
    res = subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "unchanged" in res.stdout, res.stderr[-3000:]
