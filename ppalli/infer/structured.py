"""Structured output for `ppalli serve`: answers held to a grammar as they decode, so that they parse.

- response_format {"type": "json_object"}: any JSON object; {"type": "json_schema", "json_schema": {"schema": ...}}:
  JSON that the schema accepts (OpenAI's structured outputs). With tools on "auto" beside it, the reply is that JSON
  or calls of the tools (one or more, as "required" takes them).
- tool_choice "required": one call or more of the request's tools; {"type": "function", "function": {"name": X}}:
  one call of X; "auto" (with tools): free text, but a call the model opens is held to one of the tools (where
  xgrammar is installed and the template opens calls with a marker such as `<tool_call>`). A call is written the
  way the run's chat template writes an assistant's calls (the layout is read off the template by rendering a
  probe call: `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` for Qwen2.5 / Qwen3 and chatml, a
  bare `{"name": ..., "parameters": ...}` for Llama 3.1), so a call is the text the model was trained to write,
  its arguments held to the tool's parameter schema.

xgrammar (the grammar engine of vLLM, SGLang and TensorRT-LLM) compiles the grammars against the run's vocabulary
and says, each step, which tokens may come next; those are the only ones greedy decoding or sampling may pick
(the log-probs reported stay the model's own). Once a grammar is complete only the stop tokens are left, so an
answer ends there. It is an optional dependency: `pip install 'ppalli[structured]'`.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

import torch

from ppalli.data.tools import ToolError, tool_name, tool_schemas

_PROBE_NAMES = ("ppalli_probe_a", "ppalli_probe_b")  # a probe call's function names: text no template writes itself
_PROBE_KEY = "ppalli_probe_arg"
INSTALL = "pip install 'ppalli[structured]' (xgrammar)"
_log = logging.getLogger("ppalli.serve")


class ConstraintError(ValueError):
    """A request's response_format or tool_choice that cannot be served; the message names the field and the fix."""


def tools_and_choice(req: dict) -> tuple[list[dict] | None, str | None]:
    """(the function schemas the prompt offers, None for none; the call forced: None, "required" or a tool's name)
    from a chat request's tools and tool_choice ("auto", the default, "none", "required", or OpenAI's named
    {"type": "function", "function": {"name": X}})."""
    try:
        tools = tool_schemas(req.get("tools"), "'tools'")
    except ToolError as e:
        raise ConstraintError(str(e)) from None
    choice = req.get("tool_choice")
    if choice in (None, "auto"):
        return tools, None
    if choice == "none":
        return None, None
    if choice == "required" or isinstance(choice, dict):
        name = "required" if choice == "required" else _named(choice)
        names = [tool_name(t) for t in tools or ()]
        if not names or (name != "required" and name not in names):
            raise ConstraintError(f"'tool_choice': {json.dumps(choice)} forces a call of "
                                  f"{'a tool' if name == 'required' else name!r}, but 'tools' offers "
                                  f"{', '.join(map(repr, names)) or 'none'}")
        return tools, name
    raise ConstraintError(f"'tool_choice' must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                          f"\"function\": {{\"name\": ...}}}}, got {json.dumps(choice)}")


def _named(choice: dict) -> str:
    fn = choice.get("function")
    if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ConstraintError(f"'tool_choice': a named choice is {{\"type\": \"function\", \"function\": "
                              f"{{\"name\": ...}}}}, got {json.dumps(choice)}")
    return fn["name"]


def response_format(value) -> dict | None:
    """A request's response_format as the JSON schema its answers are held to (None: free text). json_object is
    any object; a json_schema's "schema" is taken as OpenAI's structured outputs take it."""
    if value in (None, {}) or value == {"type": "text"}:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ConstraintError("'response_format': a json_schema format is {\"type\": \"json_schema\", "
                                  "\"json_schema\": {\"name\": ..., \"schema\": {a JSON schema}}}")
        return schema
    raise ConstraintError(f"'response_format': type must be \"text\", \"json_object\" or \"json_schema\", "
                          f"got {json.dumps(value)[:200]}")


