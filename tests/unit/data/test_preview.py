"""`ppalli data preview`: spans rebuild the rendered text, never split Hangul, and the report has its parts."""

from __future__ import annotations

import json

from rich.console import Console

from ppalli.data.masking import label_tokens
from ppalli.data.preview import format_preview, length_summary, preview, spans


def test_spans_rebuild_the_sample_and_mark_the_answer(shared_data, make_cfg, qwen_tok):
    view = preview(make_cfg(shared_data / "ko_chatbot_qa" / "ChatbotData.csv", limit=20), qwen_tok, 2)
    assert len(view["samples"]) == 2
    (text,) = view["samples"][0]["texts"]
    assert [s["text"] for s in text["spans"] if s["trained"]] == ["하루가 또 가네요.<|im_end|>"]
    assert "".join(s["text"] for s in text["spans"]).endswith("<|im_start|>assistant\n하루가 또 가네요.<|im_end|>\n")
    json.dumps(view)  # --json prints it as is


def test_truncated_korean_spans_end_on_whole_syllables(shared_data, make_cfg, qwen_tok):
    # 360 tokens: above the longest prompt of the file (342), below every prompt + answer, so each answer is cut
    cfg = make_cfg(shared_data / "ko_instruct_evol" / "evol_ko.jsonl", limit=3, max_seq_len=360)
    view = preview(cfg, qwen_tok, 3)
    for sample in view["samples"]:
        (text,) = sample["texts"]
        assert text["cut_tokens"] > 0 and text["tokens"] == 360
        joined = "".join(s["text"] for s in text["spans"])
        assert "\ufffd" not in joined  # no half syllable in any span
        # the spans hold the kept tokens, less at most the bytes of one syllable the cut split
        assert 356 <= len(qwen_tok(joined, add_special_tokens=False).input_ids) <= 360
        trained = [s["text"] for s in text["spans"] if s["trained"]]
        assert len(trained) == 1 and trained[0].strip()


def test_a_cut_through_a_character_ends_the_span_before_it():
    # "가뷁" where 뷁 is two byte tokens sharing offsets (1, 2); max_len 2 keeps only the first of them
    labeled = label_tokens([10, 20, 21], [(0, 1), (1, 2), (1, 2)], [(1, 2)], max_len=2)
    assert spans("가뷁", [(0, 1), (1, 2), (1, 2)], labeled) == [{"text": "가", "trained": False}]
    whole = label_tokens([10, 20, 21], [(0, 1), (1, 2), (1, 2)], [(1, 2)], max_len=3)
    assert spans("가뷁", [(0, 1), (1, 2), (1, 2)], whole) == [{"text": "가", "trained": False},
                                                             {"text": "뷁", "trained": True}]


def test_byte_split_hangul_never_breaks_a_span(make_cfg, qwen_tok, tmp_path):
    rare = next(ch for ch in "뷁똠쀍휑" if len(qwen_tok(ch, add_special_tokens=False).input_ids) > 1)
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "뭐?", "answer": rare * 3}, ensure_ascii=False) + "\n", encoding="utf-8")
    (text,) = preview(make_cfg(path), qwen_tok, 1)["samples"][0]["texts"]
    assert [s["text"] for s in text["spans"] if s["trained"]] == [rare * 3 + "<|im_end|>"]


def test_preference_preview_shows_both_answers(shared_data, make_cfg, llama3_tok):
    cfg = make_cfg(shared_data / "ko_preference_rlhf" / "step2_yitingxie_ko.jsonl", limit=4)
    view = preview(cfg, llama3_tok, 1, objective="dpo")
    names = [t["name"] for t in view["samples"][0]["texts"]]
    assert names == ["chosen", "rejected"]
    assert view["lengths"]["count"] == 8  # chosen and rejected lengths of 4 pairs


def test_format_preview_renders_markup_histogram_and_counts(shared_data, make_cfg, llama2_tok):
    cfg = make_cfg(shared_data / "ko_dialogsum" / "dev.csv", limit=30, max_seq_len=300, template="alpaca_ko")
    view = preview(cfg, llama2_tok, 1)
    out = format_preview(view)
    assert "[bold green]" in out and "[dim]" in out
    # the first dialogue runs past 300 Llama 2 tokens before its answer: shown cut and dropped
    assert "### 질문:" in out and "cut by max_seq_len" in out and "dropped: no response token fits" in out
    assert f"{view['stats']['truncated']} truncated" in out and "packing efficiency" in out
    console = Console(record=True, width=100)
    console.print(out)  # the markup is well formed: rich raises on unbalanced tags
    assert "[bold" not in console.export_text()


def test_length_summary_bins():
    summary = length_summary([1, 10, 11, 100, 100], 100)
    assert [b["count"] for b in summary["histogram"]] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert (summary["min"], summary["max"], summary["mean"]) == (1, 100, 44.4)
    assert summary["histogram"][0] == {"lo": 1, "hi": 10, "count": 2}


def test_preview_counts_trained_tokens_like_prepare(shared_data, make_cfg, qwen_tok):
    cfg = make_cfg(shared_data / "ko_chatbot_qa" / "ChatbotData.csv", limit=1)
    view = preview(cfg, qwen_tok, 1)
    (text,) = view["samples"][0]["texts"]
    assert text["trained"] == view["stats"]["trained_tokens"]
