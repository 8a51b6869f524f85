"""Bad input through `prepare`: every failure is one DataError line naming the file, row, field and fix."""

from __future__ import annotations

import json

import pytest

from ppalli.config import SourceConfig
from ppalli.data.pipeline import prepare
from ppalli.errors import DataError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [{"instruction": f"질문 {i}", "output": f"답 {i}"} for i in range(6)]


def test_missing_file(tmp_path, make_cfg, qwen_tok):
    with pytest.raises(DataError, match=r"data file not found: .*missing.jsonl \(check data.path"):
        prepare(make_cfg(tmp_path / "missing.jsonl"), qwen_tok, seed=0)


def test_empty_file(tmp_path, make_cfg, qwen_tok):
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.jsonl: no rows in it"):
        prepare(make_cfg(tmp_path / "empty.jsonl"), qwen_tok, seed=0)


def test_row_missing_its_output_names_file_row_and_column(tmp_path, make_cfg, qwen_tok):
    rows = ROWS[:2] + [{"instruction": "답 없는 질문"}] + ROWS[2:]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare(make_cfg(path), qwen_tok, seed=0)
    message = str(err.value)
    assert f"{path} line 3: missing column 'output'" in message and "skip_bad_rows" in message
    assert "\n" not in message


def test_mapped_column_is_named_as_in_the_file(tmp_path, make_cfg, qwen_tok):
    path = tmp_path / "qa.csv"
    path.write_text("질문,답변\n하늘은?,파랗다\n바다는?,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"qa.csv row 2 \(line 3\): empty column '답변'"):
        prepare(make_cfg(path, columns={"question": "질문", "answer": "답변"}), qwen_tok, seed=0)


def test_skip_bad_rows_reports_how_many_and_which(tmp_path, make_cfg, qwen_tok):
    rows = [ROWS[0], {"instruction": "x"}, ROWS[1], {"instruction": "y", "output": None}, ROWS[2]]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    path.write_text(path.read_text(encoding="utf-8") + "{broken\n", encoding="utf-8")
    prepared = prepare(make_cfg(path, skip_bad_rows=True), qwen_tok, seed=0)
    stats = prepared.stats
    assert (stats["rows_read"], stats["rows_bad"], stats["samples_train"]) == (6, 3, 3)
    assert stats["bad_rows"] == [f"{path} line 2: missing column 'output'", f"{path} line 4: empty column 'output'",
                                 f"{path} line 6: not valid JSON (Expecting property name enclosed in double "
                                 "quotes at column 2)"]


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path, make_cfg, qwen_tok):
    path = _jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": ""}, {"instruction": "y", "output": " "}])
    with pytest.raises(DataError, match=r"no usable rows: all 2 rows were bad \(first: .*bad.jsonl line 1"):
        prepare(make_cfg(path, format="alpaca", skip_bad_rows=True), qwen_tok, seed=0)


def test_max_seq_len_below_every_prompt(shared_data, make_cfg, qwen_tok):
    path = shared_data / "ko_chatbot_qa" / "ChatbotData.csv"
    with pytest.raises(DataError) as err:
        prepare(make_cfg(path, limit=50, max_seq_len=8), qwen_tok, seed=0)
    message = str(err.value)
    assert "every sample was dropped: data.max_seq_len is 8 tokens but the longest prompt is" in message
    longest = int(message.split("longest prompt is ")[1].split()[0])
    assert longest > 8  # Qwen's template alone (default system, headers) is ~20 tokens


def test_preference_objective_needs_preference_data(shared_data, make_cfg, qwen_tok):
    with pytest.raises(DataError, match=r"ChatbotData.csv row 1 \(line 2\): train.objective 'dpo' needs preference"):
        prepare(make_cfg(shared_data / "ko_chatbot_qa" / "ChatbotData.csv", limit=5), qwen_tok, seed=0,
                objective="dpo")


def test_eval_split_leaving_nothing(tmp_path, make_cfg, qwen_tok):
    path = _jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(DataError, match=r"data.eval_split: 6 holds out 6 of 6 rows"):
        prepare(make_cfg(path, eval_split=6), qwen_tok, seed=0)


def test_unknown_format_and_columns_that_fit_nothing(tmp_path, make_cfg, qwen_tok):
    path = _jsonl(tmp_path / "t.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(DataError, match="data.format: unknown format 'alpacca'"):
        prepare(make_cfg(path, format="alpacca"), qwen_tok, seed=0)
    with pytest.raises(DataError, match=r"t.jsonl line 1: cannot tell the data format from the columns \(foo, bar\)"):
        prepare(make_cfg(path), qwen_tok, seed=0)


def test_bad_source_entries(tmp_path, make_cfg, qwen_tok):
    path = _jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(DataError, match=r"data.sources\[1\].path: empty"):
        prepare(make_cfg("", sources=[SourceConfig(path=str(path)), SourceConfig(path="")]), qwen_tok, seed=0)
    with pytest.raises(DataError, match="weight: must be above 0"):
        prepare(make_cfg("", sources=[SourceConfig(path=str(path), weight=0.0), SourceConfig(path=str(path))]),
                qwen_tok, seed=0)


def test_slow_tokenizer_is_refused(tmp_path, make_cfg, qwen_tok):
    class Slow:
        is_fast = False
        name_or_path = "slow-one"

    with pytest.raises(DataError, match="slow-one: ppalli needs a fast tokenizer"):
        prepare(make_cfg(_jsonl(tmp_path / "t.jsonl", ROWS)), Slow(), seed=0)
