"""merge_adapter: the saved 16-bit model computes what the adapter model computed, from 16-bit and 4-bit bases."""

import json
import logging

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from ppalli.errors import ModelError  # noqa: E402
from ppalli.export import merge as merge_mod  # noqa: E402
from ppalli.export.merge import merge_adapter  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama(seed: int = 0):
    # A fresh config each time: save_pretrained writes the dtype into the model's config object.
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def with_lora(model, **lora):
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **lora))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; a trained-looking adapter changes the outputs
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def quantized(model):
    pytest.importorskip("bitsandbytes")
    from ppalli.models.quant import quantize_model_4bit

    return quantize_model_4bit(model, compute_dtype=torch.float32)


def ids():
    return torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def logits(model):
    return model(input_ids=ids()).logits.float()


def reload(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def test_16bit_base_merges_exactly(tmp_path):
    model = with_lora(tiny_llama())
    want = logits(model)
    out = merge_adapter(model, out_dir=tmp_path / "merged", dtype=torch.float32)
    merged = reload(out)
    assert merged.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=0)
    assert (out / "model.safetensors").is_file()
    report = json.loads((out / "ppalli_merge.json").read_text())
    assert report["merged_lora_layers"] == 6 and report["max_abs_logit_diff"] < 1e-5 and not report["base_was_4bit"]


def test_base_model_plus_adapter_folder(tmp_path):
    model = with_lora(tiny_llama())
    want = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    out = merge_adapter(tiny_llama(), tmp_path / "adapter", out_dir=tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(reload(out)), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)], ids=str)
def test_4bit_base_merges_into_16bit(tmp_path, caplog, dtype, atol):
    # bf16: the merged weights and every activation round at 2**-8 relative; these logits are ~1 at most.
    model = with_lora(quantized(tiny_llama()))
    want = logits(model)
    with caplog.at_level(logging.INFO, logger="ppalli"):
        out = merge_adapter(model, out_dir=tmp_path, dtype=dtype)
    assert "not back into 4-bit, on purpose" in caplog.text and "max |logit diff|" in caplog.text
    merged = reload(out)
    assert merged.dtype == dtype
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    torch.testing.assert_close(logits(merged), want, atol=atol, rtol=0)
    report = json.loads((out / "ppalli_merge.json").read_text())
    assert report["base_was_4bit"] and report["dequantized_layers"] == 2 * 7 - 6


def test_checkpoint_loaded_4bit_by_transformers(tmp_path):
    pytest.importorskip("bitsandbytes")
    from ppalli.models.quant import bnb_config, keep_standard_layout

    tiny_llama().save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb_config("nf4", True, torch.float32))
    logits(base)  # eval + no_grad: on AVX512-BF16 CPUs bnb repacks the layers here
    keep_standard_layout(base)  # merge_adapter does this too; here so that `want` is the standard path's
    model = with_lora(base)
    want = logits(model)
    out = merge_adapter(model, out_dir=tmp_path / "merged", dtype=torch.float32)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(logits(reload(out)), want, atol=1e-5, rtol=0)


def test_sharded_save_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {"[UNK]": 0, "안녕": 1, "hello": 2}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    model = with_lora(tiny_llama())
    want = logits(model)
    out = merge_adapter(model, out_dir=tmp_path, dtype=torch.float32, tokenizer=tok, max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("안녕") == 1
    torch.testing.assert_close(logits(reload(out)), want, atol=1e-5, rtol=0)


def test_wrong_merge_is_caught_and_not_saved(tmp_path, monkeypatch):
    def without_delta(layer, dtype):  # forgets W += scale * B @ A
        return merge_mod._dense(*merge_mod._base_weight(layer.get_base_layer()), dtype)

    monkeypatch.setattr(merge_mod, "_merged_linear", without_delta)
    with pytest.raises(ModelError, match="logits differ from the adapter model's by .* nothing was saved"):
        merge_adapter(with_lora(tiny_llama()), out_dir=tmp_path / "merged", dtype=torch.float32)
    assert not (tmp_path / "merged").exists()


def test_dora_is_refused_with_a_fix(tmp_path):
    model = with_lora(tiny_llama(), use_dora=True)
    with pytest.raises(ModelError, match="DoRA.*merge_and_unload"):
        merge_adapter(model, out_dir=tmp_path, dtype=torch.float32)


def test_argument_errors(tmp_path):
    model = with_lora(tiny_llama())
    with pytest.raises(ModelError, match="a PeftModel and an adapter"):
        merge_adapter(model, tmp_path, out_dir=tmp_path / "m")
    with pytest.raises(ModelError, match="no adapter"):
        merge_adapter(tiny_llama(), out_dir=tmp_path / "m")
    with pytest.raises(ModelError, match="no adapter_config.json"):
        merge_adapter(tiny_llama(), tmp_path, out_dir=tmp_path / "m")
    with pytest.raises(ModelError, match="bfloat16, float16 or float32"):
        merge_adapter(model, out_dir=tmp_path / "m", dtype=torch.int8)


def test_merge_for_inference_merges_a_16bit_base_in_place():
    model = with_lora(tiny_llama())
    want = logits(model)
    merged, note = merge_mod.merge_for_inference(model)
    assert not isinstance(merged, peft.PeftModel) and not any("lora" in n for n, _ in merged.named_parameters())
    assert "merged into 6 float32 projections" in note
    torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=0)  # fp32: summation order only


def test_merge_for_inference_keeps_a_4bit_base_separate():
    model = with_lora(quantized(tiny_llama()))
    kept, note = merge_mod.merge_for_inference(model)
    assert kept is model and "4-bit" in note
    assert any(type(m).__name__ == "Linear4bit" for m in kept.modules())
