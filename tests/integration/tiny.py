"""Tiny model configs and run configs shared by the integration tests."""

import json
from pathlib import Path

from ppalli import config as C

QWEN_VOCAB = 151936  # Qwen2.5's embedding rows (the tokenizer has 151,665 tokens)


def tiny_config(arch: str) -> dict:
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, vocab_size=QWEN_VOCAB,
                  # LoRA on a frozen random base learns only if the frozen output head is not too flat
                  # (the demo measured 0.1 trains well where HF's 0.02 stalls)
                  initializer_range=0.1, tie_word_embeddings=False, rms_norm_eps=1e-6)
    if arch == "llama":
        return dict(common, model_type="llama", architectures=["LlamaForCausalLM"])
    return dict(common, model_type="qwen2", architectures=["Qwen2ForCausalLM"])


def tiny_run_config(tmp_path: Path, shared_data: Path, arch: str = "llama", **overrides) -> C.Config:
    """A run of a tiny random `arch` with the real Qwen2.5 tokenizer on 8 rows of ko_chatbot_qa, on the CPU,
    written under tmp_path; overrides as section__key=value."""
    model_json = tmp_path / f"{arch}-config.json"
    model_json.write_text(json.dumps(tiny_config(arch)))
    data = {
        "name": overrides.pop("name", f"{arch}-test"),
        "output_dir": str(tmp_path / "runs" / "{name}"),
        "model": {"name_or_path": str(model_json), "tokenizer": str(shared_data / "tokenizer_qwen2.5")},
        "lora": {"r": 8, "alpha": 16},
        "data": {"path": str(shared_data / "ko_chatbot_qa" / "ChatbotData.csv"),
                 "columns": {"question": "Q", "answer": "A"}, "template": "chatml", "limit": 8,
                 "eval_split": 0, "max_seq_len": 64, "num_proc": 1,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 5e-3, "warmup_steps": 1, "seed": 7},
        "plan": {"device": "cpu", "fast_path": "off"},
        "logging": {"progress": "none", "sample_max_new_tokens": 4},
    }
    for dotted, value in overrides.items():
        C.set_dotted(data, f"{dotted.replace('__', '.')}={json.dumps(value)}")
    return C.from_dict(data)
