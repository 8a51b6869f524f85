"""Model specs shared by the planner and memory-model tests."""

import json

import pytest

from ppalli.plan.memory import ModelSpec

# meta-llama/Llama-3.1-8B config.json, the fields that size it
LLAMA_31_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
               "tie_word_embeddings": False}


@pytest.fixture(scope="session")
def llama_31_8b() -> dict:
    return dict(LLAMA_31_8B)


@pytest.fixture(scope="session")
def spec_8b():
    return ModelSpec.from_config(LLAMA_31_8B)


@pytest.fixture(scope="session")
def spec_1b(shared_data):
    path = shared_data / "tokenizer_llama3" / "config_llama-3.2-1b.json"
    return ModelSpec.from_config(json.loads(path.read_text()))
