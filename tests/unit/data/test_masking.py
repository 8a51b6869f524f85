"""Masking: the trained / untrained token split of real first rows against hand computations, and the rule.

Hand computations never go through ppalli's templates or masking: the prompt and the response are written out
as the template's documented text and tokenized separately, Llama 3 with tiktoken itself, Llama 2 with
sentencepiece itself, Qwen with its HF tokenizer. Each seam (a newline or a special token) is one where no
merge can cross, so the separate pieces concatenate to the whole.
"""

from __future__ import annotations

import csv
import json

import pytest

from ppalli.data.masking import IGNORE, join_segments, label_tokens, trained_spans
from ppalli.data.pipeline import prepare
from ppalli.models.tokenizer import LLAMA3_PATTERN, llama3_special_tokens

QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.")


def _first_raw(path):
    if path.suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            return next(csv.DictReader(f))
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return json.loads(f.readline())
    with open(path, encoding="utf-8") as f:
        return json.load(f)[0]


def _pref_en(row):
    assert len(row["conversations"]) == 1 and row["conversations"][0]["from"] == "human"
    return row["conversations"][0]["value"], [row["chosen"]["value"], row["rejected"]["value"]]


# file -> (objective, row -> (user text, [answers])): one answer for SFT, chosen and rejected for preference
CASES = {
    "ko_chatbot_qa/ChatbotData.csv": ("sft", lambda r: (r["Q"], [r["A"]])),
    "ko_instruct_evol/evol_ko.jsonl": ("sft", lambda r: (r["instruction"], [r["output"]])),
    "ko_dialogsum/dev.csv": ("sft", lambda r: ("다음 대화를 요약해 주세요.\n\n" + r["dialogue"], [r["summary"]])),
    "ko_preference_rlhf/step2_yitingxie_ko.jsonl": ("dpo", lambda r: (r["prompt"], [r["chosen"], r["rejected"]])),
    "en_preference_dpo_demo/dpo_en_demo.json": ("dpo", _pref_en),
}


def _qwen_pieces(tok, user, answer):
    """Qwen's own template: default system, then user; the response is the answer and <|im_end|>."""
    def enc(text):
        return tok(text, add_special_tokens=False).input_ids

    prompt = QWEN_SYSTEM + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return enc(prompt), enc(answer + "<|im_end|>"), enc("\n")


def _llama3_pieces(shared_data, user, answer):
    """ppalli's Llama 3 template (content trimmed like Meta's), encoded by tiktoken."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(shared_data / "tokenizer_llama3" / "tokenizer.model"))
    special = {t: 128000 + i for i, t in enumerate(llama3_special_tokens())}
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    prompt = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{user.strip()}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    return (enc.encode(prompt, allowed_special="all"), enc.encode(answer.strip() + "<|eot_id|>",
                                                                  allowed_special="all"), [])


def _llama2_pieces(shared_data, user, answer):
    """alpaca_en (Llama 2 has no chat template), encoded by sentencepiece: <s>, the text, </s>."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(shared_data / "tokenizer_llama2" / "tokenizer.model"))
    prompt = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{user}\n\n### Response:\n"
    prompt_ids = [sp.bos_id()] + sp.encode(prompt)
    whole = [sp.bos_id()] + sp.encode(prompt + answer) + [sp.eos_id()]
    assert whole[: len(prompt_ids)] == prompt_ids  # the seam after "\n" merges nothing
    return prompt_ids, whole[len(prompt_ids):], []