@dataclass(frozen=True)
class CallLayout:
    """How a run's template writes an assistant's calls: `opening` JSON (`between` JSON)* `closing`, each JSON an
    object with the function's name under `name_key` and its arguments under `args_key`, keys in `keys` order.
    between is None where the template writes one call a turn (Llama 3.1's raises on more)."""

    opening: str
    between: str | None
    closing: str
    keys: tuple[str, str]
    name_key: str
    args_key: str


def call_layout(template) -> CallLayout:
    """Read a template's call layout off its rendering of a probe turn with two calls (one, where it takes one)."""
    from ppalli.data.sources import RowError
    from ppalli.data.templates import render_pair

    tools = [{"type": "function", "function": {"name": n, "description": "", "parameters": {
        "type": "object", "properties": {_PROBE_KEY: {"type": "integer"}}}}} for n in _PROBE_NAMES]
    for count in (2, 1):
        calls = [{"type": "function", "function": {"name": n, "arguments": {_PROBE_KEY: k}}}
                 for k, n in enumerate(_PROBE_NAMES[:count])]
        messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "", "tool_calls": calls}]
        try:
            pre, post = render_pair(template, messages, 1, "tool_choice", tools)
        except RowError as e:
            if count == 1:
                raise ConstraintError(f"'tool_choice': the run's template cannot write a call ({e})") from None
            continue
        text = post[len(pre):]
        found = _probe_objects(text, count)
        if found is not None:
            return _layout(text, found, template.stops, count)
    raise ConstraintError("'tool_choice': the run's template does not write a call as a JSON object with its name "
                          "and arguments (Qwen2.5 / Qwen3's, Llama 3.1's and chatml do), so a call cannot be forced")


def _probe_objects(text: str, count: int) -> list[tuple[int, int, dict]] | None:
    """(start, end, object) of each probe call's JSON in a rendered turn, in order, or None where one is missing."""
    decoder, found, at = json.JSONDecoder(), [], 0
    for k, name in enumerate(_PROBE_NAMES[:count]):
        start = text.find("{", at)
        while start >= 0:
            try:
                value, end = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict) and name in value.values() and {_PROBE_KEY: k} in value.values():
                found.append((start, end, value))
                at = end
                break
            start = text.find("{", start + 1)
        else:
            return None
    return found


def _layout(text: str, found: list[tuple[int, int, dict]], stops: tuple[str, ...], count: int) -> CallLayout:
    (start, _, value), last_end = found[0], found[-1][1]
    if len(value) != 2:
        raise ConstraintError(f"'tool_choice': the run's template writes a call with keys {sorted(value)}, not just "
                              "a name and arguments, so a call cannot be forced")
    keys = tuple(value)
    name_key = next(k for k in keys if value[k] == _PROBE_NAMES[0])
    args_key = next(k for k in keys if k != name_key)
    rest = text[last_end:]
    cut = min((rest.find(s) for s in stops if s in rest), default=-1)
    closing = rest[:cut] if cut >= 0 else rest.rstrip()
    between = text[found[0][1]:found[1][0]] if count == 2 else None
    return CallLayout(text[:start], between, closing, keys, name_key, args_key)


def _open_object(schema) -> dict:
    """A parameter schema as the grammar takes it: an object with no properties listed takes any (a strict grammar
    would allow only {})."""
    schema = dict(schema) if isinstance(schema, dict) else {"type": "object"}
    if "properties" not in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = True
    return schema


