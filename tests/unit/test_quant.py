"""quantize_model_4bit on a tiny Llama (CPU): the swap, its forward, LoRA on top, the loader config, errors."""

import copy
import logging
import sys

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from ppalli.errors import ModelError  # noqa: E402
from ppalli.kernels.nf4 import dequantize_weight  # noqa: E402
from ppalli.models.quant import (  # noqa: E402
    bnb_config,
    check_4bit_support,
    keep_standard_layout,
    quantize_model_4bit,
)

N_LINEAR = 2 * 7  # per decoder layer: q, k, v, o, gate, up, down


def tiny_llama(seed: int = 0, **overrides):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, **overrides)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def linear4bit_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_swaps_every_linear_but_lm_head_and_logs_it(quant_type, caplog):
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="ppalli"):
        out = quantize_model_4bit(model, quant_type=quant_type, compute_dtype=torch.float32)
    assert out is model and len(linear4bit_names(model)) == N_LINEAR
    assert type(model.lm_head) is torch.nn.Linear and model.is_loaded_in_4bit
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight.quant_state.quant_type == quant_type and layer.weight.quant_state.nested
    assert f"quantized {N_LINEAR} Linear layers to {quant_type}" in caplog.text
    assert "kept 16-bit: lm_head" in caplog.text


@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_equals_the_model_with_dequantized_weights(double_quant):
    # The 4-bit model must compute exactly x @ dequant(W).T: build that model by hand and compare on CPU.
    model = tiny_llama()
    dense = copy.deepcopy(model)
    quantize_model_4bit(model, double_quant=double_quant, compute_dtype=torch.float32)
    assert model.model.layers[1].self_attn.k_proj.weight.quant_state.nested == double_quant
    with torch.no_grad():
        for name in linear4bit_names(model):
            dense.get_submodule(name).weight.copy_(dequantize_weight(model.get_submodule(name)))
        got, want = model(ids()).logits, dense(ids()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_quantized_logits_stay_near_the_16bit_ones():
    model = tiny_llama()
    with torch.no_grad():
        want = model(ids()).logits
        got = quantize_model_4bit(model, compute_dtype=torch.float32)(ids()).logits
    # NF4 moves each weight by up to 15% of its block's absmax; the logits move, but stay correlated.
    assert 0 < (got - want).abs().max() < 0.5 * want.abs().max()
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.9


def test_skip_modules_and_tied_weights_stay_16bit(caplog):
    model = tiny_llama(tie_word_embeddings=True)
    with caplog.at_level(logging.INFO, logger="ppalli"):
        quantize_model_4bit(model, compute_dtype=torch.float32, skip_modules=("mlp",))
    names = linear4bit_names(model)
    assert len(names) == 2 * 4 and not any(".mlp." in n for n in names)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: never quantized, tie intact
    assert "lm_head" in caplog.text


def test_lora_attaches_to_4bit_layers_and_trains():
    model = quantize_model_4bit(tiny_llama(), compute_dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, peft.tuners.lora.bnb.Linear4bit)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 2 and all("lora_" in n for n in trainable)  # A and B, q and v, 2 layers
    opt = torch.optim.SGD(trainable.values(), lr=1.0)
    before = model(ids()).logits.detach()
    model(input_ids=ids(), labels=ids()).loss.backward()
    # B starts at zero, so only B gets a gradient on the first step; the 4-bit weights get none.
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    opt.step()
    assert not torch.equal(model(ids()).logits, before)


def test_bnb_config_loads_a_checkpoint_in_4bit(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    cfg = bnb_config("nf4", True, torch.float32)
    assert (cfg.load_in_4bit, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert cfg.bnb_4bit_compute_dtype == torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)
    assert len(linear4bit_names(model)) == N_LINEAR
    layer = model.model.layers[0].self_attn.o_proj
    assert torch.equal(dequantize_weight(layer), bnb.functional.dequantize_4bit(layer.weight, layer.weight.quant_state))
    assert model(ids()).logits.shape == (2, 12, 256)


def test_layer_not_a_whole_number_of_blocks_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 96), torch.nn.Linear(96, 8))
    with pytest.raises(ModelError, match=r"2 linear layer\(s\).*1 \(in_features=32\), 2 \(in_features=96\).*skip_"):
        quantize_model_4bit(model, compute_dtype=torch.float32)
    quantize_model_4bit(model, compute_dtype=torch.float32, skip_modules=("1", "2"))
    assert isinstance(model[0], bnb.nn.Linear4bit) and type(model[2]) is torch.nn.Linear