@pytest.mark.parametrize("tok_name", ["qwen", "llama2", "llama3"])
@pytest.mark.parametrize("file", list(CASES))
def test_first_row_split_matches_hand_computed(request, shared_data, make_cfg, file, tok_name):
    tok = request.getfixturevalue(f"{tok_name}_tok")
    objective, fields = CASES[file]
    user, answers = fields(_first_raw(shared_data / file))
    prepared = prepare(make_cfg(shared_data / file, limit=1, max_seq_len=8192), tok, seed=0, objective=objective)
    (sample,) = prepared.train
    names = ["input_ids"] if objective == "sft" else ["chosen_input_ids", "rejected_input_ids"]
    for name, answer in zip(names, answers):
        if tok_name == "qwen":
            prompt, response, tail = _qwen_pieces(tok, user, answer)
        elif tok_name == "llama3":
            prompt, response, tail = _llama3_pieces(shared_data, user, answer)
        else:
            prompt, response, tail = _llama2_pieces(shared_data, user, answer)
        labels = sample[name.replace("input_ids", "labels")]
        assert sample[name] == prompt + response + tail
        assert labels == [IGNORE] * len(prompt) + response + [IGNORE] * len(tail)
        assert sum(label != IGNORE for label in labels) == len(response)
        stop = {"qwen": "<|im_end|>", "llama3": "<|eot_id|>", "llama2": "</s>"}[tok_name]
        shown = answer.strip() if tok_name == "llama3" else answer  # Meta's template trims content
        assert tok.decode([t for t in labels if t != IGNORE]) == shown + stop


def _label(tok, segments, max_len=10_000):
    text, ranges = join_segments(segments)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc, label_tokens(enc.input_ids, enc.offset_mapping, ranges, max_len)


def test_a_token_straddling_the_boundary_goes_with_the_prompt(qwen_tok):
    # BPE merges the prompt's trailing space into " indeed": that token starts in the prompt, so it is not
    # trained; " yes" starts in the response and is.
    enc, labeled = _label(qwen_tok, [("Answer: ", False), ("indeed yes", True)])
    assert qwen_tok.convert_ids_to_tokens(enc.input_ids)[-2:] == ["Ġindeed", "Ġyes"]
    assert labeled.labels[-2:] == [IGNORE, enc.input_ids[-1]]
    # With the space on the response side the same token starts inside it and is trained.
    enc, labeled = _label(qwen_tok, [("Answer:", False), (" indeed yes", True)])
    assert qwen_tok.convert_ids_to_tokens(enc.input_ids)[-2:] == ["Ġindeed", "Ġyes"]
    assert labeled.labels[-2:] == enc.input_ids[-2:]
    assert labeled.labels[:-2] == [IGNORE] * (len(enc.input_ids) - 2)


def test_hangul_split_into_bytes_shares_one_label(qwen_tok):
    rare = next(ch for ch in "뷁똠쀍휑" if len(qwen_tok(ch, add_special_tokens=False).input_ids) > 1)
    enc, labeled = _label(qwen_tok, [("질문:\n", False), (rare, True)])
    pieces = [i for i, (s, _) in enumerate(enc.offset_mapping) if s == len("질문:\n")]
    assert len(pieces) > 1  # several byte tokens, one character
    assert all(labeled.labels[i] == enc.input_ids[i] for i in pieces)


def test_truncation_counts_and_drops():
    ids = list(range(100, 110))
    offsets = [(i, i + 1) for i in range(10)]
    kept = label_tokens(ids, offsets, [(6, 10)], max_len=8)
    assert kept.truncated and kept.input_ids == ids[:8] and kept.labels == [IGNORE] * 6 + [106, 107]
    assert (kept.trained, kept.prompt_len, kept.full_len) == (2, 6, 10)
    gone = label_tokens(ids, offsets, [(8, 10)], max_len=8)
    assert gone.trained == 0 and gone.prompt_len == 8


def test_first_label_is_never_trained():
    labeled = label_tokens([5, 6, 7], [(0, 1), (1, 2), (2, 3)], [(0, 3)], max_len=10)
    assert labeled.labels == [IGNORE, 6, 7] and labeled.trained == 2


def test_trained_spans_bisect_on_token_starts():
    offsets = [(0, 2), (2, 3), (2, 3), (3, 5), (5, 9), (9, 10)]  # two tokens share start 2 (one split char)
    assert trained_spans(offsets, [(2, 3), (5, 10)]) == [(1, 3), (4, 6)]
    assert trained_spans(offsets, [(6, 8)]) == []  # no token starts inside: the range is mid-token


def test_train_on_all_trains_everything_but_the_first_token(qwen_tok, make_cfg, shared_data):
    path = shared_data / "ko_chatbot_qa" / "ChatbotData.csv"
    (sample,) = prepare(make_cfg(path, limit=1, train_on="all"), qwen_tok, seed=0).train
    assert sample["labels"] == [IGNORE] + sample["input_ids"][1:]
