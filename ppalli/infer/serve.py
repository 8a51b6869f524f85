"""`ppalli serve RUN`: a trained run behind an OpenAI-compatible HTTP API, so the clients and tools that speak it
(the openai package, LangChain, curl) use the fine-tuned model as it is.

    POST /v1/chat/completions   {"messages": [...], "max_tokens", "temperature", "top_p", "seed", "stream", "n",
                                 "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                                 "top_logprobs", "tools", "tool_choice", "response_format", and vLLM's "top_k",
                                 "min_p", "repetition_penalty"}
    POST /v1/completions        {"prompt": a string, token ids, or a list of either, the same fields, "logprobs": 0-20
                                 alternatives, "echo"}: text continued as the tokenizer takes it (no template;
                                 OpenAI's defaults: 16 tokens, temperature 1)
    GET  /v1/models             the run, as the one model served
    GET  /health                {"status": "ok"}
    GET  /tokenizer_info, POST /tokenize {"prompt" | "messages", "add_special_tokens"}, POST /detokenize {"tokens"}:
                                 vLLM's tokenizer routes, with which lm-evaluation-harness tokenizes on the server
                                 (no tokenizer folder on its side)

With --api-key KEY, every route but /health answers only requests that send "Authorization: Bearer KEY".

Messages are rendered by the run's own template (the one training used) and answers end at its stop tokens, as in
`ppalli chat`; decoding is `generate` (merged 16-bit weights, the CUDA-graph step where exact). Unset, temperature
and top_p are ppalli chat's 0.7 and 0.9; temperature 0 decodes greedily. With "stream": true
the answer comes as server-sent events of chat.completion.chunk objects, text as it is decoded, then
`data: [DONE]` (before it, with stream_options {"include_usage": true}, a chunk with the usage and no choices).
Concurrent requests are decoded together (infer/batcher.py: each row with its own sampling, seed,
limit and stream, each answer back as its row ends); n > 1 asks for several answers at once (rows of the batch, seeds
seed, seed + 1, ... when a seed is given); stop strings (up to 16) end an answer before them, held back from a stream
until they are ruled out. Built on the standard library's http.server: nothing to install.

Log-probabilities (infer/logprobs.py) are the model's own distribution, before sampling's penalties, temperature and
top-p, as vLLM gives them by default; `echo` with `logprobs` (and max_tokens 0) scores a prompt's own tokens, what
lm-evaluation-harness' local-completions asks to score a continuation (streamed, the prompt and its log-probs come as
each choice's first chunk). A stream's chunks carry
the log-probs of the tokens whose text they complete; its last chunk those of the tokens left (a stop token that
ended a text completion, a token cut by a stop string), so a stream's log-probs add up to the whole answer's.

With --reasoning (a run trained on answers that open with a <think> block: Qwen3's template, reasoning_content data),
a chat answer's thinking comes back as the message's reasoning_content and the rest as its content, streamed as
reasoning_content deltas, then content ones (infer/thinking.py), as vLLM's reasoning parsers give them; a
response_format or a forced call holds the reply after the thinking, which stays free.

Tools (function calling, for a run trained on tool-use data): the request's tools go into the prompt through the run's
template (a template that leaves them out is a 400), and its messages may hold assistant turns with tool_calls and
"tool" turns with results. The calls a model writes (`<tool_call>{json}</tool_call>` blocks, as Qwen2.5 / Qwen3 and
the chatml built-in have them, or one JSON object, as Llama 3.1 answers) come back as the message's tool_calls, each
naming one of the request's tools, with finish_reason "tool_calls". Streamed, where a grammar holds the calls (below),
the content goes out as it decodes and each call as OpenAI's API streams one: its id and name, then its arguments
piece by piece (infer/call_stream.py); without one, the answer comes whole once decoded, in those chunks, since its
text may turn out to be a call. max_tokens cutting a call's arguments gives the call as far as it got, finish_reason
"length", whole or streamed alike. tool_choice "auto" (the default: a call the model opens is held to the tools'
schemas), "none" (the tools left out of the prompt), "required" (one call or more; one with parallel_tool_calls false)
or a named function (one call of it): a forced call is decoded under a grammar, in the layout the run's template
writes calls in, its arguments held to the tool's parameters (infer/structured.py, with xgrammar). response_format
json_object / json_schema holds an answer to JSON / to the schema the same way; beside tools on "auto", to that JSON
or calls.

A bad request gets a 400 whose message names the field and what it takes; fields of the API that change nothing
here (user, ...) are accepted and ignored, those that would (functions, suffix) are refused rather than silently
dropped. logit_bias is added to the logits before greedy decoding or sampling (not to the log-probs reported, the
model's own).
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ppalli.data.tools import ToolError, tool_calls
from ppalli.errors import DataError
from ppalli.infer.batcher import Batcher, Job
from ppalli.infer.call_stream import CallParts, CallStream, with_calls
from ppalli.infer.logprobs import MOST_TOP, TokenPieces, chat_logprobs, covering, text_logprobs
from ppalli.infer.structured import ConstraintError, Grammars, response_format, tools_and_choice
from ppalli.infer.thinking import StreamSplit, split_thinking

REFUSED = {"functions": "the legacy functions field is not served: send them as tools"}
TEXT_REFUSED = {"suffix": "suffix (insertion) is not served",
                "best_of": "best_of is not served: ask for n answers"}  # text completions' own fields
ALLOWED = {"best_of": (1,)}  # the no-op values a refused field may say
MOST_BIASES = 300  # logit_bias entries, as OpenAI's API takes
# n, a text completion's prompts, and stop strings a request may ask for. OpenAI's API takes 4 stop strings; more are
# taken here, as vLLM does: lm-evaluation-harness' local-completions sends a task's whole `until` list.
MOST_CHOICES, MOST_PROMPTS, MOST_STOPS = 16, 64, 16
MOST_BODY_BYTES = 16 << 20  # a request's JSON: 16 MiB holds any prompt a model's positions can take
TEXT_MAX_TOKENS = 16  # OpenAI's text completions' default max_tokens, where a request sets none
ROLES = ("system", "user", "assistant", "tool")
_log = logging.getLogger("ppalli.serve")
ROUTES = ("/v1/chat/completions", "/v1/completions")
TOKENIZER_ROUTES = ("/tokenize", "/detokenize")


class BadRequest(ValueError):
    """A request the API cannot take; the message goes back to the client as a 400."""


def parse_request(body: bytes, max_new_tokens: int, chat: bool = True) -> dict:
    """A chat completion request's JSON (or, chat False, a text completion's) -> {prompts (chat: one list of
    messages; text: the prompt strings or token-id lists), max_new_tokens, max_asked, temperature, top_p, greedy,
    seed, stream, n, stop, presence_penalty, frequency_penalty, logprobs (alternatives a token, None: not asked),
    echo, tools (chat: the function schemas the prompt offers, or None), tool_choice (the call forced: None,
    "required" or a tool's name), schema (the JSON schema of response_format, or None)}."""
    try:
        req = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON ({e})") from None
    if not isinstance(req, dict):
        raise BadRequest(f"the body must be a JSON object with {'a messages list' if chat else 'a prompt'}")
    for key, why in (REFUSED if chat else {**REFUSED, **TEXT_REFUSED}).items():
        value = req.get(key)
        if value not in (None, [], "", {}) and value not in ALLOWED.get(key, ()):
            raise BadRequest(f"'{key}': {why}")
    logprobs, echo = _logprobs(req, chat), bool(req.get("echo", False)) and not chat
    wanted = req.get("max_completion_tokens", req.get("max_tokens"))
    limit = (max_new_tokens if chat else TEXT_MAX_TOKENS) if wanted is None else \
        _number(wanted, "max_tokens", int, 0 if echo else 1, None)  # 0 with echo: the prompt scored, no answer
    temperature = _number(req.get("temperature", 0.7 if chat else 1.0), "temperature", float, 0.0, 2.0)
    try:
        tools, forced = tools_and_choice(req) if chat else (None, None)
        schema = response_format(req.get("response_format"))
    except ConstraintError as e:
        raise BadRequest(str(e)) from None
    return {"prompts": [_messages(req)] if chat else _prompts(req),
            "max_new_tokens": min(limit, max_new_tokens), "max_asked": wanted is not None, "temperature": temperature,
            "top_p": _number(req.get("top_p", 0.9 if chat else 1.0), "top_p", float, 0.0, 1.0),
            # vLLM's extra sampling fields (what its clients send beside OpenAI's): -1 or 0 is no top-k
            "top_k": max(_number(req.get("top_k", 0), "top_k", int, -1, None), 0),
            "min_p": _number(req.get("min_p", 0.0), "min_p", float, 0.0, 1.0),
            "repetition_penalty": _number(req.get("repetition_penalty", 1.0), "repetition_penalty", float, 0.01, 10.0),
            "greedy": temperature == 0.0,
            "seed": None if req.get("seed") is None else _number(req["seed"], "seed", int, 0, None),
            "stream": bool(req.get("stream", False)), "n": _number(req.get("n", 1), "n", int, 1, MOST_CHOICES),
            "stop": _stops(req.get("stop")),
            **{k: _number(req.get(k, 0.0), k, float, -2.0, 2.0) for k in ("presence_penalty", "frequency_penalty")},
            "logprobs": logprobs, "echo": echo, "tools": tools, "tool_choice": forced, "schema": schema,
            "parallel": req.get("parallel_tool_calls") is not False,
            "usage": isinstance(req.get("stream_options"), dict) and req["stream_options"].get("include_usage") is True,
            "logit_bias": _logit_bias(req.get("logit_bias"))}


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias, {token id (a JSON key, so text): bias in [-100, 100]}, as sorted (token, bias) pairs
    (the server checks the ids against the vocabulary). -100 bans a token, 100 all but forces it."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MOST_BIASES or not all(
            str(k).isdigit() and not isinstance(v, bool) and isinstance(v, int | float) and -100 <= v <= 100
            for k, v in value.items()):
        raise BadRequest(f"'logit_bias' must map up to {MOST_BIASES} token ids to numbers in [-100, 100], "
                         f"e.g. {{\"1234\": -100}}")
    return tuple(sorted((int(k), float(v)) for k, v in value.items()))


def _logprobs(req: dict, chat: bool) -> int | None:
    """How many alternatives each token's log-prob comes with, or None where none are asked: chat's "logprobs"
    (true/false) with "top_logprobs" (0-20); a text completion's "logprobs" (0-20)."""
    value, top = req.get("logprobs"), req.get("top_logprobs")
    if not chat:
        return None if value is None else _number(value, "logprobs", int, 0, MOST_TOP)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"'logprobs' must be true or false, got {value!r} (top_logprobs says how many alternatives)")
    if top is not None and not value:
        raise BadRequest("'top_logprobs' needs 'logprobs': true")
    return (0 if top is None else _number(top, "top_logprobs", int, 0, MOST_TOP)) if value else None


