"""Tool-calling conversations: OpenAI's messages + tools and LLaMA-Factory's ShareGPT (function_call /
observation) normalized to one form; rendered by Qwen2.5's own chat template and the chatml built-in with the calls
trained and the tools' results not; templates that drop them refused, naming the row and the fix."""

from __future__ import annotations

import json

import pytest

from ppalli.data.formats import detect_format, normalize
from ppalli.data.masking import IGNORE
from ppalli.data.pipeline import prepare
from ppalli.data.sources import Row, RowError
from ppalli.data.templates import render_segments, resolve_template

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "지금 날씨",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}
OPENAI_ROW = {
    "messages": [
        {"role": "user", "content": "서울 날씨 어때?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "서울"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 3, "sky": "맑음"}'},
        {"role": "assistant", "content": "서울은 맑고 3도예요."},
    ],
    "tools": json.dumps([WEATHER], ensure_ascii=False),  # JSON text, as many datasets keep it
}
# LLaMA-Factory's ShareGPT form: the call is the text of a function_call turn, the result an observation turn
SHAREGPT_ROW = {
    "conversations": [
        {"from": "human", "value": "서울 날씨 어때?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "서울"}}'},
        {"from": "observation", "value": '{"temp_c": 3, "sky": "맑음"}'},
        {"from": "gpt", "value": "서울은 맑고 3도예요."},
    ],
    "tools": json.dumps([WEATHER["function"]], ensure_ascii=False),
}


def _example(data: dict) -> dict:
    row = Row(data, "tools.jsonl", "line", 1)
    return normalize(row, detect_format(data, {}, row.where), {})


def _trained(segments) -> list[str]:
    return [text for text, trained in segments if trained]


def test_openai_and_sharegpt_rows_normalize_to_one_form():
    a, b = _example(OPENAI_ROW), _example(SHAREGPT_ROW)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "서울"}}}
    assert a["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [{**call, "id": "c1"}]}
    assert b["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert a["messages"][2] == {"role": "tool", "content": '{"temp_c": 3, "sky": "맑음"}', "tool_call_id": "c1"}
    assert b["messages"][2] == {"role": "tool", "content": '{"temp_c": 3, "sky": "맑음"}'}
    assert a["tools"] == [WEATHER] and b["tools"] == [WEATHER["function"]]
    assert "tools" not in _example({"messages": OPENAI_ROW["messages"][:1] + [OPENAI_ROW["messages"][3]]})


def test_qwen25_own_template_trains_the_call_and_the_answer_not_the_result(qwen_tok):
    example = _example(OPENAI_ROW)
    tpl = resolve_template("auto", qwen_tok)
    segments = render_segments(tpl, example["messages"], "responses", example["where"], example["tools"])
    assert _trained(segments) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울"}}\n</tool_call><|im_end|>',
        "서울은 맑고 3도예요.<|im_end|>"]
    prompt = segments[0][0]
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in prompt
    untrained = "".join(text for text, trained in segments if not trained)
    assert '<tool_response>\n{"temp_c": 3, "sky": "맑음"}\n</tool_response>' in untrained
    # the whole text is what transformers renders from the same messages and tools
    want = qwen_tok.apply_chat_template(example["messages"], tools=example["tools"], tokenize=False)
    assert "".join(text for text, _ in segments) == want


def test_chatml_renders_tools_calls_and_results(qwen_tok):
    example = _example(SHAREGPT_ROW)
    tpl = resolve_template("chatml", qwen_tok)
    messages = [{"role": "system", "content": "도구를 쓰세요."}] + example["messages"]
    segments = render_segments(tpl, messages, "responses", example["where"], example["tools"])
    assert _trained(segments) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울"}}\n</tool_call><|im_end|>',
        "서울은 맑고 3도예요.<|im_end|>"]
    text = "".join(t for t, _ in segments)
    assert text.startswith("<|im_start|>system\n도구를 쓰세요.\n\n# Tools\n")
    assert text.count("<|im_start|>system") == 1  # the system turn is folded into the tools' one
    assert "<|im_start|>tool\n<tool_response>\n" in text
    # without tools the built-in renders as before
    plain = render_segments(tpl, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                            "responses", "x")
    assert plain == [("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n", False), ("b<|im_end|>", True),
                     ("\n", False)]