def calls_tag(layout: CallLayout, tools: list[dict], forced: str, parallel: bool = True) -> dict | None:
    """The structural tag (xgrammar's JSON form) of the calls `forced` asks: one call or more of any tool
    ("required"; one only where not `parallel`), one of the tool named, or ("auto") free text in which each call
    the model opens (the template's opening marker, `<tool_call>`) is held to a call of a tool, None where the
    template opens calls with no marker (Llama 3.1's bare JSON: nothing tells text from a call's start)."""
    def call(tool: dict) -> dict:
        fn = tool.get("function", tool)
        props = {layout.name_key: {"const": fn["name"]}, layout.args_key: _open_object(fn.get("parameters"))}
        return json_grammar({"type": "object", "properties": {k: props[k] for k in layout.keys},
                             "required": list(layout.keys), "additionalProperties": False})

    chosen = [t for t in tools if forced in ("required", "auto") or tool_name(t) == forced]
    one = call(chosen[0]) if len(chosen) == 1 else {"type": "or", "elements": [call(t) for t in chosen]}
    if forced == "auto":
        trigger = layout.opening.strip()
        tag = {"type": "tag", "begin": layout.opening, "content": one, "end": layout.closing}
        return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": [trigger], "tags": [tag],
                                                     "stop_after_first": not parallel}} if trigger else None
    elements = [_const(layout.opening), one]
    if forced == "required" and parallel and layout.between is not None:
        elements.append({"type": "star", "content": {"type": "sequence", "elements": [_const(layout.between), one]}})
    elements.append(_const(layout.closing))
    return {"type": "structural_tag", "format": {"type": "sequence", "elements": [e for e in elements if e]}}


def json_grammar(schema: dict) -> dict:
    """A structural tag element holding JSON to `schema`, as EBNF: a json_schema element takes any whitespace, this
    one the ", " and ": " json.dumps and the templates' tojson write (with free whitespace a tiny random model wrote
    a newline after the brace and carriage returns around the name). Strict (no property the schema does not name),
    but for a bare object."""
    import xgrammar as xg

    grammar = xg.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=schema != {"type": "object"})
    return {"type": "grammar", "grammar": str(grammar)}


def thinking_first(element: dict) -> dict:
    """`element`, or a <think>...</think> block of free text, a few blanks, then `element`: what a reasoning run
    (serve --reasoning) writes, its thinking left free and only its reply held."""
    think = {"type": "tag", "begin": "<think>", "content": {"type": "any_text"}, "end": "</think>"}
    return {"type": "or", "elements": [
        {"type": "sequence", "elements": [think, {"type": "regex", "pattern": "[ \\n]{0,4}"}, element]}, element]}


def _const(text: str) -> dict | None:
    return {"type": "const_string", "value": text} if text else None


