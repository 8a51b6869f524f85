"""`ppalli serve RUN`: a trained run behind an OpenAI-compatible HTTP API, so the clients and tools that speak it
(the openai package, LangChain, curl) use the fine-tuned model as it is.

    POST /v1/chat/completions   {"messages": [...], "max_tokens", "temperature", "top_p", "seed", "stream"}
    GET  /v1/models             the run, as the one model served
    GET  /health                {"status": "ok"}

Messages are rendered by the run's own template (the one training used) and answers end at its stop tokens, as in
`ppalli chat`; decoding is `generate` (merged 16-bit weights, the CUDA-graph step where exact). Unset, temperature
and top_p are ppalli chat's 0.7 and 0.9; temperature 0 decodes greedily. With "stream": true
the answer comes as server-sent events of chat.completion.chunk objects, text as it is decoded, then
`data: [DONE]`. Requests are decoded together: one thread takes every request waiting (up to --batch-size) as one
batch of generate_rows, each row with its own sampling, seed, limit and stream, and each answer goes back as soon as
its row ends; requests that come meanwhile form the next batch. A batch that runs out of GPU memory is retried
smaller. Built on the standard library's http.server: nothing to install.

A bad request gets a 400 whose message names the field and what it takes; fields of the API that change nothing
here (presence_penalty, user, ...) are accepted and ignored, those that would (n > 1, stop strings, tools) are
refused rather than silently dropped.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from ppalli.infer.generate import RowCancelled, Sampling, generate_rows, step_compiles
from ppalli.train.oom import explain_cuda_error, is_oom

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
            "max_new_tokens": min(limit, max_new_tokens), "max_asked": wanted is not None, "temperature": temperature,
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


_log = logging.getLogger("ppalli.serve")
GATHER_S = 0.02  # how long a batch's first request waits for others sent at the same moment. 8 clients sent at
# once over HTTP (bench_serve.py, 2-core CPU, 2026-12-05) shared batches [8, 8, 8] at 20 ms, [8, 8, 7, 1] at 5 ms;
# 20 ms is ~4 decode steps of Llama-3.1-8B from the CUDA graph (177 tokens/s, H200), paid once a batch.


class Job:
    """One request on its way through a batch: its prompt ids, its answer's ids once its row ends, the text of a
    streamed one as it comes (None ends it), or the error that stopped its batch."""

    def __init__(self, req: dict, ids: list[int]):
        self.req, self.ids = req, ids
        self.texts: queue.SimpleQueue | None = queue.SimpleQueue() if req["stream"] else None
        self.new: list[int] = []
        self.error: str | None = None
        self.left = False  # a streaming client went away: its row ends at its next text
        self.started = False  # text has gone out, so the request cannot be decoded again from the start
        self.finished = threading.Event()

    @property
    def finish_reason(self) -> str:
        return "length" if len(self.new) >= self.req["max_new_tokens"] else "stop"

    def on_text(self, text: str) -> None:
        if self.left:
            raise RowCancelled
        self.started = True
        self.texts.put(text)

    def end(self, ids: list[int] | None = None, error: str | None = None) -> None:
        self.new, self.error = list(ids or []), error
        self.finished.set()
        if self.texts is not None:
            self.texts.put(None)


class Batcher:
    """The decoding thread: every request waiting, up to `rows`, decoded as one batch of generate_rows. Decoding B
    rows costs little more than one (bench_generate.py: 16 rows of Llama-3.1-8B 1,397 new tokens/s against 117 for
    one, H200), so concurrent clients share the GPU instead of queueing for it one by one."""

    def __init__(self, run, rows: int = 8, compile: bool = False, start: bool = True):
        self.run, self.rows, self.compile = run, max(rows, 1), compile
        self.waiting: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.sizes: list[int] = []  # each batch's rows, in order
        if start:
            threading.Thread(target=self._serve, name="ppalli-decode", daemon=True).start()

    def submit(self, job: Job) -> Job:
        self.waiting.put(job)
        return job

    def _serve(self) -> None:
        while True:
            self.run_once(block=True)

    def run_once(self, block: bool = False) -> int:
        """Decode one batch of the waiting requests (waiting for the first when `block`); its rows."""
        try:
            batch = [self.waiting.get(block=block)]
        except queue.Empty:
            return 0
        deadline = time.monotonic() + GATHER_S
        while len(batch) < self.rows:
            try:
                batch.append(self.waiting.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                break
        self.sizes.append(len(batch))
        self._decode(batch)
        return len(batch)

    def _decode(self, batch: list[Job]) -> None:
        run = self.run
        samplings = [Sampling(temperature=j.req["temperature"] or 1.0, top_p=j.req["top_p"], greedy=j.req["greedy"])
                     for j in batch]
        try:
            generate_rows(run.model, run.tokenizer, [j.ids for j in batch],
                          max_new_tokens=[j.req["max_new_tokens"] for j in batch], sampling=samplings,
                          seeds=[j.req["seed"] for j in batch], stop_ids=run.stop_ids, compile=self.compile,
                          fill_rows=self.rows if step_compiles(run.model, compile=self.compile) else 0,
                          on_text=[j.on_text if j.texts is not None else None for j in batch],
                          on_end=lambda row, ids: batch[row].end(ids))
        except Exception as e:  # whatever stopped the model goes back to its clients: none waits forever
            self._failed(batch, e)

    def _failed(self, batch: list[Job], e: Exception) -> None:
        """A batch that ran out of memory steps down: half the rows from now on, and its requests that have sent
        nothing yet go back to wait. Anything else, and requests already streaming, get the error."""
        open_jobs = [j for j in batch if not j.finished.is_set()]
        if is_oom(e) and len(batch) > 1:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.rows = max(len(batch) // 2, 1)
            _log.warning("a batch of %d requests ran out of GPU memory: batches of at most %d from now on",
                         len(batch), self.rows)
            for job in open_jobs:
                if job.started:
                    job.end(job.new, "out of GPU memory mid-answer; ask again (batches are smaller now)")
                else:
                    self.submit(job)
            return
        why = explain_cuda_error(e) if torch.cuda.is_available() else f"{type(e).__name__}: {e}"
        _log.error("decoding a batch of %d requests failed: %s", len(batch), why)
        for job in open_jobs:
            job.end(job.new, why)


class ChatServer(ThreadingHTTPServer):
    """The HTTP server holding the loaded run; its Batcher decodes the requests, several at a time."""

    daemon_threads = True

    def __init__(self, address, run, name: str, max_new_tokens: int = 512, compile: bool = False,
                 batch_size: int = 8):
        super().__init__(address, _Handler)
        self.run, self.name, self.max_new_tokens = run, name, max_new_tokens
        self.batcher = Batcher(run, batch_size, compile)
        self.context = getattr(run.model.config, "max_position_embeddings", None)

    def prompt_ids(self, req: dict) -> list[int]:
        """The rendered messages' ids. An answer fits the model's positions: a request that set max_tokens past
        them is refused (as OpenAI's API does), one that did not gets what room is left."""
        ids = self.run.tokenizer(self.run.render_prompt(req["messages"]), add_special_tokens=False)["input_ids"]
        room = None if self.context is None else self.context - len(ids)
        if room is not None and (room < 1 or (req["max_asked"] and req["max_new_tokens"] > room)):
            asked = f" and max_tokens {req['max_new_tokens']}" if req["max_asked"] else ""
            raise BadRequest(f"the messages take {len(ids)} tokens{asked}: more than the model's {self.context} "
                             f"positions; send fewer or shorter messages{', or a smaller max_tokens' if asked else ''}")
        if room is not None:
            req["max_new_tokens"] = min(req["max_new_tokens"], room)
        return ids


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
        job = self.server.batcher.submit(Job(req, ids))
        if req["stream"]:
            self._stream(job, head)
            return
        job.finished.wait()
        if job.error:
            self._json(500, _error(job.error, "server_error"))
            return
        text = self.server.run.tokenizer.decode(job.new, skip_special_tokens=True)
        self._json(200, {**head, "object": "chat.completion",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": job.finish_reason}],
                         "usage": {"prompt_tokens": len(ids), "completion_tokens": len(job.new),
                                   "total_tokens": len(ids) + len(job.new)}})

    def _stream(self, job: Job, head: dict) -> None:
        """Server-sent events of the job's text as its row decodes; a client that leaves ends its row (the batch's
        other rows go on)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # no length: the stream ends when the answer does and the connection closes

        def event(payload: dict) -> None:
            self.wfile.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        try:
            event(chunk({"role": "assistant", "content": ""}))
            while (text := job.texts.get()) is not None:
                event(chunk({"content": text}))
            if job.error:  # the stream has begun, so the error goes as an event (as OpenAI's API sends them)
                event(_error(job.error, "server_error"))
            else:
                event(chunk({}, job.finish_reason))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            job.left = True  # the client left: its row ends at its next text

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind}}
