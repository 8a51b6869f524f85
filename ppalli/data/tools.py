"""Tool use (function calling) in one form for training data and `ppalli serve`: function schemas, an assistant's
calls, and the calls a model writes in its answer.

A call is kept in OpenAI's form, {"type": "function", "function": {"name": str, "arguments": dict}}, whatever form
it came in: OpenAI's (arguments as JSON text, as its API sends them), a bare {"name", "arguments"}, or Llama 3.1's
{"name", "parameters"}. Chat templates (Qwen2.5's, Llama 3.1's, ppalli's chatml) write `arguments` out with tojson,
so they must be an object here, not its text. A model's answer holds calls as Hermes-style
`<tool_call>{json}</tool_call>` blocks (Qwen2.5 / Qwen3, chatml) or, as Llama 3.1 answers, one JSON object.
"""

from __future__ import annotations

import json
import re


class ToolError(ValueError):
    """A schema or a call that is not well formed; the message says which and why (the caller adds where)."""


def parse_json(value, what: str):
    """Text that holds JSON, parsed (anything else as it is)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ToolError(f"{what} is not valid JSON ({e.msg} at character {e.pos})") from None


def tool_calls(calls, what: str) -> list[dict]:
    """An assistant turn's calls (a list of them, or one, or their JSON text: LLaMA-Factory's function_call turns) in
    OpenAI's form; `what` names the turn in errors."""
    calls = parse_json(calls, f"{what} tool call")
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise ToolError(f"{what} tool_calls should be a non-empty list of calls")
    out = []
    for k, call in enumerate(calls, start=1):
        where = f"{what} tool call {k}"
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError(f"{where} should be an object with a function name")
        args = parse_json(fn.get("arguments", fn.get("parameters")), f"{where}'s arguments")
        if not isinstance(args, dict | None):
            raise ToolError(f"{where}'s arguments should be a JSON object, got {type(args).__name__}")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args or {}}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def tool_schemas(value, what: str) -> list[dict] | None:
    """Function schemas, a list or its JSON text, each as given (OpenAI's {"type": "function", "function": {...}}
    or a bare schema: chat templates write them out as they are); None for none."""
    value = parse_json(value, what)
    if value in (None, "", []):
        return None
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not all(isinstance(t, dict) and tool_name(t) for t in value):
        raise ToolError(f"{what} should be a list of function schemas, each with a name")
    return value


def tool_name(tool: dict) -> str | None:
    """A schema's function name (OpenAI's wrapped form or a bare schema), or None."""
    fn = tool.get("function", tool)
    return fn.get("name") if isinstance(fn, dict) and isinstance(fn.get("name"), str) else None


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def calls_in_answer(text: str, names: set[str] | None = None) -> tuple[str | None, list[dict]]:
    """(the answer's text without its calls, or None when nothing else is left; the calls) from a model's answer:
    `<tool_call>{json}</tool_call>` blocks, else a whole answer that is one JSON call. A call must name one of
    `names` (a request's tools; None: any name) and carry its arguments as an object; anything else stays text."""
    found = [(block, call) for block in _HERMES.finditer(text) if (call := _call(block.group(1), names))]
    if found:
        rest = text
        for block, _ in reversed(found):
            rest = rest[:block.start()] + rest[block.end():]
        return rest.strip() or None, [call for _, call in found]
    call = _call(text.strip(), names)
    return (None, [call]) if call else (text, [])


def _call(text: str, names: set[str] | None) -> dict | None:
    try:
        value = json.loads(text)
        calls = tool_calls(value, "answer") if isinstance(value, dict) else None
    except (json.JSONDecodeError, ToolError):
        return None
    return calls[0] if calls and (names is None or calls[0]["function"]["name"] in names) else None
