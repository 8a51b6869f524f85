"""Detect a row format from its columns and normalize every format to messages.

Normalized examples are plain dicts (they cross process boundaries):
- SFT:        {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...], "where": str}
              (+ "tools": [function schemas] where the row has them; an assistant turn that calls tools has
              "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}], one that came
              with its reasoning apart, "reasoning_content": str, as Qwen3's and DeepSeek-R1's data keep it)
- preference: {"prompt": [messages], "chosen": str, "rejected": str, "where": str} (an answer that calls tools
              is its assistant turn, {"role": "assistant", "content", "tool_calls"}; "tools" as for SFT)
- raw text:   {"text": str, "where": str}

Column names match case-insensitively and through aliases (Q/A, question/answer, prompt/response, ...);
`columns` maps the format's names to the file's, e.g. {question: 질문, answer: 답변}.
"""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Iterator

from ppalli.data.sources import Row, RowError
from ppalli.data.tools import ToolError, tool_calls, tool_schemas
from ppalli.errors import DataError

FORMATS = ("alpaca", "qa", "messages", "sharegpt", "text", "preference", "summarization", "calls")

# Canonical field -> names accepted in files (lower case), in order of preference.
ALIASES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction",),
    "input": ("input",),
    "output": ("output",),
    "system": ("system", "system_prompt"),
    "question": ("question", "q", "query", "prompt"),
    "answer": ("answer", "a", "response", "completion"),
    "messages": ("messages", "conversations", "conversation", "dialog"),
    "text": ("text", "content"),
    "prompt": ("prompt", "question", "instruction", "conversations", "messages"),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
    "dialogue": ("dialogue", "dialog", "conversation"),
    "document": ("document", "article", "text", "content"),
    "summary": ("summary", "summarization", "abstract"),
    "tools": ("tools", "functions"),
    "calls": ("answers", "calls", "tool_calls"),  # the calls that answer a question (xLAM's `answers`)
}

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
         # tool use: a tool's result (OpenAI's "tool" and older "function", Llama 3.1's "ipython", LLaMA-Factory's
         # "observation"), and LLaMA-Factory's "function_call" turn, an assistant's call written as JSON text
         "tool": "tool", "function": "tool", "ipython": "tool", "observation": "tool", "function_call": "assistant"}

# Summarization prompts. Korean when the source text has Hangul, so a Korean model is asked in Korean.
SUMMARIZE = {
    ("ko", "dialogue"): "다음 대화를 요약해 주세요.",
    ("ko", "document"): "다음 글을 요약해 주세요.",
    ("en", "dialogue"): "Summarize the following dialogue.",
    ("en", "document"): "Summarize the following document.",
}
_DETECT_ROWS = 32  # rows looked at to decide the format of a source
_HANGUL = re.compile("[\uac00-\ud7a3]")
_SKIP_HINT = "fix the row, map the column with data.columns, or set data.skip_bad_rows=true to skip such rows"


class Fields:
    """Case-insensitive, alias-aware access to one row's columns, after the user's column mapping."""

    def __init__(self, data: dict, columns: dict[str, str]):
        self.columns = columns
        self.lower = {str(k).lower(): k for k in data}
        self.data = data

    def key(self, field: str) -> str | None:
        if field in self.columns:
            mapped = self.columns[field]
            return mapped if mapped in self.data else self.lower.get(mapped.lower())
        for alias in ALIASES.get(field, (field,)):
            if alias in self.lower:
                return self.lower[alias]
        return None

    def has(self, field: str) -> bool:
        return self.key(field) is not None

    def get(self, field: str):
        key = self.key(field)
        return None if key is None else self.data[key]

    def name(self, field: str) -> str:
        """The column name to print for a field: the user's mapping, else the format's own name."""
        return self.columns.get(field, field)


def detect_format(data: dict, columns: dict[str, str], where: str) -> str:
    """The format a row's columns describe; DataError when none fits."""
    f = Fields(data, columns)
    if f.has("chosen") and f.has("rejected"):
        return "preference"
    if f.has("messages") and isinstance(f.get("messages"), list):
        turns = [t for t in f.get("messages") if isinstance(t, dict)]
        if turns and "from" in turns[0]:
            return "sharegpt"
        if turns and "role" in turns[0]:
            return "messages"
    checks = (("calls", ("question", "tools", "calls")), ("alpaca", ("instruction", "output")),
              ("summarization", ("summary",)), ("qa", ("question", "answer")), ("text", ("text",)))
    for fmt, needed in checks:
        if all(f.has(n) for n in needed):
            return fmt
    names = ", ".join(map(str, data)) or "none"
    raise DataError(f"{where}: cannot tell the data format from the columns ({names}); set data.format to one of "
                    f"{', '.join(FORMATS)} and map columns with data.columns, e.g. {{question: Q, answer: A}}")


