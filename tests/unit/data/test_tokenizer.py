"""load_tokenizer: the tiktoken-built Llama 3 tokenizer equals tiktoken, SentencePiece Llama 2 equals
sentencepiece, Qwen loads through AutoTokenizer, and every tokenizer gets a pad token."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from ppalli.errors import ModelError
from ppalli.models.tokenizer import LLAMA3_PATTERN, is_tiktoken_file, llama3_special_tokens, load_tokenizer


def _texts(shared_data) -> list[str]:
    """Korean and English text from the real data, plus edge cases for the pre-tokenizer regex."""
    with open(shared_data / "ko_instruct_evol" / "evol_ko.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["output"] for line in list(f)[:40]]
    with open(shared_data / "en_preference_dpo_demo" / "dpo_en_demo.json", encoding="utf-8") as f:
        texts += [row["chosen"]["value"] for row in json.load(f)[:40]]
    with open(shared_data / "ko_chatbot_qa" / "ChatbotData.csv", encoding="utf-8-sig", newline="") as f:
        texts += [row["Q"] + " " + row["A"] for _, row in zip(range(200), csv.DictReader(f))]
    return texts + ["I'LL don't  123456 x\r\n\n\t  y   ", "   leading spaces", "😊 emoji 한글 mixed\n", " x", "  x",
                    "  leading, inner   runs and trailing   ", " 안녕하세요 ", "\n  def f():\n    return 1"]


def test_llama3_equals_tiktoken(shared_data, llama3_tok):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(shared_data / "tokenizer_llama3" / "tokenizer.model"))
    special = {t: 128000 + i for i, t in enumerate(llama3_special_tokens())}
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    chat = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n안녕?<|eot_id|>"
    for text in _texts(shared_data) + [chat]:
        assert llama3_tok(text, add_special_tokens=False).input_ids == enc.encode(text, allowed_special="all"), text
        assert llama3_tok.decode(enc.encode(text, allowed_special="all")) == text


def test_llama3_special_tokens_and_defaults(llama3_tok):
    ids = llama3_tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                            "<|finetune_right_pad_id|>", "<|start_header_id|>",
                                            "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                                            "<|reserved_special_token_3|>", "<|reserved_special_token_247|>"])
    assert ids == [128000, 128001, 128002, 128004, 128006, 128007, 128008, 128009, 128010, 128011, 128255]
    assert len(llama3_tok) == 128256
    # The folder's config_llama-3.2-1b.json says eos 128001 (a base model).
    assert (llama3_tok.bos_token, llama3_tok.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert llama3_tok.pad_token == "<|finetune_right_pad_id|>"
    assert llama3_tok("Hi").input_ids[0] == 128000  # BOS added like the HF release
    assert "<|start_header_id|>" in llama3_tok.chat_template


def test_llama2_equals_sentencepiece(shared_data, llama2_tok):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(shared_data / "tokenizer_llama2" / "tokenizer.model"))
    for text in _texts(shared_data)[:120]:
        assert llama2_tok(text).input_ids == [sp.bos_id()] + sp.encode(text), text
    assert llama2_tok.pad_token == llama2_tok.eos_token == "</s>"
    assert llama2_tok.chat_template is None


def test_qwen_loads_with_its_template_and_pad(qwen_tok):
    assert qwen_tok.is_fast and qwen_tok.eos_token == "<|endoftext|>" == qwen_tok.pad_token
    assert "<|im_start|>" in qwen_tok.chat_template
    text = "안녕하세요 <|im_start|>user"
    assert qwen_tok.decode(qwen_tok(text).input_ids) == text


def test_pad_log_line_says_which(shared_data, caplog):
    with caplog.at_level(logging.INFO, logger="ppalli.tokenizer"):
        load_tokenizer(shared_data / "tokenizer_llama2")
    assert "pad token: </s> (eos reused" in caplog.text


def test_file_kind_detection(shared_data):
    assert is_tiktoken_file(shared_data / "tokenizer_llama3" / "tokenizer.model")
    assert not is_tiktoken_file(shared_data / "tokenizer_llama2" / "tokenizer.model")


def test_folder_without_tokenizer_files(tmp_path):
    with pytest.raises(ModelError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_wrong_size_tiktoken_file_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\n")
    with pytest.raises(ModelError, match="2 ranks"):
        load_tokenizer(tmp_path)