def test_a_template_that_drops_tools_is_refused_with_the_row_and_the_fix(llama2_tok):
    example = _example(OPENAI_ROW)
    tpl = resolve_template("alpaca_ko", llama2_tok)
    with pytest.raises(RowError, match=r"tools.jsonl line 1: template alpaca_ko leaves .* data.template=chatml"):
        render_segments(tpl, example["messages"], "responses", example["where"], example["tools"])


@pytest.mark.parametrize("turn, words", [
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city: 1}"}}]},
     "turn 2 tool call 1's arguments is not valid JSON"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]},
     "arguments should be a JSON object"),
    ({"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}, "should be an object with a function"),
    ({"role": "assistant", "tool_calls": []}, "non-empty list of calls"),
    ({"role": "robot", "content": "x"}, "role 'robot'"),
])
def test_bad_calls_name_the_row_and_the_turn(turn, words):
    data = {"messages": [{"role": "user", "content": "q"}, turn, {"role": "assistant", "content": "a"}]}
    with pytest.raises(RowError, match="tools.jsonl line 1") as err:
        _example(data)
    assert words in str(err.value)


def test_tools_that_are_not_schemas_are_refused():
    data = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "tools": '[{"description": "no name"}]'}
    with pytest.raises(RowError, match="column 'tools' should be a list of function schemas"):
        _example(data)


def test_a_jsonl_file_of_tool_conversations_trains_through_prepare(tmp_path, make_cfg, qwen_tok):
    path = tmp_path / "tools.jsonl"
    rows = [OPENAI_ROW, {**OPENAI_ROW, "tools": [WEATHER]}]  # tools as JSON text and as a list
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    prepared = prepare(make_cfg(path), qwen_tok, seed=0)
    assert len(prepared.train) == 2
    sample = prepared.train[0]
    assert sample["input_ids"] == prepared.train[1]["input_ids"]
    trained = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE]
    text = qwen_tok.decode(trained)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울"}}\n</tool_call>' in text
    assert "서울은 맑고 3도예요." in text and "tool_response" not in text and "get_weather\", \"description" not in text


# --------------------------------------------------------------------------- the calls in a model's answer

NAMES = {"get_weather", "search"}


@pytest.mark.parametrize("text, content, calls", [
    ('날씨를 볼게요.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울"}}\n</tool_call>',
     "날씨를 볼게요.", [("get_weather", {"city": "서울"})]),
    ('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"부산\\"}"}\n</tool_call>\n'
     '<tool_call>{"name": "search", "arguments": {}}</tool_call>', None,
     [("get_weather", {"city": "부산"}), ("search", {})]),
    ('{"name": "get_weather", "parameters": {"city": "서울"}}', None, [("get_weather", {"city": "서울"})]),  # Llama 3.1
    ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', None, []),  # not one of the request's tools
    ("<tool_call>{not json}</tool_call>", None, []),
    ('{"name": "get_weather"} 다음 말', None, []),  # JSON with more text after it: prose
    ("맑아요.", None, []),
])
def test_calls_in_an_answer_name_the_requests_tools(text, content, calls):
    from ppalli.data.tools import calls_in_answer

    got_content, got = calls_in_answer(text, NAMES)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got] == calls
    assert got_content == (content if calls else text)


