"""`ppalli serve RUN`: a trained run behind an OpenAI-compatible HTTP API, so the clients and tools that speak it
(the openai package, LangChain, curl) use the fine-tuned model as it is.

    POST /v1/chat/completions   {"messages": [...], "max_tokens", "temperature", "top_p", "seed", "stream"}
    GET  /v1/models             the run, as the one model served
    GET  /health                {"status": "ok"}

Messages are rendered by the run's own template (the one training used) and answers end at its stop tokens, as in
`ppalli chat`; decoding is `generate` (merged 16-bit weights, the CUDA-graph step where exact). Unset, temperature
and top_p are ppalli chat's 0.7 and 0.9; temperature 0 decodes greedily. With "stream": true
the answer comes as server-sent events of chat.completion.chunk objects, text as it is decoded, then
`data: [DONE]`. One model serves one request at a time: requests wait their turn on a lock (the KV cache and the
graph are the model's, not the request's). Built on the standard library's http.server: nothing to install.

A bad request gets a 400 whose message names the field and what it takes; fields of the API that change nothing
here (presence_penalty, user, ...) are accepted and ignored, those that would (n > 1, stop strings, tools) are
refused rather than silently dropped.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from ppalli.infer.generate import generate

REFUSED = {"n": "n > 1 is not served: ask again for another answer",
           "stop": "stop strings are not served: the run's template stop tokens end answers",
           "tools": "tool calls are not served", "functions": "function calls are not served"}
ROLES = ("system", "user", "assistant")


class BadRequest(ValueError):
    """A request the API cannot take; the message goes back to the client as a 400."""


def parse_request(body: bytes, max_new_tokens: int) -> dict:
    """A chat completion request's JSON -> {messages, max_new_tokens, temperature, top_p, greedy, seed, stream}."""
    try:
        req = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON ({e})") from None
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object with a 'messages' list")
    for key, why in REFUSED.items():
        value = req.get(key)
        if value not in (None, [], "") and not (key == "n" and value == 1):
            raise BadRequest(f"'{key}': {why}")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}")
    wanted = req.get("max_completion_tokens", req.get("max_tokens"))
    limit = max_new_tokens if wanted is None else _number(wanted, "max_tokens", int, 1, None)
    temperature = _number(req.get("temperature", 0.7), "temperature", float, 0.0, 2.0)
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "max_new_tokens": min(limit, max_new_tokens), "temperature": temperature,
            "top_p": _number(req.get("top_p", 0.9), "top_p", float, 0.0, 1.0), "greedy": temperature == 0.0,
            "seed": None if req.get("seed") is None else _number(req["seed"], "seed", int, 0, None),
            "stream": bool(req.get("stream", False))}


def _number(value, name: str, kind, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BadRequest(f"'{name}' must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise BadRequest(f"'{name}' must be {'>= ' + str(low) if high is None else f'in [{low}, {high}]'}, "
                         f"got {value!r}")
    return kind(value)


class ChatServer(ThreadingHTTPServer):
    """The HTTP server holding the loaded run; `answer` decodes one request at a time, under the model's lock."""

    daemon_threads = True

    def __init__(self, address, run, name: str, max_new_tokens: int = 512, compile: bool = False):
        super().__init__(address, _Handler)
        self.run, self.name, self.max_new_tokens, self.compile = run, name, max_new_tokens, compile
        self.lock = threading.Lock()
        self.context = getattr(run.model.config, "max_position_embeddings", None)

    def prompt_ids(self, req: dict) -> list[int]:
        ids = self.run.tokenizer(self.run.render_prompt(req["messages"]), add_special_tokens=False)["input_ids"]
        if self.context is not None and len(ids) + req["max_new_tokens"] > self.context:
            raise BadRequest(f"the messages take {len(ids)} tokens and max_tokens {req['max_new_tokens']}: more "
                             f"than the model's {self.context} positions; send fewer or shorter messages")
        return ids

    def answer(self, req: dict, ids: list[int], on_text=None) -> tuple[list[int], str]:
        """(new token ids, finish reason) for a parsed request, decoded under the lock."""
        with self.lock:
            new = generate(self.run.model, self.run.tokenizer, torch.tensor([ids]),
                           max_new_tokens=req["max_new_tokens"], temperature=req["temperature"] or 1.0,
                           top_p=req["top_p"], greedy=req["greedy"], seed=req["seed"], stop_ids=self.run.stop_ids,
                           on_token=on_text, compile=self.compile)
        return new, "length" if len(new) >= req["max_new_tokens"] else "stop"


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: one request a connection, so each connection's thread ends with its answer. With HTTP/1.1
    keep-alive, the openai client's idle connection kept a thread that had run the model alive to interpreter exit,
    and the process aborted there (`terminate called without an active exception`, exit 134; test_serve.py)."""

    server: ChatServer

    def log_message(self, format, *args):  # silent: http.server would print a stderr line per request
        return None

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.name, "object": "model",
                                                         "owned_by": "ppalli"}]})
        elif self.path.rstrip("/") == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._json(404, _error(f"no route GET {self.path}; try POST /v1/chat/completions", "not_found"))

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._json(404, _error(f"no route POST {self.path}; try POST /v1/chat/completions", "not_found"))
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            req = parse_request(body, self.server.max_new_tokens)
            ids = self.server.prompt_ids(req)
        except BadRequest as e:
            self._json(400, _error(str(e), "invalid_request_error"))
            return
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.server.name}
        if req["stream"]:
            self._stream(req, ids, head)
            return
        new, finish = self.server.answer(req, ids)
        text = self.server.run.tokenizer.decode(new, skip_special_tokens=True)
        self._json(200, {**head, "object": "chat.completion",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish}],
                         "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new),
                                   "total_tokens": len(ids) + len(new)}})

    def _stream(self, req: dict, ids: list[int], head: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # no length: the stream ends when the answer does and the connection closes

        def event(delta: dict, finish: str | None = None) -> None:
            chunk = {**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()

        try:
            event({"role": "assistant", "content": ""})
            _, finish = self.server.answer(req, ids, on_text=lambda text: event({"content": text}))
            event({}, finish)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return  # the client left: the failed write stopped the decoding too, and the lock is free again

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind}}
