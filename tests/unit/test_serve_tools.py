"""`ppalli serve`'s answers with tools, apart from a model: a choice whose text calls the request's tools becomes
OpenAI's tool_calls message, and a streamed one comes as OpenAI's chunks (role, content, calls, end)."""

import io
import json

from ppalli.infer.call_stream import with_calls
from ppalli.infer.serve import _Handler

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TEXT = '확인해 볼게요.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울"}}\n</tool_call>'


def _choice(text: str) -> dict:
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": "stop"}


def test_a_call_becomes_tool_calls_with_its_arguments_as_json_text():
    choice = with_calls(_choice(TEXT), TEXT, TOOLS)
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "확인해 볼게요."
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "서울"}'}
    assert with_calls(_choice(TEXT), TEXT, None) == _choice(TEXT)  # a request without tools: text as it is
    assert with_calls(_choice("맑아요."), "맑아요.", TOOLS) == _choice("맑아요.")


def test_a_streamed_answer_with_calls_comes_in_openais_chunks():
    handler = object.__new__(_Handler)  # no socket: what it writes goes to a buffer
    handler.wfile = io.BytesIO()
    handler.send_response = handler.send_header = handler.end_headers = lambda *a: None
    choice = with_calls(_choice(TEXT), TEXT, TOOLS)
    handler._stream_whole({"id": "chatcmpl-1", "created": 1, "model": "m", "choices": [choice]})
    events = [e.removeprefix("data: ") for e in handler.wfile.getvalue().decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert [d["delta"] for d in deltas] == [
        {"role": "assistant", "content": ""}, {"content": "확인해 볼게요."},
        {"tool_calls": [{"index": 0, **choice["message"]["tool_calls"][0]}]}, {}]
    assert [d["finish_reason"] for d in deltas] == [None, None, None, "tool_calls"]
