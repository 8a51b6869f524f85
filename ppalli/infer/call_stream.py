"""A streamed chat answer's tool calls as OpenAI's API streams them: the call's id and name in one delta, then its
arguments' JSON text piece by piece as the model writes it, beside the content before and after the calls.

`ppalli serve` streams an answer with tools this way where a grammar holds it (a forced tool_choice, or "auto" with
a template that opens calls with a marker, infer/structured.py), so its calls are known to be well formed as they
decode: `<tool_call>\\n{"name": "get_time", "arguments": {"tz": "KST"}}\\n</tool_call>` goes out as

    {"tool_calls": [{"index": 0, "id": "call_...", "type": "function", "function": {"name": "get_time",
                                                                                     "arguments": ""}}]}
    {"tool_calls": [{"index": 0, "function": {"arguments": "{\\"tz\\": "}}]}   ... as its tokens come

Text that may begin the opening marker is held back until it is known not to, and blanks until text follows them,
so the content streamed adds up to the whole answer's (its text around the calls, stripped). Without a grammar a
call the model opens could be malformed halfway, so such answers still go whole once decoded.
"""

from __future__ import annotations

import json
import re
import uuid

from ppalli.data.tools import calls_in_answer, tool_name
from ppalli.infer.structured import CallLayout


class CallStream:
    """One choice's streamed text -> parts ("content", text) and ("call", a tool_calls delta entry)."""

    def __init__(self, layout: CallLayout):
        self.layout = layout
        self.buf = ""
        self.state = "head" if not layout.opening else "text"  # Llama 3.1's bare JSON: a call from the first token
        self.calls = 0  # calls opened so far
        self.blanks, self.said = "", False  # blanks held until text follows them; whether content went out
        self.depth, self.in_str, self.esc = 0, False, False
        # the object's head up to its arguments' value: {"name": "<name>", "arguments":
        self.head = re.compile(r'\s*\{\s*"' + re.escape(layout.name_key) + r'"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"'
                               + re.escape(layout.args_key) + r'"\s*:\s*(?=\S)')  # to the value's first mark

    @classmethod
    def of(cls, layout: CallLayout | None, forced: bool) -> CallStream | None:
        """A stream for this layout, or None: no layout; the name not before the arguments (the head cannot go
        out before the whole call is known); calls opened by no marker where the answer may also be text."""
        if layout is None or layout.keys[:1] != (layout.name_key,) or not (layout.opening or forced):
            return None
        return cls(layout)

    @property
    def called(self) -> bool:
        return self.calls > 0

    @property
    def inside(self) -> bool:
        """Whether the text so far ends inside a call's arguments (a call out, not yet whole)."""
        return self.state == "args"

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.buf += text
        out: list[tuple[str, object]] = []
        while True:
            step = getattr(self, f"_{self.state}")()
            if step is None:
                return out
            out += step

    def end(self) -> list[tuple[str, object]]:
        """What is still held when the answer ends: text (a partial marker that never completed) as content; the
        blanks at its end are dropped, as the whole answer's content is stripped."""
        rest, self.buf = self.buf, ""
        return self._content(rest) if self.state == "text" else []

    def _content(self, text: str) -> list[tuple[str, object]]:
        """text as content, less the blanks at its end (held for the text that may follow) and, before any content
        went out, at its start."""
        text = self.blanks + text
        kept = text.rstrip()
        self.blanks = text[len(kept):]
        if not self.said:
            kept = kept.lstrip()
        self.said = self.said or bool(kept)
        return [("content", kept)] if kept else []

    # ---- states: each returns the parts it made (maybe none) and moves on, or None to wait for more text

    def _text(self):
        opening = self.layout.opening
        at = self.buf.find(opening)
        if at >= 0:
            before, self.buf, self.state = self.buf[:at], self.buf[at + len(opening):], "head"
            return self._content(before)
        keep = _partial_suffix(self.buf, opening)  # may be the marker's start: held back
        emit, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return self._content(emit) if emit else None

    def _head(self):
        m = self.head.match(self.buf)
        if m is None:
            return None
        name = json.loads(m.group(1))
        self.buf, self.state = self.buf[m.end():], "args"
        self.depth, self.in_str, self.esc = 0, False, False
        self.calls += 1
        return [("call", {"index": self.calls - 1, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": name, "arguments": ""}})]

    def _args(self):
        end = None
        for i, ch in enumerate(self.buf):
            if self.in_str:
                self.esc, self.in_str = (False, True) if self.esc else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    end = i + 1
                    break
        piece = self.buf if end is None else self.buf[:end]
        self.buf = "" if end is None else self.buf[end:]
        if end is not None:
            self.state = "tail"
        if not piece:
            return None
        return [("call", {"index": self.calls - 1, "function": {"arguments": piece}})]

    def _tail(self):
        """After the arguments: the call object's "}", then the next call (between) or the end of the calls."""
        rest = self.buf.lstrip()
        if not rest.startswith("}"):
            return None
        rest = rest[1:]
        between, closing = self.layout.between, self.layout.closing
        if between is not None and rest.startswith(between):
            self.buf, self.state = rest[len(between):], "head"
            return []
        if between is not None and between.startswith(rest):  # may still become the next call's opening
            return None
        if rest.startswith(closing):
            self.buf, self.state = rest[len(closing):], "text" if self.layout.opening else "done"
            return []
        if closing.startswith(rest):
            return None
        self.buf, self.state = rest, "text" if self.layout.opening else "done"  # held text after a call
        return []

    def _done(self):
        return None


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper start of `marker`."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class CallParts:
    """serve's stream parts (kind, text, scored) of each choice through its CallStream: content may come out as
    ("call", delta entry, scored) parts; the scored tokens of text held back go with the next part out."""

    def __init__(self, choices: int, layout: CallLayout | None = None, forced: bool = False):
        """layout None: the parts pass as they are (an answer with no tools)."""
        self.streams = [None if layout is None else CallStream.of(layout, forced) for _ in range(choices)]
        self.held: list[list] = [[] for _ in range(choices)]

    def parts(self, index: int, parts: list[tuple[str, str, list]]) -> list[tuple[str, object, list]]:
        if self.streams[index] is None:
            return parts
        out = []
        for kind, text, scored in parts:
            self.held[index] += scored
            for made in self.streams[index].feed(text) if kind == "content" else [(kind, text)]:
                out.append((*made, self.held[index]))
                self.held[index] = []
        return out

    def end(self, index: int) -> tuple[list[tuple[str, object, list]], list]:
        """(the parts still held at the choice's end, the scored tokens no part took)."""
        if self.streams[index] is None:
            return [], []
        out = [(kind, text, []) for kind, text in self.streams[index].end()]
        if out:
            out[0] = (*out[0][:2], self.held[index])
            self.held[index] = []
        held, self.held[index] = self.held[index], []
        return out, held

    def finish_reason(self, index: int, reason: str) -> str:
        """"tool_calls" where the choice called, unless max_tokens cut it inside a call ("length")."""
        stream = self.streams[index]
        return _called_reason(stream.called, stream.inside, reason) if stream is not None else reason


def _called_reason(called: bool, inside: bool, reason: str) -> str:
    """An answer's finish_reason: "tool_calls" where it called and the calls that went out are whole, "length"
    where max_tokens cut the last one's arguments (as OpenAI's API gives a cut call). Text or a next call's opening
    cut after whole calls still says "tool_calls", as vLLM's server does."""
    return "tool_calls" if called and not (inside and reason == "length") else reason


def with_calls(choice: dict, text: str, tools: list[dict] | None, layout: CallLayout | None = None) -> dict:
    """A chat choice whose answer calls the request's tools: the calls as the message's tool_calls (arguments as
    JSON text, as OpenAI's API gives them), the rest of the text as its content (null when none is left), and
    finish_reason "tool_calls". Anything else, and every answer of a request without tools, as it is. layout: the
    grammar's, where one held the answer (so it streams its calls): an answer max_tokens cut goes as its stream
    went (`cut_calls`)."""
    if layout is not None and choice["finish_reason"] == "length":
        return cut_calls(choice, text, layout)
    content, calls = calls_in_answer(text, {tool_name(t) for t in tools}) if tools else (text, [])
    if calls:
        choice["message"] = {"role": "assistant", "content": content, "tool_calls": [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}} for c in calls]}
        choice["finish_reason"] = "tool_calls"
    return choice


def cut_calls(choice: dict, text: str, layout: CallLayout) -> dict:
    """A choice that max_tokens cut inside a grammar-held answer, as its stream sent it: the calls opened (the last
    one's arguments as far as they got, not valid JSON then, as OpenAI's API gives a cut call) and the content
    around them (a call's opening cut before its name is known is neither); finish_reason "length" where the cut
    fell inside a call's arguments, else "tool_calls" where calls came whole before it (as the stream ends)."""
    stream = CallStream(layout)
    parts = stream.feed(text) + stream.end()
    calls: dict[int, dict] = {}
    for kind, delta in parts:
        if kind != "call":
            continue
        if "id" in delta:
            calls[delta["index"]] = {"id": delta["id"], "type": "function",
                                     "function": {"name": delta["function"]["name"], "arguments": ""}}
        else:
            calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
    content = "".join(piece for kind, piece in parts if kind == "content") or None
    choice["message"] = {"role": "assistant", "content": content}
    if calls:
        choice["message"]["tool_calls"] = [calls[i] for i in sorted(calls)]
    choice["finish_reason"] = _called_reason(bool(calls), stream.inside, choice["finish_reason"])
    return choice
