"""Prompt ids shown to a reader (the report's samples, eval_samples.jsonl): the question without the markup of
templates whose markers are special tokens."""

import pytest

from ppalli.data.templates import prompt_text, render_prompt, resolve_template
from ppalli.models.tokenizer import load_tokenizer

QUESTION = "SD카드 안돼"


def _prompt_ids(tok, template: str) -> list[int]:
    text = render_prompt(resolve_template(template, tok), [{"role": "user", "content": QUESTION}])
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("tokenizer_dir, template", [("tokenizer_llama3", "llama3"), ("tokenizer_qwen2.5", "chatml")])
def test_prompt_text_is_the_question_alone(shared_data, tokenizer_dir, template):
    tok = load_tokenizer(shared_data / tokenizer_dir)
    assert prompt_text(tok, _prompt_ids(tok, template)) == QUESTION  # Llama 3 gave "SD카드 안돼assistant" before


def test_text_markers_stay_but_the_question_is_whole(shared_data):
    if not (shared_data / "tokenizer_llama2").is_dir():
        pytest.skip("tokenizer_llama2 is not in this copy of the data (the GPU machine's carries two tokenizers)")
    tok = load_tokenizer(shared_data / "tokenizer_llama2")
    shown = prompt_text(tok, _prompt_ids(tok, "alpaca_ko"))
    assert QUESTION in shown.splitlines() and "\ufffd" not in shown
