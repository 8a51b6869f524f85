"""The embedded demo: data, tokenizer and model folder are deterministic and load through HF's loaders."""

import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ppalli.demo.data import write_demo_data
from ppalli.demo.model import EOS_ID, IM_END_ID, demo_model_config, prepare_demo
from ppalli.demo.tokenizer import IM_END, IM_START, build_demo_tokenizer

HANGUL = re.compile("[\uac00-\ud7a3]")
KOREAN = "한국의 수도는 서울입니다. 뷁, 똠방각하! 😀 mixed English"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp("demo"))


def test_data_is_deterministic_alpaca_with_both_languages(tmp_path):
    first = write_demo_data(tmp_path / "a").read_bytes()
    assert write_demo_data(tmp_path / "b").read_bytes() == first
    rows = [json.loads(line) for line in first.decode("utf-8").splitlines()]
    assert 120 <= len(rows) <= 200
    assert all(set(r) == {"instruction", "input", "output"} and r["input"] == "" and r["output"] for r in rows)
    korean = sum(bool(HANGUL.search(r["instruction"] + r["output"])) for r in rows)
    english = len(rows) - korean
    assert korean >= 0.3 * len(rows) and english >= 0.3 * len(rows), (korean, english)
    assert len({r["instruction"] for r in rows}) == len(rows), "duplicate questions"


def test_data_rewrite_keeps_the_file(tmp_path):
    path = write_demo_data(tmp_path)
    stamp = path.stat().st_mtime_ns
    assert write_demo_data(tmp_path).stat().st_mtime_ns == stamp  # same content: nothing rewritten


def test_tokenizer_round_trips_korean_and_is_deterministic(tmp_path):
    a = build_demo_tokenizer(tmp_path / "a")
    b = build_demo_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    ids = a(KOREAN, add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == KOREAN
    assert b(KOREAN, add_special_tokens=False)["input_ids"] == ids
    assert 1000 <= len(a) <= 4000


def test_tokenizer_is_cached(tmp_path):
    build_demo_tokenizer(tmp_path)
    stamp = (tmp_path / "tokenizer.json").stat().st_mtime_ns
    again = build_demo_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").stat().st_mtime_ns == stamp
    assert again.decode(again("서울", add_special_tokens=False)["input_ids"]) == "서울"


def test_chat_template_uses_single_special_tokens(tmp_path):
    tok = build_demo_tokenizer(tmp_path)
    text = tok.apply_chat_template([{"role": "user", "content": "안녕하세요!"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == f"{IM_START}user\n안녕하세요!{IM_END}\n{IM_START}assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 2 and IM_END_ID in ids
    assert tok.eos_token_id == EOS_ID and tok.pad_token_id is not None and tok.pad_token_id != EOS_ID


def test_prepare_demo_folder_loads_with_auto_classes(demo):
    config = AutoConfig.from_pretrained(demo["model_dir"])
    tok = AutoTokenizer.from_pretrained(demo["tokenizer_dir"])
    assert config.model_type == "llama" and config.vocab_size == len(tok)
    assert set(GenerationConfig.from_pretrained(demo["model_dir"]).eos_token_id) == {IM_END_ID, EOS_ID}
    assert not list(demo["model_dir"].glob("*.safetensors")), "the demo ships no weights"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert set(model.generation_config.eos_token_id) == {IM_END_ID, EOS_ID}
    ids = torch.tensor([tok("한국의 수도는 어디인가요?", add_special_tokens=False)["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    assert demo["data_path"].is_file()


def test_demo_model_is_tiny():
    config = demo_model_config(1500)
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention is exercised
    assert config.tie_word_embeddings
    model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