class Grammars:
    """A server's grammar compiler: the run's vocabulary read once (xgrammar's TokenizerInfo, ~0.6 s for Qwen2.5's
    151,936 tokens on a 2-core CPU), compiled grammars cached by the compiler."""

    def __init__(self, tokenizer, vocab_size: int, template=None):
        self.tokenizer, self.vocab_size, self.template = tokenizer, vocab_size, template
        self._compiler = None
        self._layout: CallLayout | None = None
        self._lock = threading.Lock()
        self._said_auto = False  # warned once that "auto" calls decode unchecked

    @classmethod
    def for_run(cls, run) -> Grammars:
        """A loaded run's grammars: its tokenizer, its embedding rows as the vocabulary, its template's call layout."""
        vocab = run.model.get_input_embeddings().num_embeddings
        return cls(run.tokenizer, vocab, getattr(run, "template", None))

    def compiler(self):
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xg
                except ImportError:
                    raise ConstraintError(f"structured output (response_format json, a forced tool_choice) needs "
                                          f"xgrammar on the server: {INSTALL}") from None
                info = xg.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                self._compiler = xg.GrammarCompiler(info, max_threads=2)
            return self._compiler

    def for_request(self, schema: dict | None, tools: list[dict] | None, forced: str | None, parallel: bool = True,
                    thinking: bool = False):
        """The compiled grammar a request's answers are held to, or None for free text. parallel: OpenAI's
        parallel_tool_calls (False: a "required" answer makes one call). thinking: the answer may open with a free
        <think> block before the shape asked (thinking_first)."""
        if schema is not None and forced is not None:
            raise ConstraintError("'response_format' and a forced 'tool_choice' ask two shapes of one answer: send "
                                  "one of them")
        if schema is not None:
            self.compiler()  # xgrammar is there
            try:
                element = json_grammar(schema)
            except (RuntimeError, ValueError, TypeError) as e:
                raise ConstraintError(f"'response_format': the JSON schema does not compile ({e})") from None
            if tools:  # tool_choice "auto": the reply is the schema's JSON, or calls of the tools
                calls = self._calls_or_none(tools, parallel)
                element = element if calls is None else {"type": "or", "elements": [element, calls]}
            return self._compile(thinking_first(element) if thinking else element, "'response_format'")
        if forced is None and tools:
            try:  # calls held to the tools where the model makes them; text stays free
                return self._calls(tools, "auto", parallel)
            except ConstraintError as e:
                return self._warn_once("tool calls decode free, unchecked", e)
        return None if forced is None else self._calls(tools or [], forced, parallel, thinking)

    def layout_or_none(self) -> CallLayout | None:
        """The run's call layout (read off its template once), or None where it has none to read."""
        if self._layout is None and self.template is not None:
            try:
                self._layout = call_layout(self.template)
            except ConstraintError:
                return None
        return self._layout

    def _calls(self, tools: list[dict], forced: str, parallel: bool, thinking: bool = False):
        element = self._calls_element(tools, forced, parallel)
        if element is None:
            return None
        return self._compile(thinking_first(element) if thinking else element, "'tools'")

    def _calls_element(self, tools: list[dict], forced: str, parallel: bool) -> dict | None:
        """calls_tag's format for this run's call layout (None: "auto" with no marker to open a call)."""
        if self.template is None:
            raise ConstraintError("'tool_choice': this run has no chat template to read its call layout from")
        self._layout = self._layout or call_layout(self.template)  # raises what the template lacks
        self.compiler()  # xgrammar is there
        try:
            tag = calls_tag(self._layout, tools, forced, parallel)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ConstraintError(f"'tools': a parameter schema does not compile ({e})") from None
        return None if tag is None else tag["format"]

    def _calls_or_none(self, tools: list[dict], parallel: bool) -> dict | None:
        """The element of one call or more ("required"'s), beside a response_format with tools on "auto"; None
        (the schema alone, warned once) where the run's template writes no call this can hold."""
        try:
            return self._calls_element(tools, "required", parallel)
        except ConstraintError as e:
            return self._warn_once("response_format with tools: the reply is held to the schema, calls left out", e)

    def _warn_once(self, what: str, e: ConstraintError) -> None:
        """None, the tools' grammar left out, said once a server."""
        if not self._said_auto:
            _log.warning("%s: %s", what, e)
            self._said_auto = True

    def _compile(self, element: dict, what: str):
        try:
            return self.compiler().compile_structural_tag(
                json.dumps({"type": "structural_tag", "format": element}, ensure_ascii=False))
        except (RuntimeError, ValueError, TypeError) as e:
            raise ConstraintError(f"{what}: the grammar does not compile ({e})") from None


class RowGrammars:
    """generate_rows' constrained rows: each one's grammar matcher, and the logits with what its grammar forbids
    next masked to -inf (out of place: the log-probs read the model's own)."""

    def __init__(self, grammars: list, stops: set[int], rows: int):
        import xgrammar as xg

        self._xg = xg
        grammars = list(grammars) + [None] * (rows - len(grammars))
        self.matchers = [xg.GrammarMatcher(g, override_stop_tokens=sorted(stops)) if g is not None else None
                         for g in grammars]
        vocab = next(g.tokenizer_info.vocab_size for g in grammars if g is not None)
        self.bitmask = xg.allocate_token_bitmask(rows, vocab)  # (B, ceil(V / 32)) int32, one bit a token

    def mask(self, logits: torch.Tensor, done: list[bool]) -> torch.Tensor:
        """(B, V) logits -> the same with each open constrained row's forbidden tokens at -inf."""
        rows = [row for row, m in enumerate(self.matchers) if m is not None and not done[row]]
        if not rows:
            return logits
        for row in rows:
            self.matchers[row].fill_next_token_bitmask(self.bitmask, row)
        masked = logits.clone()
        self._xg.apply_token_bitmask_inplace(masked, self.bitmask.to(logits.device), indices=rows)
        return masked

    def accept(self, tokens: list[int], was_open: list[bool]) -> None:
        """The step's tokens into the matchers of the rows that were open (a stop token too: it ends the grammar)."""
        for row, m in enumerate(self.matchers):
            if m is not None and was_open[row] and not m.accept_token(tokens[row]):
                raise RuntimeError(f"row {row}: token {tokens[row]} was picked outside its grammar")
