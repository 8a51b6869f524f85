"""Talking to a fine-tuned model: an interactive chat (`ppalli chat`) and a prompt file (`ppalli generate`).

The prompt text comes from the caller's `render_prompt(messages) -> str` (the run's template), so chat
renders turns exactly as training did. With tools (`ppalli chat RUN --tools FILE`, a run trained on tool use) the
schemas go into every prompt; an answer that calls them is shown as its calls, and the next lines typed are their
results, one a call, after which the model answers again.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ppalli.data.tools import ToolError, calls_in_answer, tool_name, tool_schemas
from ppalli.errors import DataError
from ppalli.infer.generate import Sampling, generate, generate_rows, step_compiles

Messages = list[dict]
RenderPrompt = Callable[[Messages], str]

HELP = "Type a message. /reset clears the history, /exit quits."


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _context_budget(model, max_new_tokens: int) -> int | None:
    """Prompt tokens that leave room for the answer inside the model's positions; None when unknown."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return None if limit is None else max(limit - max_new_tokens, 1)


def fit_history(tokenizer, render_prompt: RenderPrompt, messages: Messages, budget: int | None,
                add_special_tokens: bool = False) -> tuple[list[int], int]:
    """Prompt ids for `messages`, dropping the oldest turns (in place) until they fit `budget` tokens.

    Returns (ids, turns dropped). A single message longer than the budget keeps its last tokens.
    """
    dropped = 0
    while True:
        ids = _encode(tokenizer, render_prompt(messages), add_special_tokens)
        if budget is None or len(ids) <= budget:
            return ids, dropped
        if len(messages) <= 1:
            return ids[-budget:], dropped
        del messages[:2 if len(messages) > 2 else 1]  # a user turn and its answer go together
        dropped += 1


def _answer(model, tokenizer, render_prompt: RenderPrompt, messages: Messages, print_fn: Callable,
            gen_kwargs: dict, add_special_tokens: bool) -> str:
    budget = _context_budget(model, gen_kwargs["max_new_tokens"])
    ids, dropped = fit_history(tokenizer, render_prompt, messages, budget, add_special_tokens)
    if dropped:
        print_fn(f"(dropped the {dropped} oldest turn(s) to fit the model's {budget}-token context)")
    new = generate(model, tokenizer, torch.tensor([ids]),
                   on_token=lambda text: print_fn(text, end="", flush=True), **gen_kwargs)
    print_fn("")
    return tokenizer.decode(new, skip_special_tokens=True)


