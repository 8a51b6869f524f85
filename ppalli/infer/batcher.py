"""`ppalli serve`'s decoding: the requests waiting, decoded together as one batch of generate_rows.

One thread takes every request waiting (up to `rows`) as a batch, each row with its own sampling, seed, limit,
stream and stop strings, and hands each answer back as soon as its row ends; requests that come meanwhile form the
next batch. Decoding B rows costs little more than one (bench_generate.py: 16 rows of Llama-3.1-8B 1,397 new
tokens/s against 117 for one, H200), so concurrent clients share the GPU instead of queueing for it one by one.
A batch that runs out of GPU memory is retried smaller.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

import torch

from ppalli.infer.generate import RowCancelled, Sampling, generate_rows, step_compiles, stop_token_ids
from ppalli.infer.logprobs import TokenLogprob, logprobs_of, score_prompt
from ppalli.train.oom import explain_cuda_error, is_oom

_log = logging.getLogger("ppalli.serve")
GATHER_S = 0.02  # how long a batch's first request waits for others sent at the same moment. 8 clients sent at
# once over HTTP (bench_serve.py, 2-core CPU, 2026-12-05) shared batches [8, 8, 8] at 20 ms, [8, 8, 7, 1] at 5 ms;
# 20 ms is ~4 decode steps of Llama-3.1-8B from the CUDA graph (177 tokens/s, H200), paid once a batch.


class Job:
    """One answer (one choice of a request) on its way through a batch: its prompt ids, its new ids once its row
    ends, or the error that stopped its batch. Its text is watched as it decodes when it streams or has stop
    strings: text that may begin a stop string is held back, a stop string ends the row before it, and released
    text goes to `texts` as (index, text, scored), then (index, None, []) at the end (several choices may share one
    queue). req["logprobs"] (None: not asked) is how many alternatives each new token's log-prob comes with
    (`scored`: the ids of `new`, then the stop token where one ended the row, each with its log-probs); a streamed
    text goes with the scored tokens whose text it completes (`scored_out` of them have gone so far), so a token
    whose text is held back (it may begin a stop string) goes with the text that releases it.
    req["echo"] asks the prompt's too (`prompt_scores`, from one forward before the batch decodes)."""

    def __init__(self, req: dict, ids: list[int], index: int = 0, texts: queue.SimpleQueue | None = None):
        self.req, self.ids, self.index, self.texts = req, ids, index, texts
        self.stops: list[str] = req.get("stop", [])
        self.watch = texts is not None or bool(self.stops)
        self.new: list[int] = []
        self.scored: list[tuple[int, TokenLogprob]] = []  # (token, its log-probs) a new token, where asked
        self.prompt_scores: list[TokenLogprob] = []  # one a prompt token (the first: none), where echo asks
        self.text, self.sent = "", 0  # the text decoded so far; how much of it is released
        self.scored_out = 0  # the scored tokens that went out with released text (streams)
        self.marks: deque[tuple[int, int]] = deque()  # (len(text), len(scored)) after each text not yet released
        self.hit = False  # a stop string ended the answer
        self.error: str | None = None
        self.left = False  # a streaming client went away: its row ends at its next text
        self.finished = threading.Event()

    @property
    def started(self) -> bool:
        """Text has gone out, so the answer cannot be decoded again from the start."""
        return self.sent > 0 and self.texts is not None

    @property
    def finish_reason(self) -> str:
        return "stop" if self.hit or len(self.new) < self.req["max_new_tokens"] else "length"

    @property
    def answer(self) -> str:
        """The answer's text where it was watched (`watch`: cut before a stop string); else decode `new`."""
        return self.text[:self.sent]

    def on_text(self, piece: str) -> None:
        if self.left:
            raise RowCancelled
        self.text += piece
        self.marks.append((len(self.text), len(self.scored)))  # on_logprobs comes before the token's text
        cut = _stop_at(self.text, self.stops, self.sent)
        if cut is not None:
            self._release(cut)
            self.hit = True
            raise RowCancelled  # the row ends here; what follows the stop string is never sent
        self._release(len(self.text) - held_back(self.text, self.stops))

    def _release(self, upto: int) -> None:
        if upto > self.sent:
            if self.texts is not None:
                done = self.scored_out
                while self.marks and self.marks[0][0] <= upto:  # the tokens whose text ends in what goes out
                    done = self.marks.popleft()[1]
                self.texts.put((self.index, self.text[self.sent:upto], self.scored[self.scored_out:done]))
                self.scored_out = done
            self.sent = upto

    def end(self, ids: list[int] | None = None, error: str | None = None) -> None:
        self.new, self.error = list(ids or []), error
        if not self.hit and error is None:
            self._release(len(self.text))  # no stop string came: what was held back is answer
        self.finished.set()
        if self.texts is not None:
            self.texts.put((self.index, None, []))


def _stop_at(text: str, stops: list[str], sent: int) -> int | None:
    """Where the earliest stop string in `text` begins, or None. Text before `sent` held none (else the answer
    would have ended), so only stop strings reaching past it are looked for."""
    found = [i for s in stops if (i := text.find(s, max(sent - len(s) + 1, 0))) >= 0]
    return min(found) if found else None