def normalize(row: Row, fmt: str, columns: dict[str, str]) -> dict:
    """One row as a normalized example; RowError (naming the row and the column) when a field is missing or wrong."""
    if row.error is not None:
        raise RowError(f"{row.where}: {row.error}; {_SKIP_HINT}")
    f = Fields(row.data, columns)
    example = _NORMALIZERS[fmt](f, row.where)
    example["where"] = row.where
    return example


def normalize_rows(rows: Iterator[Row], fmt: str, columns: dict[str, str], bad: list[str] | None,
                   counter: list[int] | None = None) -> Iterator[dict]:
    """Normalize a stream. `fmt` 'auto' is decided from the first rows. With `bad` a list, bad rows are recorded
    there and skipped; with None the first bad row raises. `counter[0]` counts every row read."""
    rows = iter(rows)
    if fmt == "auto":
        fmt, head = detect_stream_format(rows, columns)
        rows = itertools.chain(head, rows)
    for row in rows:
        if counter is not None:
            counter[0] += 1
        try:
            yield normalize(row, fmt, columns)
        except RowError as e:
            if bad is None:
                raise
            bad.append(str(e).split("; " + _SKIP_HINT)[0])


def detect_stream_format(rows: Iterator[Row], columns: dict[str, str]) -> tuple[str, list[Row]]:
    """The format most of the first rows describe (one broken first row must not decide a whole file), and the
    rows read to decide it, which the caller puts back in front of the stream."""
    head = list(itertools.islice(rows, _DETECT_ROWS))
    votes: collections.Counter[str] = collections.Counter()
    first_error = None
    for row in head:
        if row.error is not None:
            continue
        try:
            votes[detect_format(row.data, columns, row.where)] += 1
        except DataError as e:
            first_error = first_error or e
    if not votes:
        if first_error is not None:
            raise first_error
        where = head[0].where if head else "the data"
        raise DataError(f"{where}: no readable row among the first {len(head)} to tell the format from; "
                        "fix the file or set data.format")
    return votes.most_common(1)[0][0], head


