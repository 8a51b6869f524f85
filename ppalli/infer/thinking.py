"""A reasoning model's answer split into its thinking and its reply, as OpenAI-compatible servers return them
(`reasoning_content` beside `content`): `ppalli serve --reasoning`, for a run trained on answers that open with a
`<think>...</think>` block (Qwen3's template writes one; data.reasoning_content goes in as one).

The split works on streamed text too: a piece that may be the start of "<think>" or "</think>" is held back until the
next piece decides, so no tag is ever sent half as reasoning and half as content.
"""

from __future__ import annotations

from ppalli.infer.batcher import held_back

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Text pieces in, ("reasoning" | "content", text) parts out. An answer whose first non-blank text is not
    "<think>" is all content; after "</think>" the newlines that separate the reply are dropped."""

    def __init__(self):
        self.state, self.held = "start", ""  # start -> think -> after -> content, or start -> content
        self.opened = False  # the answer opened with "<think>"
        self.said = False  # some thinking has gone out

    def push(self, text: str) -> list[tuple[str, str]]:
        self.held += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                lead = self.held.lstrip()
                if lead.startswith(OPEN):
                    self.held, self.state, self.opened = lead[len(OPEN):], "think", True
                elif OPEN.startswith(lead):  # still maybe "<think>" (or nothing but blanks yet)
                    return out
                else:
                    self.state = "content"
            elif self.state == "think":
                if not self.said:  # the thinking's leading newlines go, as a whole answer's split drops them
                    self.held = self.held.lstrip("\n")
                end = self.held.find(CLOSE)
                if end < 0:  # a tail that may begin "</think>", and the newlines before it, wait
                    body = self.held[:len(self.held) - held_back(self.held, [CLOSE])].rstrip("\n")
                    out += _part("reasoning", body)
                    self.held, self.said = self.held[len(body):], self.said or bool(body)
                    return out
                out += _part("reasoning", self.held[:end].rstrip("\n"))
                self.held, self.state = self.held[end + len(CLOSE):], "after"
            elif self.state == "after":
                self.held = self.held.lstrip("\n")
                if not self.held:
                    return out
                self.state = "content"
            else:
                out += _part("content", self.held)
                self.held = ""
                return out

    def flush(self) -> list[tuple[str, str]]:
        """What is held at the answer's end: thinking left open stays reasoning, anything else is content."""
        held, self.held = self.held, ""
        if self.state == "think":
            return _part("reasoning", held.rstrip("\n") if self.said else held.strip("\n"))
        return _part("content", held if self.state != "after" else "")


class StreamSplit:
    """The pieces of a stream's choices through a ThinkSplitter each (or as they are when `on` is False): parts
    (kind, text, scored) where `scored` is the tokens the part's text completes; those of a piece held back go with
    the next part out, and `left` gives what is still held at the end."""

    def __init__(self, choices: int, on: bool):
        self.splitters = [ThinkSplitter() if on else None for _ in range(choices)]
        self.held: list[list] = [[] for _ in range(choices)]

    def parts(self, index: int, text: str | None, scored: list) -> list[tuple[str, str, list]]:
        """A piece of choice `index` (None: its end) -> its parts."""
        splitter = self.splitters[index]
        if splitter is None:
            return [] if text is None else [("content", text, scored)]
        self.held[index] += scored
        out = []
        for kind, piece in splitter.push(text) if text is not None else splitter.flush():
            out.append((kind, piece, self.held[index]))
            self.held[index] = []
        return out

    def left(self, index: int) -> list:
        held, self.held[index] = self.held[index], []
        return held


def split_thinking(text: str) -> tuple[str | None, str]:
    """(the thinking, or None when the answer does not open with "<think>"; the reply) of a whole answer."""
    splitter = ThinkSplitter()
    parts = splitter.push(text) + splitter.flush()
    reasoning = "".join(t for kind, t in parts if kind == "reasoning")
    return (reasoning if splitter.opened else None), "".join(t for kind, t in parts if kind == "content")


def _part(kind: str, text: str) -> list[tuple[str, str]]:
    return [(kind, text)] if text else []