def held_back(text: str, marks: list[str]) -> int:
    """How many of text's last characters may begin one of `marks` (a stop string, a closing tag): held back until
    the next text decides."""
    return max((k for s in marks for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class Batcher:
    """The decoding thread: every job waiting, up to `rows`, decoded as one batch of generate_rows."""

    def __init__(self, run, rows: int = 8, compile: bool = False, start: bool = True):
        self.run, self.rows, self.compile = run, max(rows, 1), compile
        self.waiting: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.sizes: list[int] = []  # each batch's rows, in order
        self.closing = threading.Event()  # set by close(): the batch in hand ends at its next step
        self.thread = threading.Thread(target=self._serve, name="ppalli-decode", daemon=True) if start else None
        if self.thread:
            self.thread.start()

    def submit(self, job: Job) -> Job:
        self.waiting.put(job)
        return job

    def close(self, timeout: float | None = None) -> None:
        """End the decoding thread: the batch in hand stops at its next step (its answers go back as they are),
        then the thread ends. A thread that ran the model and is still alive at interpreter exit could abort the
        process (`terminate called without an active exception`, exit 134, seen once here: the answers had gone
        back while the thread was still inside generate_rows), so the server ends it before exiting."""
        self.closing.set()
        if self.thread and self.thread.is_alive():
            self.waiting.put(None)
            self.thread.join(timeout)

    def _serve(self) -> None:
        while self.run_once(block=True) >= 0:
            pass

    def run_once(self, block: bool = False) -> int:
        """Decode one batch of the waiting jobs (waiting for the first when `block`); its rows, -1 once closed."""
        try:
            first = self.waiting.get(block=block)
        except queue.Empty:
            return 0
        if first is None:
            return -1
        batch = [first]
        deadline = time.monotonic() + GATHER_S
        while len(batch) < self.rows:
            try:
                job = self.waiting.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if job is None:  # closed while gathering: this batch still decodes, then the loop ends
                self.waiting.put(None)
                break
            batch.append(job)
        self.sizes.append(len(batch))
        self._decode(batch)
        return len(batch)

    def _decode(self, batch: list[Job]) -> None:
        run = self.run
        try:
            batch = self._score_prompts(batch)
            if not batch:
                return
            samplings = [Sampling(temperature=j.req["temperature"] or 1.0, top_p=j.req["top_p"],
                                  top_k=j.req.get("top_k", 0), min_p=j.req.get("min_p", 0.0),
                                  repetition_penalty=j.req.get("repetition_penalty", 1.0),
                                  greedy=j.req["greedy"], presence_penalty=j.req.get("presence_penalty", 0.0),
                                  frequency_penalty=j.req.get("frequency_penalty", 0.0),
                                  logit_bias=j.req.get("logit_bias", ())) for j in batch]
            generate_rows(run.model, run.tokenizer, [j.ids for j in batch],
                          max_new_tokens=[j.req["max_new_tokens"] for j in batch], sampling=samplings,
                          seeds=[j.req["seed"] for j in batch], stop_ids=run.stop_ids, compile=self.compile,
                          fill_rows=self.rows if step_compiles(run.model, compile=self.compile) else 0,
                          on_text=[j.on_text if j.watch else None for j in batch],
                          on_end=lambda row, ids: batch[row].end(ids), cancel=self.closing.is_set,
                          top_logprobs=[j.req.get("logprobs") for j in batch],
                          on_logprobs=lambda row, token, score: batch[row].scored.append((token, score)),
                          grammars=[j.req.get("grammar") for j in batch])
        except Exception as e:  # whatever stopped the model goes back to its clients: none waits forever
            self._failed(batch, e)

    def _score_prompts(self, batch: list[Job]) -> list[Job]:
        """The prompt log-probs of the jobs that echo, one forward a prompt (choices of one prompt share it); the
        jobs left to decode. One asking a single greedy token and no stop string (lm-evaluation-harness'
        log-likelihood requests: echo, logprobs, max_tokens 1, temperature 0) takes it from that same forward,
        instead of the prompt's second pass a batch of generate_rows would cost."""
        done: dict[int, tuple[list[TokenLogprob], torch.Tensor]] = {}
        stops = stop_token_ids(self.run.model, self.run.tokenizer, self.run.stop_ids)
        rest = []
        for job in batch:
            top = job.req.get("logprobs")
            if job.req.get("echo") and top is not None and not job.prompt_scores:
                if id(job.ids) not in done:
                    done[id(job.ids)] = score_prompt(self.run.model, job.ids, top)
                job.prompt_scores, last = done[id(job.ids)]
                if job.req["greedy"] and job.req["max_new_tokens"] == 1 and not job.watch:
                    token = int(last.argmax())
                    job.scored = [(token, logprobs_of(last[None], torch.tensor([token]), top)[0])]
                    job.end([] if token in stops else [token])
                    continue
            rest.append(job)
        return rest

    def _failed(self, batch: list[Job], e: Exception) -> None:
        """A batch that ran out of memory steps down: half the rows from now on, and its jobs that have sent
        nothing yet go back to wait. Anything else, and jobs already streaming, get the error."""
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
                    job.text, job.sent, job.scored, job.scored_out, job.marks = "", 0, [], 0, deque()
                    self.submit(job)
            return
        why = explain_cuda_error(e) if torch.cuda.is_available() else f"{type(e).__name__}: {e}"
        _log.error("decoding a batch of %d requests failed: %s", len(batch), why)
        for job in open_jobs:
            job.end(job.new, why)