def test_a_preference_between_calls_trains_dpo_pairs_on_the_calls(tmp_path, make_cfg, qwen_tok):
    """chosen / rejected as whole conversations ending in a call each (the right city, the wrong one): the pair's
    texts share the prompt with the tools, and each trains its own call."""
    user = {"role": "user", "content": "서울 날씨 어때?"}

    def called(city: str) -> list[dict]:
        return [user, {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}]

    row = {"chosen": called("서울"), "rejected": called("부산"), "tools": [WEATHER]}
    example = _example(row)
    assert example["prompt"] == [user] and example["chosen"]["tool_calls"][0]["function"]["arguments"] == \
        {"city": "서울"}
    path = tmp_path / "pref.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    (pair,) = prepare(make_cfg(path), qwen_tok, seed=0, objective="dpo").train
    texts = [qwen_tok.decode([t for t, label in zip(pair[f"{side}_input_ids"], pair[f"{side}_labels"])
                              if label != IGNORE]) for side in ("chosen", "rejected")]
    assert texts == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울"}}\n</tool_call><|im_end|>',
                     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "부산"}}\n</tool_call><|im_end|>']
    assert "get_weather" in qwen_tok.decode(pair["chosen_input_ids"][:-20])  # the schemas are in the prompt


def test_the_example_file_and_its_config_train_with_qwens_template(make_cfg, qwen_tok):
    """configs/qwen2.5-7b-tools-lora.yaml and examples/tools_ko.jsonl (the form shown to users) load and prepare:
    every row trains its calls and answers, never a tool's result."""
    from pathlib import Path

    from ppalli import config as C

    root = Path(__file__).resolve().parents[3]
    cfg = C.load(root / "configs" / "qwen2.5-7b-tools-lora.yaml")
    data = make_cfg(root / cfg.data.path, template=cfg.data.template, max_seq_len=cfg.data.max_seq_len)
    prepared = prepare(data, qwen_tok, seed=0)
    assert len(prepared.train) == 4 and prepared.stats["truncated"] == 0
    trained = [qwen_tok.decode([t for t, label in zip(s["input_ids"], s["labels"]) if label != IGNORE])
               for s in prepared.train]
    assert sum("<tool_call>" in t for t in trained) == 3 and not any("tool_response" in t for t in trained)


def test_xlam_style_rows_become_a_question_and_its_calls():
    """Salesforce xLAM's function-calling rows: query, tools and answers, each list as JSON text."""
    row = {"query": "서울과 부산 날씨 알려줘", "tools": json.dumps([WEATHER["function"]], ensure_ascii=False),
           "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "서울"}},
                                  {"name": "get_weather", "arguments": {"city": "부산"}}], ensure_ascii=False)}
    assert detect_format(row, {}, "x") == "calls"
    example = _example(row)
    assert example["messages"][0] == {"role": "user", "content": "서울과 부산 날씨 알려줘"}
    assert [c["function"]["arguments"]["city"] for c in example["messages"][1]["tool_calls"]] == ["서울", "부산"]
    assert example["tools"] == [WEATHER["function"]]
    with pytest.raises(RowError, match="column 'answers' tool call 1's arguments is not valid JSON"):
        _example({**row, "answers": '[{"name": "get_weather", "arguments": "{city"}]'})


def test_a_template_that_writes_results_through_tojson_is_taken(qwen_tok):
    """Llama 3.1's template writes a tool's result with tojson (a string is iterable in Jinja): the result is in the
    text as a JSON string, quotes escaped, and the row still trains."""
    source = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
              "{% if m.tool_calls %}{{ m.tool_calls[0].function | tojson }}"
              "{% elif m.role == 'tool' %}{{ m.content | tojson }}{% else %}{{ m.content }}{% endif %}"
              "{{ '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    example = _example(OPENAI_ROW)
    tpl = resolve_template(source, qwen_tok)
    segments = render_segments(tpl, example["messages"], "responses", example["where"])
    assert _trained(segments) == ['{"name": "get_weather", "arguments": {"city": "서울"}}<|im_end|>',
                                  "서울은 맑고 3도예요.<|im_end|>"]
    assert '"{\\"temp_c\\": 3, \\"sky\\": \\"맑음\\"}"' in "".join(t for t, _ in segments)
