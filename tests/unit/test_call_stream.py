"""CallStream (infer/call_stream.py): a streamed answer's calls as OpenAI's tool_calls deltas, from the layouts the
real templates write calls in, fed a character at a time and a token at a time; what the deltas add up to is what
the whole answer's parse (with_calls) gives."""

import json

import pytest

from ppalli.data.templates import resolve_template
from ppalli.infer.call_stream import CallParts, CallStream, with_calls
from ppalli.infer.structured import CallLayout, call_layout
from ppalli.models.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_time", "search")]
LLAMA31 = CallLayout("", None, "", ("name", "parameters"), "name", "parameters")
ARGS_FIRST = CallLayout("<tool_call>\n", None, "\n</tool_call>", ("arguments", "name"), "name", "arguments")


@pytest.fixture(scope="module")
def tok(shared_data):
    return load_tokenizer(shared_data / "tokenizer_qwen2.5")


@pytest.fixture(scope="module")
def qwen(tok):
    return call_layout(resolve_template("auto", tok))


def _pieces(text: str, how: str, tok) -> list[str]:
    if how == "chars":
        return list(text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out, said = [], ""
    for k in range(1, len(ids) + 1):  # the text each token completes, as a stream releases it
        now = tok.decode(ids[:k])
        if not now.endswith("\ufffd"):
            out.append(now[len(said):])
            said = now
    return out


def _run(layout: CallLayout, text: str, how: str, tok, forced: bool = False):
    stream = CallStream.of(layout, forced)
    parts = [p for piece in _pieces(text, how, tok) for p in stream.feed(piece)] + stream.end()
    content = "".join(t for kind, t in parts if kind == "content")
    calls: dict[int, dict] = {}
    for kind, delta in parts:
        if kind == "call":
            call = calls.setdefault(delta["index"], {"name": None, "arguments": ""})
            if "id" in delta:
                assert call["name"] is None and delta["id"].startswith("call_") and delta["type"] == "function"
                call["name"] = delta["function"]["name"]
            call["arguments"] += delta["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)], stream.called


def _whole(text: str) -> tuple[str | None, list[dict]]:
    choice = with_calls({"message": {"content": text}, "finish_reason": "stop"}, text, TOOLS)
    calls = [c["function"] for c in choice["message"].get("tool_calls", [])]
    return choice["message"]["content"], [{"name": c["name"], "arguments": c["arguments"]} for c in calls]


@pytest.mark.parametrize("how", ["chars", "tokens"])
def test_qwens_calls_stream_as_the_whole_answer_parses(qwen, tok, how):
    one = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "KST"}}\n</tool_call>'
    odd = '<tool_call>\n{"name": "search", "arguments": {"q": "a}b\\"c{ [x]", "n": [1, {"k": 2}]}}\n</tool_call>'
    for text in (one, "확인해 볼게요.\n" + one, one + "\n" + odd, "<tool 태그를 쓰면 됩니다. <tool_ 끝",
                 "  앞\n" + one + "\n뒤  ", "\n\n" + one + "\n\n"):
        content, calls, called = _run(qwen, text, how, tok)
        whole_content, whole_calls = _whole(text)
        assert (content or None) == whole_content and called == bool(whole_calls), (content, whole_content)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
            (c["name"], json.loads(c["arguments"])) for c in whole_calls]
    _, calls, _ = _run(qwen, one + "\n" + odd, how, tok)
    assert calls[1]["arguments"] == '{"q": "a}b\\"c{ [x]", "n": [1, {"k": 2}]}'  # the model's own text, in order


def test_a_bare_json_call_streams_only_where_it_is_forced(tok):
    text = '{"name": "get_time", "parameters": {"tz": "UTC"}}'
    content, calls, called = _run(LLAMA31, text, "chars", tok, forced=True)
    assert content == "" and called and calls == [{"name": "get_time", "arguments": '{"tz": "UTC"}'}]
    assert CallStream.of(LLAMA31, forced=False) is None  # "auto": nothing tells a call's start from text
    assert CallStream.of(ARGS_FIRST, forced=True) is None  # the name comes after the arguments
    assert CallStream.of(None, forced=True) is None


def test_scored_tokens_of_held_text_go_with_the_next_part(qwen):
    parts = CallParts(1, qwen, forced=False)
    assert parts.parts(0, [("content", "답: <tool", [1])]) == [("content", "답:", [1])]  # the blank waits too
    assert parts.parts(0, [("content", "_c", [2])]) == []  # "<tool_c" may still open a call: held, its token too
    out = parts.parts(0, [("content", "all>\n", [3])])
    assert out == []  # the opening, whole: nothing to send until the call's head is known
    out = parts.parts(0, [("content", '{"name": "get_time", "arguments": {}', [4])])
    assert [kind for kind, _, _ in out] == ["call", "call"] and out[0][2] == [2, 3, 4] and out[1][2] == []
    tail, held = parts.end(0)
    assert tail == [] and held == [] and parts.finish_reason(0, "stop") == "tool_calls"
    plain = CallParts(1)  # no tools: parts pass as they are
    assert plain.parts(0, [("content", "<tool_call>", [5])]) == [("content", "<tool_call>", [5])]
    assert plain.finish_reason(0, "length") == "length"


def test_a_call_cut_by_max_tokens_goes_whole_as_it_streamed(qwen, tok):
    """max_tokens ends a grammar-held answer inside a call's arguments: the whole reply gives the calls as the stream
    sent them (the cut one's arguments as far as they got) with finish_reason "length", as the stream ends."""
    text = '앞\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "KST"}}\n</tool_call>\n<tool_call>\n' \
           '{"name": "search", "arguments": {"q": "서울 날'
    content, calls, called = _run(qwen, text, "tokens", tok)
    choice = with_calls({"message": {"content": text}, "finish_reason": "length"}, text, TOOLS, qwen)
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == content == "앞"
    got = [c["function"] for c in choice["message"]["tool_calls"]]
    assert [{"name": c["name"], "arguments": c["arguments"]} for c in got] == calls
    assert got[1]["arguments"] == '{"q": "서울 날' and json.loads(got[0]["arguments"]) == {"tz": "KST"}
    parts = CallParts(1, qwen, forced=True)
    parts.parts(0, [("content", text, [])])
    assert called and parts.finish_reason(0, "length") == "length" and parts.finish_reason(0, "stop") == "tool_calls"
    plain = with_calls({"message": {"content": "답"}, "finish_reason": "length"}, "답", TOOLS, qwen)
    assert plain == {"message": {"role": "assistant", "content": "답"}, "finish_reason": "length"}
    opened = with_calls({"message": {}, "finish_reason": "length"}, '<tool_call>\n{"na', TOOLS, qwen)
    assert opened["message"] == {"role": "assistant", "content": None}  # nor is an opening cut before its name
    whole_then_text = text.split("\n<tool_call>\n{\"name\": \"search\"")[0] + "\n그리고 더"  # cut after a whole call
    choice = with_calls({"message": {}, "finish_reason": "length"}, whole_then_text, TOOLS, qwen)
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "앞\n\n그리고 더"
    parts = CallParts(1, qwen, forced=False)
    parts.parts(0, [("content", whole_then_text, [])])
    assert parts.finish_reason(0, "length") == "tool_calls"  # the stream ends alike
