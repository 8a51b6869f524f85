"""Fixtures of the data tests: the three real tokenizers (loaded once per session) and a DataConfig builder."""

from __future__ import annotations

import pytest

from ppalli.config import DataConfig
from ppalli.models.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def qwen_tok(shared_data):
    return load_tokenizer(shared_data / "tokenizer_qwen2.5")


@pytest.fixture(scope="session")
def llama2_tok(shared_data):
    return load_tokenizer(shared_data / "tokenizer_llama2")


@pytest.fixture(scope="session")
def llama3_tok(shared_data):
    return load_tokenizer(shared_data / "tokenizer_llama3")


@pytest.fixture(scope="session")
def tiny_tok():
    """A byte-level tokenizer without merges (one token per byte) with the given special tokens: cheap, and able
    to carry any family's turn tokens (Gemma's <end_of_turn>, EXAONE's [|endofturn|])."""

    def make(specials: list[str], bos: str | None, eos: str):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
        backend = Tokenizer(models.BPE(vocab, []))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos)

    return make


@pytest.fixture
def make_cfg(tmp_path):
    """DataConfig with test defaults: no eval split, one process, the cache inside tmp_path."""

    def make(path, **kw) -> DataConfig:
        base = {"eval_split": 0.0, "num_proc": 1, "cache_dir": str(tmp_path / "cache"), "max_seq_len": 4096}
        return DataConfig(path=str(path), **{**base, **kw})

    return make
