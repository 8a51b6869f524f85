"""Tiny Llama / Qwen2 models built from configs, the real Qwen2.5 tokenizer, rows of ko_chatbot_qa."""


import pytest
from tiny import tiny_run_config

from ppalli import config as C


@pytest.fixture
def make_cfg(tmp_path, shared_data):
    def make(arch: str = "llama", **overrides) -> C.Config:
        return tiny_run_config(tmp_path, shared_data, arch, **overrides)

    return make


@pytest.fixture
def quiet():
    lines = []
    return lines.append
