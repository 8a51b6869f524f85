"""Chat templates: built-ins, the model's own, or a Jinja string; rendering into trained / untrained segments.

Every template is Jinja source rendered in an immutable sandbox: a template can format text but cannot call
methods that change data, reach Python internals or touch files, so a chat_template from a downloaded model or
a config is data, never code.

How a response is located (the same for built-ins, model templates and custom strings): render the turns
before assistant turn i with the generation prompt (`pre`), and the turns up to and including it (`post`); the
response is post[len(pre):], and the trained part runs to the end of the last stop string in it (EOS or the
template's end-of-turn token), so trailing separators such as chatml's "\\n" stay untrained. This needs a
template that renders a conversation as an extension of its shorter prefixes; one that rewrites earlier turns
is refused with a DataError that suggests a built-in.

EOS always ends a trained response: when a template's response carries no stop string, EOS is appended to it
(and a warning says the template drops it), so a fine-tuned model learns to stop.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime

from ppalli.data.sources import RowError
from ppalli.data.tools import tool_name
from ppalli.errors import DataError
from ppalli.models.tokenizer import LLAMA3_CHAT_TEMPLATE

log = logging.getLogger("ppalli.data")

ALPACA = (
    "{{ bos_token }}"
    "{% if messages and messages[0].role == 'system' %}{{ messages[0].content }}"
    "{% else %}{{ default_system }}{% endif %}"
    "{% for m in messages if m.role != 'system' %}"
    "{% if m.role == 'user' %}{{ '\\n\\n' + instruction_header + '\\n' + m.content }}"
    "{% else %}{{ '\\n\\n' + response_header + '\\n' + m.content + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n' + response_header + '\\n' }}{% endif %}"
)

# With tools (function schemas), chatml opens with a system turn that lists them, as JSON a line inside <tools>,
# and says how to call one; an assistant's calls are JSON objects inside <tool_call> tags, a tool's result a
# "tool" turn inside <tool_response> tags (the Hermes convention Qwen2.5 and Qwen3 were trained on).
CHATML = (
    "{% if tools %}{{ '<|im_start|>system\\n' }}"
    "{% if messages and messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou can call these functions; their signatures are inside <tools></tools>:\\n<tools>' }}"
    "{% for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nTo call one, answer with a JSON object with the keys name and arguments inside '"
    " + '<tool_call></tool_call> tags.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if tools and loop.first and m.role == 'system' %}"
    "{% elif m.tool_calls %}{{ '<|im_start|>assistant\\n' + (m.content + '\\n' if m.content else '') }}"
    "{% for c in m.tool_calls %}{{ '<tool_call>\\n' + ({'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson) + '\\n</tool_call>' + ('\\n' if not loop.last else '') }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% elif m.role == 'tool' %}{{ '<|im_start|>tool\\n<tool_response>\\n' + m.content"
    " + '\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma has no system role: a system message is put in front of the next user turn, as Google's template does.
GEMMA = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{% set ns.system = m.content + '\\n\\n' %}"
    "{% elif m.role == 'user' %}{{ '<start_of_turn>user\\n' + ns.system + m.content + '<end_of_turn>\\n' }}"
    "{% set ns.system = '' %}"
    "{% else %}{{ '<start_of_turn>model\\n' + m.content + '<end_of_turn>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# EXAONE 3.x: an (empty) system block always comes first; user turns end with a newline, others [|endofturn|].
EXAONE = (
    "{% for m in messages %}"
    "{% if loop.first and m.role != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + m.role + '|]' + m.content }}"
    "{% if m.role == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

ALPACA_EN = {
    "default_system": "Below is an instruction that describes a task. "
                      "Write a response that appropriately completes the request.",
    "instruction_header": "### Instruction:",
    "response_header": "### Response:",
}
# KoAlpaca-style headers; the preamble is the natural Korean of the Alpaca one.
ALPACA_KO = {
    "default_system": "아래는 작업을 설명하는 지시문입니다. 요청을 적절히 완료하는 응답을 작성하세요.",
    "instruction_header": "### 질문:",
    "response_header": "### 답변:",
}

# name -> (source, extra variables, the end-of-turn token the template closes responses with, or None for EOS)
BUILTIN: dict[str, tuple[str, dict[str, str], str | None]] = {
    "alpaca_en": (ALPACA, ALPACA_EN, None),
    "alpaca_ko": (ALPACA, ALPACA_KO, None),
    "chatml": (CHATML, {}, "<|im_end|>"),
    "llama3": (LLAMA3_CHAT_TEMPLATE, {}, "<|eot_id|>"),
    "gemma": (GEMMA, {}, "<end_of_turn>"),
    "exaone": (EXAONE, {}, "[|endofturn|]"),
}

# End-of-turn tokens of common families; each one the tokenizer has as a single token also ends a response.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "[|endofturn|]", "<|end|>",
               "<|endoftext|>", "</s>")

_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


class _TemplateRaised(Exception):
    """raise_exception() called from inside a template (model templates use it to reject conversations)."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