def _messages(req: dict) -> list[dict]:
    """The request's messages as the templates take them: {"role", "content"}, an assistant's tool_calls (arguments
    parsed from their JSON text) and a tool result's tool_call_id / name kept."""
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(m, i: int) -> dict:
    calls = m.get("tool_calls") if isinstance(m, dict) and m.get("role") == "assistant" else None
    content = m.get("content") if isinstance(m, dict) else None
    if not isinstance(m, dict) or m.get("role") not in ROLES or not (
            isinstance(content, str) or (calls and content is None)):
        raise BadRequest(f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}} "
                         "(an assistant's content may be null beside its tool_calls)")
    if calls:
        try:
            return {"role": "assistant", "content": content or "", "tool_calls": tool_calls(calls, f"messages[{i}]")}
        except ToolError as e:
            raise BadRequest(str(e)) from None
    extra = {k: m[k] for k in ("tool_call_id", "name") if m["role"] == "tool" and isinstance(m.get(k), str)}
    return {"role": m["role"], "content": content, **extra}


def _prompts(req: dict) -> list[str | list[int]]:
    """A text completion's prompt: a string or a list of token ids, or a list of up to MOST_PROMPTS of either."""
    value = req.get("prompt")
    one = isinstance(value, str) or (isinstance(value, list) and value and all(_is_id(t) for t in value))
    prompts = [value] if one else value
    if not isinstance(prompts, list) or not 0 < len(prompts) <= MOST_PROMPTS or not all(
            (isinstance(p, str) or (isinstance(p, list) and all(_is_id(t) for t in p))) and p for p in prompts):
        raise BadRequest(f"'prompt' must be a non-empty string or list of token ids, or a list of up to "
                         f"{MOST_PROMPTS} of them")
    return prompts


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stops(value) -> list[str]:
    """The request's stop strings: null, one string, or a list of up to MOST_STOPS non-empty strings."""
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MOST_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest(f"'stop' must be a non-empty string or a list of up to {MOST_STOPS} of them, got {value!r}")
    return stops


