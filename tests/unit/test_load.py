"""load_model's attention implementation: SDPA where the model class has it, HF's eager path where it has not
(Gemma-2: from_pretrained refuses "sdpa" for it, and SDPA would drop its attention logit softcap)."""

import json

import torch

from ppalli.models.load import load_model

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=256, max_position_embeddings=128)


def _gemma2_checkpoint(folder):
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma2Config(**TINY, attn_logit_softcapping=5.0))
    model.save_pretrained(folder)
    return model


def test_a_gemma2_checkpoint_loads_with_eager_attention_and_keeps_its_softcap(tmp_path):
    hf = _gemma2_checkpoint(tmp_path / "g2").eval()
    model = load_model(str(tmp_path / "g2"), dtype=torch.float32, device="cpu").eval()  # asks for "sdpa"
    assert model.config._attn_implementation == "eager" and model.config.attn_logit_softcapping == 5.0
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, hf(input_ids=ids).logits)


def test_a_gemma2_config_builds_eager_and_a_llama_config_keeps_sdpa(tmp_path):
    for model_type, expected in (("gemma2", "eager"), ("llama", "sdpa")):
        path = tmp_path / f"{model_type}.json"
        path.write_text(json.dumps({"model_type": model_type, **TINY}), encoding="utf-8")
        model = load_model(str(path), dtype=torch.float32, device="cpu")
        assert model.config._attn_implementation == expected, model_type


def test_a_class_that_refuses_sdpa_is_loaded_again_with_eager(tmp_path, monkeypatch):
    """The net under supported_attention (remote-code classes it cannot look up): from_pretrained's refusal of
    "sdpa" leads to an eager load, not an error."""
    from ppalli.models import load

    _gemma2_checkpoint(tmp_path / "g2")
    monkeypatch.setattr(load, "supported_attention", lambda config, requested: requested)  # as for remote code
    model = load_model(str(tmp_path / "g2"), dtype=torch.float32, device="cpu")
    assert model.config._attn_implementation == "eager"