def test_nothing_left_to_quantize():
    model = quantize_model_4bit(tiny_llama(), compute_dtype=torch.float32)
    with pytest.raises(ModelError, match="already 4-bit"):
        quantize_model_4bit(model, compute_dtype=torch.float32)


def test_bad_quant_type():
    with pytest.raises(ModelError, match="not one of"):
        quantize_model_4bit(tiny_llama(), quant_type="int4", compute_dtype=torch.float32)
    with pytest.raises(ModelError, match="not one of"):
        bnb_config("nf8")


def test_missing_bitsandbytes_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(ModelError, match=r"pip install ppalli\[qlora\]"):
        quantize_model_4bit(tiny_llama(), compute_dtype=torch.float32)


def test_device_without_4bit_support_is_a_clear_error(monkeypatch):
    def unsupported(*args, **kwargs):
        raise NotImplementedError("Could not run 'bitsandbytes::quantize_4bit' with arguments from the 'Foo' backend")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", unsupported)
    with pytest.raises(ModelError, match=r"bitsandbytes \S+ cannot run 4-bit layers on cpu \(Could not run.*"
                                         r"plan.quantization: none"):
        check_4bit_support("cpu")
    model = tiny_llama()
    with pytest.raises(ModelError, match="cannot run 4-bit layers on cpu"):
        quantize_model_4bit(model, compute_dtype=torch.float32)
    assert not linear4bit_names(model)  # refused before any layer was swapped


def test_cpu_inference_keeps_the_standard_layout():
    # bnb's AVX512-BF16 CPU path would repack the weight at the first no-grad eval forward; ours opt out.
    model = quantize_model_4bit(tiny_llama(), compute_dtype=torch.float32)
    with torch.no_grad():
        model(ids())
    layer = model.model.layers[0].self_attn.q_proj
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    dequantize_weight(layer)


def test_keep_standard_layout_undoes_bnb_cpu_repacking(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    cfg = bnb_config("nf4", True, torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)
    layer = model.model.layers[0].mlp.up_proj
    before = dequantize_weight(layer)
    layer.weight.data, _ = bnb.functional._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu  # what bnb's no-grad eval forward does on such CPUs
    assert keep_standard_layout(model) == 1
    after = dequantize_weight(layer)
    assert after.shape == before.shape and layer.weight.shape == (128 * 64 // 2, 1)
    torch.testing.assert_close(after, before, rtol=2**-8, atol=0)  # only the absmax was rounded to bf16
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ after.T, atol=1e-6, rtol=0)
    with torch.no_grad():
        model(ids())
    assert keep_standard_layout(model) == 0  # opted out: no layer repacked again


def test_random_4bit_build_fills_uninitialized_weights_layer_by_layer(tmp_path):
    """A config-only model in 4-bit is allocated without init and filled on its device: HF's normal(0, std)
    for Linear and Embedding weights, norms at one, every decoder Linear quantized, finite logits."""
    from ppalli.models.load import load_model

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                                   initializer_range=0.05)
    cfg.save_pretrained(tmp_path)
    model = load_model(str(tmp_path / "config.json"), dtype=torch.float32, device="cpu", quantization="nf4")
    assert len(linear4bit_names(model)) == N_LINEAR
    embed = model.get_input_embeddings().weight
    assert abs(embed.std().item() - 0.05) < 0.005 and abs(embed.mean().item()) < 0.005
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    w = dequantize_weight(model.model.layers[1].mlp.down_proj)
    assert abs(w.std().item() - 0.05) < 0.01
    again = load_model(str(tmp_path / "config.json"), dtype=torch.float32, device="cpu", quantization="nf4")
    assert torch.equal(again.get_input_embeddings().weight, embed)  # seeded: same model each time
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids()).logits).all()