def _number(value, name: str, kind, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BadRequest(f"'{name}' must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise BadRequest(f"'{name}' must be {'>= ' + str(low) if high is None else f'in [{low}, {high}]'}, "
                         f"got {value!r}")
    return kind(value)


class ChatServer(ThreadingHTTPServer):
    """The HTTP server holding the loaded run; its Batcher decodes the requests' answers, several at a time."""

    daemon_threads = True

    def __init__(self, address, run, name: str, max_new_tokens: int = 512, compile: bool = False,
                 batch_size: int = 8, api_key: str | None = None, reasoning: bool = False):
        super().__init__(address, _Handler)
        self.run, self.name, self.max_new_tokens, self.api_key = run, name, max_new_tokens, api_key
        self.reasoning = reasoning  # a chat answer's <think> block as reasoning_content (infer/thinking.py)
        self.batcher = Batcher(run, batch_size, compile)
        self.context = getattr(run.model.config, "max_position_embeddings", None)
        self.vocab = run.model.get_input_embeddings().num_embeddings
        self.pieces = TokenPieces(run.tokenizer)  # token id -> (text, bytes), for log-probs
        self.grammars = Grammars.for_run(run)  # infer/structured.py

    def tokenizer_info(self) -> dict:
        """GET /tokenizer_info as vLLM answers it: the special tokens, the chat template, the model's positions."""
        tok = self.run.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": self.context}

    def server_close(self) -> None:
        super().server_close()
        self.batcher.close()

    def prompt_ids(self, req: dict, prompt, chat: bool) -> tuple[list[int], int]:
        """(ids, the most new tokens) of one prompt: a chat's messages rendered by the run's template, a text
        completion's string as the tokenizer takes it (BOS and all), or its token ids as they are. An answer fits
        the model's positions: a request that set max_tokens past them is refused (as OpenAI's API does), one that
        did not gets what room is left."""
        biased = next((t for t, _ in req["logit_bias"] if t >= self.vocab), None)
        if biased is not None:
            raise BadRequest(f"'logit_bias': token id {biased} is outside the model's vocabulary "
                             f"(0 to {self.vocab - 1})")
        if isinstance(prompt, list) and not chat:
            ids = prompt
            bad = next((t for t in ids if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise BadRequest(f"'prompt': token id {bad} is outside the model's vocabulary (0 to {self.vocab - 1})")
        else:
            try:
                tools = {"tools": req["tools"]} if req["tools"] else {}  # a run's render_prompt takes tools=
                text = self.run.render_prompt(prompt, **tools) if chat else prompt
            except DataError as e:  # the run's template refused the messages, or left the tools out
                raise BadRequest(f"the run's chat template: {e}") from None
            ids = self.run.tokenizer(text, add_special_tokens=not chat)["input_ids"]
        room = None if self.context is None else self.context - len(ids)
        if room is not None and (room < (0 if req["echo"] else 1) or
                                 (req["max_asked"] and req["max_new_tokens"] > room)):
            asked = f" and max_tokens {req['max_new_tokens']}" if req["max_asked"] else ""
            what, fix = ("messages take", "fewer or shorter messages") if chat else ("prompt takes", "a shorter prompt")
            raise BadRequest(f"the {what} {len(ids)} tokens{asked}: more than the model's {self.context} positions; "
                             f"send {fix}{', or a smaller max_tokens' if asked else ''}")
        return ids, req["max_new_tokens"] if room is None else min(req["max_new_tokens"], room)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: one request a connection, so each connection's thread ends with its answer. With HTTP/1.1
    keep-alive, the openai client's idle connection kept a thread that had run the model alive to interpreter exit,
    and the process aborted there (`terminate called without an active exception`, exit 134; test_serve.py)."""

    server: ChatServer

    def log_message(self, format, *args):  # silent: http.server would print a stderr line per request
        return None

    def _refused_key(self) -> bool:
        """With --api-key, every route but /health answers only "Authorization: Bearer KEY" (as OpenAI's clients
        send api_key); a 401 otherwise. /health stays open for load balancers."""
        key = self.server.api_key
        if not key or self.path.rstrip("/") == "/health":
            return False
        sent = self.headers.get("Authorization", "")
        if hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
            return False
        self._json(401, _error("missing or wrong API key: send the header 'Authorization: Bearer KEY' (the openai "
                               "client's api_key) with the key `ppalli serve --api-key` was started with",
                               "invalid_api_key"))
        return True

    def do_GET(self):
        if self._refused_key():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.name, "object": "model",
                                                         "owned_by": "ppalli"}]})
        elif self.path.rstrip("/") == "/health":
            self._json(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/tokenizer_info":
            self._json(200, self.server.tokenizer_info())
        else:
            self._json(404, _error(f"no route GET {self.path}; try POST /v1/chat/completions", "not_found"))

    def do_POST(self):
        if self._refused_key():
            return
        route = self.path.rstrip("/")
        if route in TOKENIZER_ROUTES:
            self._tokenizer_route(route)
            return
        if route not in ROUTES:
            self._json(404, _error(f"no route POST {self.path}; try POST /v1/chat/completions or /v1/completions",
                                   "not_found"))
            return
        chat = route == "/v1/chat/completions"
        try:
            body = self._body()
            req = parse_request(body, self.server.max_new_tokens, chat=chat)
            prompts = [self.server.prompt_ids(req, prompt, chat) for prompt in req["prompts"]]
            req["grammar"] = self.server.grammars.for_request(req["schema"], req["tools"], req["tool_choice"],
                                                              req["parallel"], chat and self.server.reasoning)
        except (BadRequest, ConstraintError) as e:
            self._json(400, _error(str(e), "invalid_request_error"))
            return
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.server.name}
        # with tools, an answer streams where a grammar holds its calls (call_stream.py), else it goes whole
        layout = self.server.grammars.layout_or_none() if req["tools"] and req["grammar"] is not None else None
        req["calls"] = layout if CallStream.of(layout, req["tool_choice"] is not None) else None
        streamed = req["stream"] and (not req["tools"] or req["calls"] is not None)
        texts = queue.SimpleQueue() if streamed else None
        choices = [(ids, choice, text) for (ids, limit), text in zip(prompts, req["prompts"])
                   for choice in _choices({**req, "max_new_tokens": limit})]
        jobs = [self.server.batcher.submit(Job(choice, ids, k, texts)) for k, (ids, choice, _) in enumerate(choices)]
        if streamed:
            echoes = [self._echo_text(p) for _, _, p in choices] if req["echo"] else []
            self._stream(jobs, texts, head, req, chat, echoes)
            return
        for job in jobs:
            job.finished.wait()
        failed = next((job.error for job in jobs if job.error), None)
        if failed:
            self._json(500, _error(failed, "server_error"))
            return
        try:
            answer = {**head, **self._answers(jobs, choices, req, chat)}
            self._stream_whole(answer, req["usage"]) if req["stream"] else self._json(200, answer)
        except Exception as e:  # the client gets a 500 that says what broke, not a closed connection
            _log.exception("building the answer failed")
            self._json(500, _error(f"building the answer failed: {type(e).__name__}: {e}", "server_error"))

    def _answers(self, jobs: list[Job], choices: list[tuple], req: dict, chat: bool) -> dict:
        """A whole (not streamed) reply's object, choices and usage."""
        decode = self.server.run.tokenizer.decode
        answers = [job.answer if job.watch else decode(job.new, skip_special_tokens=True) for job in jobs]
        if req["echo"]:  # the prompt comes back ahead of its answer: as sent, or its token ids decoded
            answers = [self._echo_text(p) + a for (_, _, p), a in zip(choices, answers)]
        thoughts = [None] * len(answers)
        if chat and self.server.reasoning:
            thoughts, answers = map(list, zip(*map(split_thinking, answers)))
        out = [{"index": job.index, **_content(chat, text, message=True), "logprobs": self._logprobs(job, req, chat),
                "finish_reason": job.finish_reason} for job, text in zip(jobs, answers)]
        for choice, thought in zip(out, thoughts):
            if thought is not None:
                choice["message"]["reasoning_content"] = thought
        return {"object": "chat.completion" if chat else "text_completion",
                "choices": [with_calls(c, text, req["tools"], req.get("calls")) for c, text in zip(out, answers)],
                "usage": _usage(jobs, req["n"])}

    def _echo_text(self, prompt) -> str:
        """A text completion's prompt as echo gives it back: the string as sent, or its token ids decoded."""
        return prompt if isinstance(prompt, str) else self.server.run.tokenizer.decode(prompt)

    def _logprobs(self, job: Job, req: dict, chat: bool) -> dict | None:
        """A choice's log-probs in its API's shape (None where not asked): the answer's tokens (those an answer cut
        by a stop string keeps), after the prompt's where echo asks."""
        if req["logprobs"] is None:
            return None
        scored = self._kept(job, chat)
        ids, scores = [t for t, _ in scored], [s for _, s in scored]
        if chat:
            return chat_logprobs(self.server.pieces, ids, scores)
        if req["echo"]:
            ids, scores = job.ids + ids, job.prompt_scores + scores
        return text_logprobs(self.server.pieces, ids, scores, req["logprobs"])

    def _kept(self, job: Job, chat: bool) -> list:
        """The (token, log-probs) pairs of a finished answer that its log-probs show: those an answer cut by a stop
        string keeps, else every new token; a text completion's end with the stop token that ended them, as vLLM's
        do: lm-evaluation-harness drops the last token after `echo` with max_tokens 1, taking it for the one token
        asked, so a stop token left out would cost it a token of the continuation."""
        kept = covering(self.server.run.tokenizer, job.new, job.answer) if job.hit else \
            len(job.new) if chat else len(job.scored)
        return job.scored[:kept]

    def _tokenizer_route(self, route: str) -> None:
        """POST /tokenize {"prompt": text (or "messages", rendered by the run's template), "add_special_tokens"
        (default true)} -> {"count", "max_model_len", "tokens"}; POST /detokenize {"tokens"} -> {"prompt"}: as vLLM
        answers them."""
        try:
            req = json.loads(self._body() or b"{}")
            if not isinstance(req, dict):
                raise BadRequest("the body must be a JSON object")
            if route == "/detokenize":
                tokens = req.get("tokens")
                if not isinstance(tokens, list) or not all(_is_id(t) and 0 <= t < self.server.vocab for t in tokens):
                    raise BadRequest(f"'tokens' must be a list of token ids (0 to {self.server.vocab - 1})")
                self._json(200, {"prompt": self.server.run.tokenizer.decode(tokens)})
                return
            chat = "messages" in req
            text = self.server.run.render_prompt(_messages(req)) if chat else req.get("prompt")
            if not isinstance(text, str):
                raise BadRequest("'prompt' must be a string (or send 'messages')")
            special = req.get("add_special_tokens", not chat)
            ids = self.server.run.tokenizer(text, add_special_tokens=bool(special))["input_ids"]
            self._json(200, {"count": len(ids), "max_model_len": self.server.context, "tokens": ids})
        except (BadRequest, json.JSONDecodeError, UnicodeDecodeError) as e:
            self._json(400, _error(str(e), "invalid_request_error"))

    def _body(self) -> bytes:
        """The request's body, read only when its Content-Length is a number up to MOST_BODY_BYTES."""
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit() or int(length) > MOST_BODY_BYTES:
            self.close_connection = True  # the unread body must not be taken for a next request
            raise BadRequest(f"Content-Length must be a byte count up to {MOST_BODY_BYTES}, got {length[:32]!r}")
        return self.rfile.read(int(length))

    def _stream_whole(self, answer: dict, usage: bool = False) -> None:
        """A decoded chat answer (a request with tools) as the chunks OpenAI's API streams: each choice's role, its
        content, its tool_calls (each with its index), then its end with the log-probs; the usage where asked; then
        [DONE]."""
        self._sse_headers()
        head = {k: answer[k] for k in ("id", "created", "model")}
        for choice in answer["choices"]:
            message, index = choice["message"], choice["index"]
            deltas = [{"role": "assistant", "content": ""}] + [
                {key: message[key]} for key in ("reasoning_content", "content") if message.get(key)]
            if message.get("tool_calls"):
                deltas.append({"tool_calls": [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]})
            for delta in deltas + [{}]:
                last = not delta
                self._event({**head, "object": "chat.completion.chunk", "choices": [
                    {"index": index, "delta": delta, "logprobs": choice["logprobs"] if last else None,
                     "finish_reason": choice["finish_reason"] if last else None}]})
        self._done(head, True, answer["usage"] if usage else None)

    def _done(self, head: dict, chat: bool, usage: dict | None) -> None:
        """A stream's end: the usage chunk where stream_options asked for it (no choices, as OpenAI's), then
        [DONE]."""
        if usage:
            self._event({**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
                         "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _sse_headers(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # no length: the stream ends when the answers do and the connection closes

    def _event(self, payload: dict) -> None:
        self.wfile.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())
        self.wfile.flush()

    def _stream(self, jobs: list[Job], texts: queue.SimpleQueue, head: dict, req: dict, chat: bool,
                prompts: list[str]) -> None:
        """Server-sent events of the answers' text as their rows decode (chunks of several choices interleave), with
        the log-probs of the tokens each completes where asked; with echo, a choice's first chunk is its prompt
        (prompts[index]) and the prompt's log-probs, sent once its row has scored it (before its first text or its
        end). A client that leaves ends its rows (the batch's other rows go on)."""
        self._sse_headers()
        event = self._event

        offsets = [0] * len(jobs)  # a text completion's text_offset: where its next token's text starts

        def scores(index: int, scored: list) -> dict | None:
            if req["logprobs"] is None or not scored:  # none asked, or no token completed by this chunk
                return None
            ids, lps = [t for t, _ in scored], [s for _, s in scored]
            if chat:
                return chat_logprobs(self.server.pieces, ids, lps)
            out = text_logprobs(self.server.pieces, ids, lps, req["logprobs"], offsets[index])
            offsets[index] += sum(len(token) for token in out["tokens"])
            return out

        def chunk(index: int, text: str | None, finish: str | None = None, scored: list = ()) -> dict:
            return {**head, "object": "chat.completion.chunk" if chat else "text_completion",
                    "choices": [{"index": index, **_content(chat, text), "logprobs": scores(index, list(scored)),
                                 "finish_reason": finish}]}

        split = StreamSplit(len(jobs), on=chat and self.server.reasoning)
        calls = CallParts(len(jobs), req.get("calls"), req.get("tool_choice") is not None)

        try:
            if chat:
                for job in jobs:
                    event(chunk(job.index, ""))  # the role comes first, as OpenAI's API sends it
            open_jobs, echoed = len(jobs), [not req["echo"]] * len(jobs)
            while open_jobs:
                index, text, scored = texts.get()
                job = jobs[index]
                if not echoed[index] and not job.error:  # the prompt scores come before the row's first text
                    event(chunk(index, prompts[index], scored=list(zip(job.ids, job.prompt_scores))))
                    echoed[index] = True
                if text is not None:
                    for kind, piece, done in calls.parts(index, split.parts(index, text, scored)):
                        event(_as(kind, chunk(index, piece, scored=done)))
                    continue
                open_jobs -= 1
                if job.error:  # the stream has begun, so the error goes as an event (as OpenAI's API sends them)
                    event(_error(job.error, "server_error"))
                else:
                    parts = calls.parts(index, split.parts(index, None, []))
                    tail, held = calls.end(index)
                    for kind, piece, done in parts + tail:
                        event(_as(kind, chunk(index, piece, scored=done)))
                    rest = held + split.left(index) + self._kept(job, chat)[job.scored_out:]
                    event(chunk(index, None, calls.finish_reason(index, job.finish_reason), rest))
            usage = req.get("usage") and not any(job.error for job in jobs)  # asked by stream_options, all went well
            self._done(head, chat, _usage(jobs, req["n"]) if usage else None)
        except (BrokenPipeError, ConnectionResetError):
            for job in jobs:
                job.left = True  # the client left: its rows end at their next text

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _content(chat: bool, text: str | None, message: bool = False) -> dict:
    """A choice's text as each API shapes it: chat {"message": ...} whole, {"delta": ...} streamed (the first with
    the role, the last empty); text completions {"text": ...} both ways."""
    if not chat:
        return {"text": text or ""}
    if message:
        return {"message": {"role": "assistant", "content": text}}
    return {"delta": {} if text is None else {"role": "assistant", "content": ""} if text == "" else {"content": text}}


def _as(kind: str, payload: dict) -> dict:
    """A streamed chat chunk's delta as `kind` says: thinking goes as reasoning_content (ppalli serve --reasoning),
    a call's part (call_stream.py) as its tool_calls entry."""
    delta = payload["choices"][0]["delta"] if kind != "content" else None
    if kind == "reasoning":
        payload["choices"][0]["delta"] = {"reasoning_content": delta.get("content", "")}
    elif kind == "call":
        payload["choices"][0]["delta"] = {"tool_calls": [delta["content"]]}
    return payload


def _usage(jobs: list[Job], n: int) -> dict:
    """Token counts of a reply: each prompt once (its n choices are consecutive jobs), every answer's new tokens."""
    used, new = sum(len(job.ids) for job in jobs[::n]), sum(len(job.new) for job in jobs)
    return {"prompt_tokens": used, "completion_tokens": new, "total_tokens": used + new}


def _choices(req: dict) -> list[dict]:
    """The request once per answer asked for (n): a seed, when given, counts up from one answer to the next."""
    seed = req["seed"]
    return [{**req, "seed": None if seed is None else seed + i} for i in range(req["n"])]


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind}}
