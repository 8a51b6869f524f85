"""Tiny Llama / Qwen2 models built from configs, the real Qwen2.5 tokenizer, rows of ko_chatbot_qa."""

import json

import pytest
from tiny import tiny_config

from ppalli import config as C


@pytest.fixture
def make_cfg(tmp_path, shared_data):
    def make(arch: str = "llama", **overrides) -> C.Config:
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

    return make


@pytest.fixture
def quiet():
    lines = []
    return lines.append
