"""A reasoning answer's <think> block apart from its reply (ppalli/infer/thinking.py, `ppalli serve --reasoning`):
whole answers and the same text streamed in pieces of every size give one split; a stream's chunks come as
reasoning_content deltas, then content ones."""

import io
import json
import queue
from types import SimpleNamespace

import pytest

from ppalli.infer.serve import _Handler
from ppalli.infer.thinking import StreamSplit, ThinkSplitter, split_thinking


@pytest.mark.parametrize("text, want", [
    ("<think>\n생각 중\n두 줄\n</think>\n\n답이에요", ("생각 중\n두 줄", "답이에요")),
    ("  <think>\n\n</think>\n\n답", ("", "답")),  # Qwen3's empty thinking: reasoning "", not None
    ("그냥 답 <think>x</think>", (None, "그냥 답 <think>x</think>")),  # thinking only counts as the opening
    ("<think>열린 채", ("열린 채", "")),  # the answer ended while thinking
    ("<thin", (None, "<thin")), ("a</think>b", (None, "a</think>b"))])
def test_whole_and_streamed_answers_split_alike(text, want):
    assert split_thinking(text) == want
    for size in range(1, len(text) + 1):
        splitter, parts = ThinkSplitter(), []
        for start in range(0, len(text), size):
            parts += splitter.push(text[start:start + size])
        parts += splitter.flush()
        got = ["".join(t for kind, t in parts if kind == part) for part in ("reasoning", "content")]
        assert got == [want[0] or "", want[1]], size


def test_tokens_of_a_held_piece_go_with_the_next_part():
    split = StreamSplit(1, on=True)
    assert split.parts(0, "<thi", [1]) == []  # may be "<think>": held, and its token with it
    assert split.parts(0, "nk>생각", [2]) == [("reasoning", "생각", [1, 2])]
    assert split.parts(0, "</think>", [3]) == []
    assert split.parts(0, "\n\n답", [4]) == [("content", "답", [3, 4])]
    assert split.parts(0, None, []) == [] and split.left(0) == []
    off = StreamSplit(1, on=False)
    assert off.parts(0, "<think>x", [1]) == [("content", "<think>x", [1])] and off.parts(0, None, []) == []


def test_a_stream_sends_thinking_as_reasoning_content_then_the_reply():
    handler = object.__new__(_Handler)  # no socket: what it writes goes to a buffer
    handler.wfile = io.BytesIO()
    handler.send_response = handler.send_header = handler.end_headers = lambda *a: None
    handler.server = SimpleNamespace(reasoning=True)
    job = SimpleNamespace(index=0, error=None, ids=[], prompt_scores=[], finish_reason="stop", hit=False, new=[],
                          scored=[], scored_out=0)
    texts = queue.SimpleQueue()
    for piece in ("<think>\n생", "각\n</thi", "nk>\n\n답", None):
        texts.put((0, piece, []))
    handler._stream([job], texts, {"id": "c", "created": 1, "model": "m"}, {"logprobs": None, "echo": False},
                    chat=True, prompts=[])
    events = [e.removeprefix("data: ") for e in handler.wfile.getvalue().decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["delta"] for e in events[:-1]] == [
        {"role": "assistant", "content": ""}, {"reasoning_content": "생"}, {"reasoning_content": "각"},
        {"content": "답"}, {}]
