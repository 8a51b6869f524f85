"""Format detection from columns and normalization of every format to messages, on the real files."""

from __future__ import annotations

import pytest

from ppalli.data.formats import detect_format, normalize, normalize_rows
from ppalli.data.sources import Row, RowError, read_rows
from ppalli.errors import DataError


def _first(path) -> Row:
    return next(read_rows(str(path)))


@pytest.mark.parametrize(("folder", "file", "fmt"), [
    ("ko_chatbot_qa", "ChatbotData.csv", "qa"),
    ("ko_instruct_evol", "evol_ko.jsonl", "alpaca"),
    ("ko_preference_rlhf", "step2_yitingxie_ko.jsonl", "preference"),
    ("en_preference_dpo_demo", "dpo_en_demo.json", "preference"),
    ("ko_dialogsum", "dev.csv", "summarization"),
])
def test_detects_the_real_files(shared_data, folder, file, fmt):
    row = _first(shared_data / folder / file)
    assert detect_format(row.data, {}, row.where) == fmt


def test_detects_messages_sharegpt_and_text():
    assert detect_format({"messages": [{"role": "user", "content": "hi"}]}, {}, "x") == "messages"
    assert detect_format({"conversations": [{"from": "human", "value": "hi"}]}, {}, "x") == "sharegpt"
    assert detect_format({"text": "raw"}, {}, "x") == "text"
    assert detect_format({"prompt": "p", "response": "r"}, {}, "x") == "qa"


def test_unknown_columns_name_the_fix():
    with pytest.raises(DataError, match=r"f.jsonl line 1: cannot tell the data format from the columns \(foo, bar\)"
                                        r".*data.format.*data.columns"):
        detect_format({"foo": 1, "bar": 2}, {}, "f.jsonl line 1")


def test_qa_from_korean_csv(shared_data):
    ex = normalize(_first(shared_data / "ko_chatbot_qa" / "ChatbotData.csv"), "qa", {})
    assert ex["messages"] == [{"role": "user", "content": "12시 땡!"},
                              {"role": "assistant", "content": "하루가 또 가네요."}]
    assert ex["where"].endswith("ChatbotData.csv row 1 (line 2)")


def test_alpaca_with_null_and_real_input(shared_data):
    row = _first(shared_data / "ko_instruct_evol" / "evol_ko.jsonl")
    ex = normalize(row, "alpaca", {})
    assert ex["messages"][0] == {"role": "user", "content": row.data["instruction"]}  # input null: not appended
    assert ex["messages"][1] == {"role": "assistant", "content": row.data["output"]}
    data = {"instruction": "번역하세요", "input": "hello", "output": "안녕", "system": "번역가"}
    with_input = Row(data, "f", "line", 1)
    assert normalize(with_input, "alpaca", {})["messages"] == [
        {"role": "system", "content": "번역가"}, {"role": "user", "content": "번역하세요\n\nhello"},
        {"role": "assistant", "content": "안녕"}]


def test_summarization_prompt_follows_the_language(shared_data):
    row = _first(shared_data / "ko_dialogsum" / "dev.csv")
    ex = normalize(row, "summarization", {})
    assert ex["messages"][0]["content"] == "다음 대화를 요약해 주세요.\n\n" + row.data["dialogue"]
    assert ex["messages"][1]["content"] == row.data["summary"]
    english = Row({"document": "The cat sat.", "summary": "Cat sits."}, "f", "line", 1)
    assert normalize(english, "summarization", {})["messages"][0]["content"] == (
        "Summarize the following document.\n\nThe cat sat.")


def test_korean_preference(shared_data):
    row = _first(shared_data / "ko_preference_rlhf" / "step2_yitingxie_ko.jsonl")
    ex = normalize(row, "preference", {})
    assert ex["prompt"] == [{"role": "user", "content": row.data["prompt"]}]
    assert (ex["chosen"], ex["rejected"]) == (row.data["chosen"], row.data["rejected"])


def test_sharegpt_preference_with_system_and_history(shared_data):
    rows = list(read_rows(str(shared_data / "en_preference_dpo_demo" / "dpo_en_demo.json")))
    with_system = next(r for r in rows if r.data["conversations"][0]["from"] == "system")
    ex = normalize(with_system, "preference", {})
    assert ex["prompt"][0] == {"role": "system", "content": with_system.data["conversations"][0]["value"]}
    assert ex["prompt"][-1]["role"] == "user"
    assert ex["chosen"] == with_system.data["chosen"]["value"]
    multi = next(r for r in rows if len(r.data["conversations"]) >= 5)
    roles = [m["role"] for m in normalize(multi, "preference", {})["prompt"]]
    assert "assistant" in roles and roles[-1] == "user"


def test_preference_as_full_conversations_uses_the_common_prefix():
    user = {"role": "user", "content": "q"}
    row = Row({"chosen": [user, {"role": "assistant", "content": "good"}],
               "rejected": [user, {"role": "assistant", "content": "bad"}]}, "f", "line", 1)
    assert normalize(row, "preference", {}) == {"prompt": [user], "chosen": "good", "rejected": "bad",
                                                "where": "f line 1"}


def test_messages_multi_turn_and_roles():
    row = Row({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                                 {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"},
                                 {"from": "gpt", "value": "d"}]}, "f", "line", 1)
    roles = [m["role"] for m in normalize(row, "sharegpt", {})["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    other = Row({"messages": [{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}]}, "f", "line", 2)
    with pytest.raises(RowError, match="f line 2: messages turn 2 has role 'narrator'"):
        normalize(other, "messages", {})
    no_answer = Row({"messages": [{"role": "user", "content": "a"}]}, "f", "line", 3)
    with pytest.raises(RowError, match="no assistant turn"):
        normalize(no_answer, "messages", {})


def test_column_mapping_and_override():
    row = Row({"질문": "하늘은?", "답변": "파랗다"}, "f.csv", "row", 4)
    ex = normalize(row, "qa", {"question": "질문", "answer": "답변"})
    assert [m["content"] for m in ex["messages"]] == ["하늘은?", "파랗다"]
    with pytest.raises(RowError, match=r"f.csv row 4: missing column 'reply'"):
        normalize(row, "qa", {"question": "질문", "answer": "reply"})


def test_missing_and_empty_output_name_row_and_column():
    with pytest.raises(RowError, match=r"d.jsonl line 7: missing column 'output'.*skip_bad_rows"):
        normalize(Row({"instruction": "x"}, "d.jsonl", "line", 7), "alpaca", {})
    with pytest.raises(RowError, match=r"d.jsonl line 8: empty column 'output'"):
        normalize(Row({"instruction": "x", "output": "  "}, "d.jsonl", "line", 8), "alpaca", {})
    with pytest.raises(RowError, match=r"column 'output' should be text, got list"):
        normalize(Row({"instruction": "x", "output": ["a"]}, "d.jsonl", "line", 9), "alpaca", {})


def test_stream_detection_survives_a_bad_first_row():
    rows = [Row({"instruction": "a"}, "f", "line", 1)] + [
        Row({"instruction": f"q{i}", "output": f"a{i}"}, "f", "line", i) for i in range(2, 6)]
    bad: list[str] = []
    examples = list(normalize_rows(iter(rows), "auto", {}, bad))
    assert len(examples) == 4 and bad == ["f line 1: missing column 'output'"]
    with pytest.raises(RowError, match="f line 1: missing column 'output'"):
        list(normalize_rows(iter(rows), "auto", {}, None))