def check_format_name(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"data.format: unknown format '{fmt}'; use auto or one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- per-format normalizers


def _text(f: Fields, field: str, where: str, *, optional: bool = False) -> str | None:
    value = f.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return None
        what = "missing column" if not f.has(field) else "empty column"
        raise RowError(f"{where}: {what} '{f.name(field)}'; {_SKIP_HINT}")
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise RowError(f"{where}: column '{f.name(field)}' should be text, got {type(value).__name__}; "
                       f"{_SKIP_HINT}")
    return value


def _alpaca(f: Fields, where: str) -> dict:
    instruction = _text(f, "instruction", where)
    extra = _text(f, "input", where, optional=True)
    user = instruction if extra is None else f"{instruction}\n\n{extra}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(f, "output", where)}]
    system = _text(f, "system", where, optional=True)
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


def _qa(f: Fields, where: str) -> dict:
    return {"messages": [{"role": "user", "content": _text(f, "question", where)},
                         {"role": "assistant", "content": _text(f, "answer", where)}]}


def _summarization(f: Fields, where: str) -> dict:
    kind = "dialogue" if f.has("dialogue") else "document"
    source = _text(f, kind, where)
    lang = "ko" if _HANGUL.search(source[:2000]) else "en"
    return {"messages": [{"role": "user", "content": f"{SUMMARIZE[lang, kind]}\n\n{source}"},
                         {"role": "assistant", "content": _text(f, "summary", where)}]}


def _raw_text(f: Fields, where: str) -> dict:
    return {"text": _text(f, "text", where)}


def _turns(value, where: str, column: str) -> list[dict]:
    """A list of {role, content} or {from, value} turns, roles normalized."""
    if not isinstance(value, list) or not value:
        raise RowError(f"{where}: column '{column}' should be a non-empty list of turns; {_SKIP_HINT}")
    return [_turn(t, where, column, i) for i, t in enumerate(value, start=1)]


def _turn(turn, where: str, column: str, i: int) -> dict:
    if not isinstance(turn, dict):
        raise RowError(f"{where}: {column} turn {i} should be an object with role and content; {_SKIP_HINT}")
    name = str(turn.get("role", turn.get("from"))).lower()
    content = turn.get("content", turn.get("value"))
    if name not in ROLES:
        raise RowError(f"{where}: {column} turn {i} has role '{name}'; ppalli trains on system, user (human), "
                       f"assistant (gpt) and tool turns; {_SKIP_HINT}")
    calls = turn.get("tool_calls")
    if name == "function_call":  # the call is the turn's text: JSON of one call or a list of them
        calls, content = content, ""
    thought = turn.get("reasoning_content", turn.get("reasoning")) if ROLES[name] == "assistant" else None
    thought = {"reasoning_content": thought} if isinstance(thought, str) and thought.strip() else {}
    if calls is not None and ROLES[name] == "assistant":
        return {"role": "assistant", "content": content or "", **thought,
                "tool_calls": _tool_calls(calls, where, column, i)}
    if not isinstance(content, str):
        raise RowError(f"{where}: {column} turn {i} content should be text, got {type(content).__name__}; "
                       f"{_SKIP_HINT}")
    out = {"role": ROLES[name], "content": content, **thought}
    if out["role"] == "tool":  # which call it answers, for the templates that say so
        out.update({k: turn[k] for k in ("name", "tool_call_id") if isinstance(turn.get(k), str)})
    return out


def _tool_calls(calls, where: str, column: str, i: int) -> list[dict]:
    try:
        return tool_calls(calls, f"{column} turn {i}")
    except ToolError as e:
        raise RowError(f"{where}: {e}; {_SKIP_HINT}") from None


def _tools(f: Fields, where: str) -> list[dict] | None:
    try:
        return tool_schemas(f.get("tools"), f"column '{f.name('tools')}'")
    except ToolError as e:
        raise RowError(f"{where}: {e}; {_SKIP_HINT}") from None


def _conversation(f: Fields, where: str) -> dict:
    messages = _turns(f.get("messages"), where, f.name("messages"))
    first = next((m for m in messages if m["role"] != "system"), None)
    if first is None or first["role"] != "user":
        raise RowError(f"{where}: the conversation should start with a user turn; {_SKIP_HINT}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(f"{where}: the conversation has no assistant turn to learn from; {_SKIP_HINT}")
    tools = _tools(f, where)
    return {"messages": messages, **({"tools": tools} if tools else {})}


def _response(value, where: str, column: str) -> str | list[dict]:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, dict):
        return _turns([value], where, column)
    if isinstance(value, list):
        return _turns(value, where, column)
    raise RowError(f"{where}: column '{column}' should be text, a turn or a list of turns; {_SKIP_HINT}")


def _calls(f: Fields, where: str) -> dict:
    """A question, the tools offered and the calls that answer it (JSON text or lists), as one user turn and one
    assistant turn that calls them: single-turn function-calling data such as Salesforce's xLAM."""
    tools = _tools(f, where)
    if not tools:
        raise RowError(f"{where}: empty column '{f.name('tools')}': a call needs the tools it may call; {_SKIP_HINT}")
    try:
        calls = tool_calls(f.get("calls"), f"column '{f.key('calls') or f.name('calls')}'")
    except ToolError as e:
        raise RowError(f"{where}: {e}; {_SKIP_HINT}") from None
    return {"messages": [{"role": "user", "content": _text(f, "question", where)},
                         {"role": "assistant", "content": "", "tool_calls": calls}], "tools": tools}


def _preference(f: Fields, where: str) -> dict:
    if not f.has("chosen") or not f.has("rejected"):
        missing = "chosen" if not f.has("chosen") else "rejected"
        raise RowError(f"{where}: missing column '{f.name(missing)}'; {_SKIP_HINT}")
    chosen = _response(f.get("chosen"), where, f.name("chosen"))
    rejected = _response(f.get("rejected"), where, f.name("rejected"))
    raw_prompt = f.get("prompt")
    if isinstance(raw_prompt, list):
        prompt = _turns(raw_prompt, where, f.name("prompt"))
    elif isinstance(raw_prompt, str) and raw_prompt.strip():
        prompt = [{"role": "user", "content": raw_prompt}]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        prompt = _common_prefix(chosen, rejected)  # chosen/rejected hold whole conversations
    else:
        raise RowError(f"{where}: missing column '{f.name('prompt')}'; {_SKIP_HINT}")
    tools = _tools(f, where)
    return {"prompt": prompt, "chosen": _final_answer(chosen, prompt, where, "chosen"),
            "rejected": _final_answer(rejected, prompt, where, "rejected"), **({"tools": tools} if tools else {})}


def _common_prefix(a: list[dict], b: list[dict]) -> list[dict]:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return a[:n]


def _final_answer(value: str | list[dict], prompt: list[dict], where: str, column: str) -> str | dict:
    """The answer's text, or its assistant turn where it calls tools or carries its reasoning apart."""
    if isinstance(value, str):
        return value
    tail = value[len(prompt):] if value[:len(prompt)] == prompt else value
    if len(tail) != 1 or tail[0]["role"] != "assistant" or not (tail[0]["content"].strip() or "tool_calls" in tail[0]):
        raise RowError(f"{where}: '{column}' should end in exactly one assistant answer after the prompt; "
                       f"{_SKIP_HINT}")
    return tail[0] if "tool_calls" in tail[0] or "reasoning_content" in tail[0] else tail[0]["content"]


_NORMALIZERS = {"alpaca": _alpaca, "qa": _qa, "summarization": _summarization, "text": _raw_text,
                "messages": _conversation, "sharegpt": _conversation, "preference": _preference, "calls": _calls}
