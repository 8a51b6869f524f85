"""Readers: every file kind, origins for error messages, laziness, bad rows, and weighted mixing."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import pytest

from ppalli.data.sources import Mix, read_rows, source_kind
from ppalli.errors import DataError


def test_real_csv_rows_and_origins(shared_data):
    path = shared_data / "ko_chatbot_qa" / "ChatbotData.csv"
    rows = list(read_rows(str(path)))
    assert len(rows) == 11823
    assert rows[0].data == {"Q": "12시 땡!", "A": "하루가 또 가네요.", "label": "0"}
    assert rows[0].where == f"{path} row 1 (line 2)"


def test_bom_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffQ,A\n안녕,반가워\n".encode())
    (row,) = read_rows(str(path))
    assert row.data == {"Q": "안녕", "A": "반가워"}


def test_multiline_csv_records_name_row_and_line(shared_data):
    rows = list(islice(read_rows(str(shared_data / "ko_dialogsum" / "dev.csv")), 3))
    assert rows[0].data["fname"] == "dev_0" and "#Person2#" in rows[0].data["dialogue"]
    assert rows[1].number == 2 and rows[1].line > 3  # dialogues span many lines, rows keep their own count
    assert "row 2 (line" in rows[1].where


def test_tsv(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("question\tanswer\nA, B?\tC\n", encoding="utf-8")
    assert [r.data for r in read_rows(str(path))] == [{"question": "A, B?", "answer": "C"}]


def test_csv_field_count_errors_become_bad_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("Q,A\n1,2\n3,4,5\n6\n", encoding="utf-8")
    rows = list(read_rows(str(path)))
    assert rows[0].error is None
    assert "3 fields, the header has 2" in rows[1].error
    assert "1 fields, the header has 2" in rows[2].error


def test_cp949_csv_names_the_fix(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("Q,A\n안녕,반가워\n".encode("cp949"))
    with pytest.raises(DataError, match="iconv -f cp949"):
        list(read_rows(str(path)))


def test_jsonl_lines_skip_blanks_and_flag_bad_json(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n[1, 2]\n{"a": 3}\n', encoding="utf-8")
    rows = list(read_rows(str(path)))
    assert [r.number for r in rows] == [1, 3, 4, 5]
    assert rows[0].data == {"a": 1} and rows[3].data == {"a": 3}
    assert "not valid JSON" in rows[1].error and rows[1].where == f"{path} line 3"
    assert "expected a JSON object" in rows[2].error


def test_jsonl_is_read_lazily(tmp_path):
    """The first row comes back before a later broken byte is ever decoded."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b"\xff\xfe broken\n")
    rows = read_rows(str(path))
    assert next(rows).data == {"a": 1}
    assert "not UTF-8" in next(rows).error


def test_real_jsonl_with_null_input(shared_data):
    rows = list(read_rows(str(shared_data / "ko_instruct_evol" / "evol_ko.jsonl")))
    assert len(rows) == 476 and rows[0].data["input"] is None and rows[0].where.endswith("line 1")


def test_json_list_and_data_key(tmp_path, shared_data):
    rows = list(read_rows(str(shared_data / "en_preference_dpo_demo" / "dpo_en_demo.json")))
    assert len(rows) == 300 and rows[299].where.endswith("item 300")
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": [{"q": 1}, "x"]}), encoding="utf-8")
    rows = list(read_rows(str(wrapped)))
    assert rows[0].data == {"q": 1} and "expected a JSON object" in rows[1].error


def test_json_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"a": 1},\n{"a": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json line 3: not valid JSON"):
        list(read_rows(str(path)))


def test_parquet_streams_in_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    table = pa.table({"instruction": [f"q{i}" for i in range(2500)], "output": [f"a{i}" for i in range(2500)]})
    pq.write_table(table, path, row_group_size=1000)
    rows = list(read_rows(str(path)))
    assert len(rows) == 2500 and rows[2499].data == {"instruction": "q2499", "output": "a2499"}
    assert rows[2499].where == f"{path} row 2500"


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"question": ["1+1?"], "answer": ["2"]}).save_to_disk(str(tmp_path / "ds"))
    assert source_kind(str(tmp_path / "ds")) == "datasets"
    (row,) = read_rows(str(tmp_path / "ds"))
    assert row.data == {"question": "1+1?", "answer": "2"}


def test_datasets_dict_needs_the_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    assert [r.data for r in read_rows(str(tmp_path / "dd"), split="test")] == [{"text": "a"}]
    with pytest.raises(DataError, match="no split 'dev'"):
        list(read_rows(str(tmp_path / "dd"), split="dev"))


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        read_rows(str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        list(read_rows(str(empty)))
    header_only = tmp_path / "h.csv"
    header_only.write_text("Q,A\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        list(read_rows(str(header_only)))
    (tmp_path / "x.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(DataError, match="unknown data file type '.txt'"):
        read_rows(str(tmp_path / "x.txt"))
    assert source_kind("someone/some-dataset") == "hub"


def test_mix_is_deterministic_and_keeps_proportions():
    def streams():
        return [(("a", i) for i in range(10_000)), (("b", i) for i in range(10_000))]

    first = list(Mix(streams(), [3.0, 1.0], seed=7))
    again = list(Mix(streams(), [3.0, 1.0], seed=7))
    other = list(Mix(streams(), [3.0, 1.0], seed=8))
    assert first == again and first != other
    share = Counter(src for src, _ in first)["a"] / len(first)
    assert 0.72 < share < 0.78  # 3:1 weights -> 75 % from the first source
    # each source's rows keep their own order
    assert [i for src, i in first if src == "b"] == sorted(i for src, i in first if src == "b")


def test_mix_ends_when_a_source_runs_out_and_counts():
    mix = Mix([range(5), range(1000)], [1.0, 1.0], seed=0)
    rows = list(mix)
    assert mix.ended_by == 0 and mix.used[0] == 5 and len(rows) == sum(mix.used)


def test_mix_weight_must_be_positive():
    with pytest.raises(DataError, match="weight: must be above 0"):
        Mix([[1], [2]], [1.0, 0.0], seed=0)