@functools.lru_cache(maxsize=32)
def _compile(source: str):
    """Compile once per process (Template objects hold only strings, so they pickle to worker processes)."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # trim_blocks / lstrip_blocks and loopcontrols: the settings HF renders chat templates with, so a model's
    # own template gives the same text here as in transformers.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise DataError(f"data.template: not valid Jinja (line {e.lineno}: {e.message}); fix it or use a built-in: "
                        f"{', '.join(BUILTIN)}") from None


@dataclass(frozen=True)
class Template:
    name: str
    source: str
    eos: str
    stops: tuple[str, ...]  # strings that end a trained response: EOS and end-of-turn tokens of the vocabulary
    variables: tuple[tuple[str, str], ...] = field(default=())
    appends_eos: bool = False  # the template's responses carry no stop string: EOS is appended

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        """tools: function schemas, passed as chat templates take them (`tools`, as transformers' apply_chat_template
        passes them); left undefined without."""
        extra = {"tools": tools} if tools else {}
        return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **dict(self.variables), **extra)


def resolve_template(spec: str, tokenizer) -> Template:  # noqa: ANN001 - any HF tokenizer
    """The template data.template names: auto, a built-in name, or a Jinja string."""
    eos = tokenizer.eos_token
    if not eos:
        raise DataError(f"tokenizer {tokenizer.name_or_path}: has no eos token, so responses cannot end; "
                        "add one to the tokenizer before training")
    specials = {k: getattr(tokenizer, k) or "" for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    name, source, extra, turn_end = _choose(spec, tokenizer)
    stops = (eos,) + tuple(t for t in END_OF_TURN if t != eos and _is_token(tokenizer, t))
    if turn_end is not None and turn_end not in stops:
        log.warning("template %s: %s is not a token of this tokenizer, so it is learned as plain text and "
                    "generation cannot stop on it; EOS is appended after every response", name, turn_end)
    tpl = Template(name, source, eos, stops, tuple({**specials, **extra}.items()))
    _compile(source)
    appends = _probe_appends_eos(tpl)
    if appends:
        log.warning("template %s ends responses without EOS or an end-of-turn token; ppalli appends %s to every "
                    "trained response so the model learns to stop", name, eos)
    return Template(name, source, eos, stops, tpl.variables, appends)


def _choose(spec: str, tokenizer) -> tuple[str, str, dict, str | None]:  # noqa: ANN001
    if spec == "auto":
        own = tokenizer.chat_template
        if isinstance(own, dict):  # named templates: the default one is the chat format
            own = own.get("default")
        if isinstance(own, str) and own.strip():
            return "model", own, {}, None
        log.info("template: the tokenizer has no chat template; using alpaca_en")
        spec = "alpaca_en"
    if spec in BUILTIN:
        source, extra, turn_end = BUILTIN[spec]
        return spec, source, extra, turn_end
    if "{{" in spec or "{%" in spec:
        return "custom", spec, {}, None
    raise DataError(f"data.template: unknown template '{spec}'; use auto, {', '.join(BUILTIN)}, or a Jinja string")


def _is_token(tokenizer, token: str) -> bool:  # noqa: ANN001
    """An added (special) token: a vocabulary may also hold the same characters as ordinary text ("</s>" in
    Qwen's), which a model emits inside prose and must not stop on."""
    return token in tokenizer.get_added_vocab() or token in tokenizer.all_special_tokens


def _probe_appends_eos(tpl: Template) -> bool:
    """Render a two-turn probe: checks the template works incrementally and whether it drops EOS."""
    pre, post = render_pair(tpl, _PROBE, 1, "data.template")
    return _answer_end(post, len(pre), tpl.stops) is None


def _render(tpl: Template, messages: list[dict], where: str, add_generation_prompt: bool = False,
            tools: list[dict] | None = None) -> str:
    try:
        return tpl.render(messages, add_generation_prompt, tools)
    except _TemplateRaised as e:
        raise RowError(f"{where}: template {tpl.name} refused the conversation ({e}); fix the row or pick "
                       "another data.template") from None
    except Exception as e:  # noqa: BLE001 - a template is user data: whatever fails inside it is its error
        raise RowError(f"{where}: template {tpl.name} failed ({type(e).__name__}: {e}); fix the template or pick "
                       f"a built-in one: {', '.join(BUILTIN)}") from None


def render_pair(tpl: Template, messages: list[dict], i: int, where: str,
                tools: list[dict] | None = None) -> tuple[str, str]:
    """(the conversation before turn i with the generation prompt, the same through turn i): turn i's text is what
    the second adds; RowError where the template does not render it as an extension of the first."""
    pre = _render(tpl, messages[:i], where, add_generation_prompt=True, tools=tools)
    post = _render(tpl, messages[: i + 1], where, tools=tools)
    if not post.startswith(pre):
        raise RowError(f"{where}: template {tpl.name} does not render turn {i + 1} as an extension of the turns "
                       f"before it, so the response cannot be located; use a built-in data.template "
                       f"({', '.join(BUILTIN)})")
    return pre, post


def _answer_end(text: str, start: int, stops: tuple[str, ...]) -> int | None:
    """End of the last stop string in text[start:], or None when the response has none."""
    ends = [text.rfind(s, start) + len(s) for s in stops if text.rfind(s, start) >= 0]
    return max(ends) if ends else None


def render_segments(tpl: Template, messages: list[dict], train: str, where: str,
                    tools: list[dict] | None = None) -> list[tuple[str, bool]]:
    """The conversation as (text, trained) segments whose concatenation is the text to tokenize.

    train: 'responses' (every assistant turn, tool calls included), 'last' (only the final assistant turn:
    preference answers) or 'all' (every character, responses still closed by a stop string). tools: the row's
    function schemas; a template that leaves them, a tool's result or a call out of the text is refused
    (`_check_tools`): the model would learn calls it was never shown how to make.
    """
    messages = _with_thinking(tpl, messages)
    full = _render(tpl, messages, where, tools=tools)
    targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train == "last":
        targets = targets[-1:]
    segments, cursor = [], 0
    for i in targets:
        pre, post = render_pair(tpl, messages, i, where, tools)
        if not full.startswith(pre) or len(pre) < cursor:
            raise RowError(f"{where}: template {tpl.name} renders the whole conversation differently from its "
                           f"turns, so responses cannot be located; use a built-in data.template "
                           f"({', '.join(BUILTIN)})")
        segments.append((full[cursor:len(pre)], False))
        if full.startswith(post):
            end = _answer_end(post, len(pre), tpl.stops)
            response = post[len(pre):] + tpl.eos if end is None else post[len(pre):end]
            end = len(post) if end is None else end
        else:  # the turn reads otherwise once later turns follow it: the whole conversation's text is the truth
            response, end = _rewritten_response(tpl, full, len(pre), messages[i], i, where)
        _check_tools(tpl, response, [c["function"]["name"] for c in messages[i].get("tool_calls", ())],
                     f"turn {i + 1}'s tool call", where)
        segments.append((response, True))
        cursor = end
    segments.append((full[cursor:], False))
    _check_tools(tpl, full, [tool_name(t) for t in tools or ()], "the tools' schemas", where)
    _check_tools(tpl, full, [m["content"] for m in messages if m["role"] == "tool"], "a tool's result", where)
    if train == "all":
        segments = [(text, True) for text, _ in segments]
    return [s for s in segments if s[0]]


def _with_thinking(tpl: Template, messages: list[dict]) -> list[dict]:
    """Messages whose answers carry their reasoning apart ("reasoning_content"), for a template that does not read
    that field (Qwen3's does): the reasoning goes in front of the answer as a <think> block, as reasoning models
    write it, so it is trained rather than dropped."""
    if "reasoning_content" in tpl.source or not any("reasoning_content" in m for m in messages):
        return messages
    return [m if "reasoning_content" not in m else
            {**{k: v for k, v in m.items() if k != "reasoning_content"},
             "content": f"<think>\n{m['reasoning_content'].strip()}\n</think>\n\n{m['content']}"} for m in messages]


def _rewritten_response(tpl: Template, full: str, start: int, turn: dict, i: int, where: str) -> tuple[str, int]:
    """(response, its end in `full`) of assistant turn i where the template writes the turn one way as the last and
    another once later turns follow: Qwen3's drops an earlier answer's thinking (`<think>` block) from the history.
    What the model is trained on is what the whole conversation shows, from the generation prompt to the first stop
    string after it; the turn's text after any thinking must be inside it."""
    ends = [full.find(stop, start) + len(stop) for stop in tpl.stops if full.find(stop, start) >= 0]
    end = min(ends) if ends else None
    answer = turn["content"].split("</think>")[-1].strip()
    if end is None or answer not in full[start:end]:
        raise RowError(f"{where}: template {tpl.name} writes assistant turn {i + 1} differently once later turns "
                       "follow, and its answer cannot be found in the whole conversation's text; use a built-in "
                       f"data.template ({', '.join(BUILTIN)})")
    return full[start:end], end


def _check_tools(tpl: Template, text: str, needles: list[str], what: str, where: str) -> None:
    """RowError when one of `needles` (a call's or a tool's name, a tool's result) is not in the rendered text, as it
    is or as a JSON string (Llama 3.1's template writes a tool's result through tojson: quotes escaped)."""
    missing = next((n for n in needles if n not in text and json.dumps(n, ensure_ascii=False) not in text), None)
    if missing is not None:
        raise RowError(f"{where}: template {tpl.name} leaves {what} out of the text ('{missing[:40]}'), so this "
                       "row cannot teach tool use; use data.template=auto with a model whose chat template takes "
                       "tools (Qwen2.5 / Qwen3, Llama 3.1 and later, ...) or data.template=chatml")


def text_segments(tpl: Template, text: str) -> list[tuple[str, bool]]:
    """Raw text (continued pretraining): BOS, then the text and EOS, all trained; no chat template."""
    bos = dict(tpl.variables).get("bos_token", "")
    return [s for s in ((bos, False), (text + tpl.eos, True)) if s[0]]


def render_prompt(tpl: Template, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The text a model continues to answer `messages` (generation prompt on), as training rendered it; with
    `tools`, RowError when the template leaves their schemas out."""
    text = _render(tpl, messages, "prompt", add_generation_prompt=True, tools=tools)
    _check_tools(tpl, text, [tool_name(t) for t in tools or ()], "the tools' schemas", "prompt")
    return text


def standalone_source(tpl: Template, system_prompt: str | None = None) -> str:
    """The template as a chat_template that renders alone, as transformers, llama.cpp and Ollama render one: its
    variables (Alpaca's headers and preamble, the special tokens) set at the top, since those renderers pass only
    messages, add_generation_prompt and the tokenizer's special tokens; with the run's data.system_prompt put in
    front of a conversation that has no system turn, as training rendered every row (tokenize.with_system)."""
    sets = [f"{{% set {name} = {json.dumps(value, ensure_ascii=False)} %}}" for name, value in tpl.variables]
    if system_prompt:
        system = json.dumps({"role": "system", "content": system_prompt}, ensure_ascii=False)
        sets.append(f"{{% if not messages or messages[0].role != 'system' %}}"
                    f"{{% set messages = [{system}] + messages %}}{{% endif %}}")
    return "".join(sets) + tpl.source


def stop_token_ids(tpl: Template, tokenizer) -> list[int]:  # noqa: ANN001 - any HF tokenizer
    """Token ids of the template's stop strings (EOS and end-of-turn tokens): generation ends on any."""
    ids = [tokenizer.convert_tokens_to_ids(s) for s in tpl.stops]
    return [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id]


_ROLE_LINES = {"system", "user", "assistant", "human", "gpt", "model"}


def display_prompt(text: str) -> str:
    """The rendered prompt without the role-name lines chat templates leave once special tokens are dropped."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip().lower() not in _ROLE_LINES]
    return "\n".join(lines).strip()


def prompt_text(tokenizer, ids: list[int]) -> str:
    """Prompt ids as a reader wants them: each run of ordinary tokens decoded on a line of its own, role lines
    dropped. Special tokens split the runs, so Llama 3's `assistant` header, which follows the question with only
    special tokens between, does not stick to it ("SD카드 안돼assistant")."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    runs: list[list[int]] = [[]]
    for i in ids:
        if i in special:
            runs.append([])
        else:
            runs[-1].append(i)
    return display_prompt("\n".join(tokenizer.decode(r) for r in runs if r))