def chat_loop(model, tokenizer, render_prompt: RenderPrompt, *, temperature: float = 0.7, top_p: float = 0.9,
              max_new_tokens: int = 256, greedy: bool = False, stop_ids: Iterable[int] | None = None,
              add_special_tokens: bool = False, input_fn: Callable[[str], str] = input,
              print_fn: Callable[..., None] = print, compile: bool = False,
              tools: list[dict] | None = None, grammar=None) -> Messages:
    """Read messages, stream answers, keep the history; returns it when the user leaves.

    `add_special_tokens` must match how training tokenized rendered text (BOS or not). compile: as generate's.
    tools: function schemas for every prompt (render_prompt must take `tools=`); the calls an answer makes wait for
    their results, typed one a line. grammar: every answer decoded under it (infer/structured.py: with tools, the
    calls the model opens held to their schemas).
    """
    gen_kwargs = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, greedy=greedy,
                      stop_ids=stop_ids, compile=compile, grammar=grammar)
    render = (lambda m: render_prompt(m, tools=tools)) if tools else render_prompt
    names = {tool_name(t) for t in tools or ()}
    messages: Messages = []
    pending: list[dict] = []  # the calls of the last answer still waiting for a result
    print_fn(HELP)
    while True:
        try:
            line = input_fn(f"{pending[0]['function']['name']} result> " if pending else ">>> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C leave like /exit
            print_fn("")
            return messages
        if line == "/exit":
            return messages
        if line == "/reset":
            messages.clear()
            pending.clear()
            print_fn("(history cleared)")
        elif line.startswith("/"):
            print_fn(f"unknown command {line.split()[0]}. {HELP}")
        elif line:
            if pending:
                call = pending.pop(0)
                messages.append({"role": "tool", "content": line, **({"tool_call_id": call["id"]} if "id" in call
                                                                     else {})})
                if pending:
                    continue
            else:
                messages.append({"role": "user", "content": line})
            reply = _answer(model, tokenizer, render, messages, print_fn, gen_kwargs, add_special_tokens)
            content, calls = calls_in_answer(reply, names) if tools else (reply, [])
            if not calls:
                messages.append({"role": "assistant", "content": reply})
                continue
            messages.append({"role": "assistant", "content": content or "", "tool_calls": calls})
            pending = list(calls)
            for call in calls:
                fn = call["function"]
                print_fn(f"(calls {fn['name']}({json.dumps(fn['arguments'], ensure_ascii=False)}))")
            print_fn("(type each call's result, one a line)")


def read_tools(path: str | Path) -> list[dict]:
    """Function schemas from a JSON file: a list of them (OpenAI's {"type": "function", "function": {...}} or bare)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"tools file not found: {p} (give a JSON file with a list of function schemas)")
    try:
        tools = tool_schemas(p.read_text(encoding="utf-8"), str(p))
    except ToolError as e:
        raise DataError(str(e)) from None
    if not tools:
        raise DataError(f"{p}: no function schemas (give a JSON list of them)")
    return tools


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (UTF-8, blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file not found: {p} (give a text file with one prompt per line)")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{p}: no prompts (one prompt per line)")
    return prompts


def generate_batch(model, tokenizer, render_prompt: RenderPrompt, prompts: Iterable[str], out_path: str | Path, *,
                   temperature: float = 0.7, top_p: float = 0.9, max_new_tokens: int = 256, greedy: bool = False,
                   stop_ids: Iterable[int] | None = None, seed: int | None = None,
                   add_special_tokens: bool = False, compile: bool = False, rows: int = 16,
                   grammar=None) -> Path:
    """Answer each prompt; write JSONL rows {prompt, output, new_tokens, seconds} as they finish ('-': stdout).
    With a grammar (infer/structured.py: a JSON schema's), every answer is decoded under it and its row also holds
    the parsed value as "json" (null where max_new_tokens cut it short).

    Prompts are decoded `rows` at a time (generate_rows: left-padded rows, each the answer it gets alone up to the
    float noise of batched kernels; 16 rows of Llama-3.1-8B from the CUDA graph 1,397 new tokens/s against 117 for
    one, greedy, H200, results/2026-12-04-h200-s21-generate-compile-8b.json); a row's seconds are its batch's.
    With a seed, prompt i samples with seed + i from its own generator, so any one answer can be reproduced alone
    (`generate(..., seed=seed + i)`). compile: as generate's (the first batch's seconds then hold the compile).
    """
    to_stdout = str(out_path) == "-"
    out = Path(out_path)
    if not to_stdout:
        out.parent.mkdir(parents=True, exist_ok=True)
    budget = _context_budget(model, max_new_tokens)
    prompts = list(prompts)
    sampling = Sampling(temperature=temperature, top_p=top_p, greedy=greedy)
    fill = rows if step_compiles(model, compile=compile) else 0  # a short last batch reuses the compiled step
    with (contextlib.nullcontext(sys.stdout) if to_stdout else out.open("w", encoding="utf-8")) as f:
        for first in range(0, len(prompts), max(rows, 1)):
            chunk = prompts[first:first + max(rows, 1)]
            ids = [fit_history(tokenizer, render_prompt, [{"role": "user", "content": p}], budget,
                               add_special_tokens)[0] for p in chunk]
            seeds = None if seed is None else [seed + first + i for i in range(len(chunk))]
            start = time.perf_counter()
            news = generate_rows(model, tokenizer, ids, max_new_tokens=max_new_tokens, sampling=sampling, seeds=seeds,
                                 stop_ids=stop_ids, compile=compile, fill_rows=fill,
                                 grammars=None if grammar is None else [grammar] * len(chunk))
            seconds = round(time.perf_counter() - start, 3)
            for prompt, new in zip(chunk, news):
                row = {"prompt": prompt, "output": tokenizer.decode(new, skip_special_tokens=True),
                       "new_tokens": len(new), "seconds": seconds}
                if grammar is not None:
                    row["json"] = _parsed(row["output"])
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()  # a long batch that is stopped keeps the answers it has
    return out


def _parsed(text: str):
    """An answer decoded under a JSON grammar, parsed; None where it was cut short."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
