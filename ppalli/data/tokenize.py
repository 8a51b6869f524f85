"""Render, tokenize and label normalized examples, in chunks, over several processes.

Each chunk is rendered to (text, trained) segments, tokenized in one batch call with offsets, and labeled by
`masking.label_tokens`. Chunks go to a process pool (forkserver where the OS has it, else spawn; each worker
unpickles the tokenizer once) in windows of a few chunks per worker, so a streamed source is never read far ahead.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ppalli.config import PREFERENCE_OBJECTIVES
from ppalli.data.masking import join_segments, label_tokens
from ppalli.data.sources import RowError
from ppalli.data.templates import Template, render_segments, text_segments
from ppalli.errors import DataError

CHUNK = 256  # examples per task: large enough that a batch tokenizer call and IPC amortize, small for balance
WINDOW = 4  # chunks in flight per worker: keeps workers fed, bounds read-ahead of streamed data
# Seconds of encoding in this process before a pool takes the rest. Starting workers costs more than small data
# takes to encode: 500 preference pairs took 0.17 s here in one process and 1.6 s with a pool of 2; on a 16-core
# H100 host a pool of 15 made ko_preference_rlhf's 500 rows take 65 s (7.7 rows/s, 2026-12-06), most of it each
# worker importing transformers and torch to unpickle the tokenizer, which workers no longer do (_worker_tokenizer).
SERIAL_S = 2.0
# The default pool's most workers: the parent reads, normalizes and collects for all of them, so more stop paying.
# H100 host, 16 cores, 94.6k ChatbotData rows, Llama 3 tokenizer (benchmarks/bench_tokenize.py, 2026-12-06): one
# process 10.5 s, pools of 2 / 4 / 8 / 15 workers 7.7 / 5.3 / 5.2 / 6.7 s.
MAX_PROCS = 8
BAD_KEPT = 5  # bad-row messages kept for the report; the rest are counted


@dataclass(frozen=True)
class EncodeSettings:
    max_seq_len: int
    train_on: str = "responses"  # responses | all
    system_prompt: str | None = None
    objective: str = "sft"  # sft gives input_ids/labels samples; dpo and orpo give chosen_/rejected_ pairs
    skip_bad_rows: bool = False


@dataclass
class EncodeStats:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest_prompt: int = 0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def add_bad(self, message: str) -> None:
        self.bad += 1
        if len(self.bad_examples) < BAD_KEPT:
            self.bad_examples.append(message)

    def merge(self, other: EncodeStats) -> None:
        for name in ("rows", "truncated", "dropped", "tokens", "trained_tokens", "bad"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.longest_prompt = max(self.longest_prompt, other.longest_prompt)
        self.bad_examples.extend(other.bad_examples[: BAD_KEPT - len(self.bad_examples)])


# --------------------------------------------------------------------------- one example -> texts


def example_texts(example: dict, tpl: Template, settings: EncodeSettings) -> list[tuple[str, list]]:
    """The one (SFT) or two (chosen, rejected) texts of an example, each with its trained character ranges."""
    preference = settings.objective in PREFERENCE_OBJECTIVES
    if preference and "prompt" not in example:
        raise DataError(f"{example['where']}: train.objective '{settings.objective}' needs preference data "
                        "(prompt, chosen, rejected); use train.objective=sft for this file or give preference data")
    if "text" in example:
        return [join_segments(text_segments(tpl, example["text"]))]
    if "prompt" in example:
        prompt = with_system(example["prompt"], settings.system_prompt)
        answers = ("chosen", "rejected") if preference else ("chosen",)
        train = "last" if preference else settings.train_on
        turns = [example[a] if isinstance(example[a], dict) else {"role": "assistant", "content": example[a]}
                 for a in answers]  # an answer that calls tools is already its assistant turn
        return [join_segments(render_segments(tpl, prompt + [turn], train, example["where"], example.get("tools")))
                for turn in turns]
    messages = with_system(example["messages"], settings.system_prompt)
    return [join_segments(render_segments(tpl, messages, settings.train_on, example["where"], example.get("tools")))]


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The conversation with data.system_prompt in front where it has no system turn of its own: as training
    rendered every row, and so as chat, generate and serve must prompt the trained run."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


# --------------------------------------------------------------------------- a chunk


def encode_texts(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:  # noqa: ANN001
    """Token ids and character offsets, one batch call (the fast tokenizer runs it in Rust). tokenizer: a
    transformers tokenizer, or a pool worker's bare `tokenizers.Tokenizer` (_init_worker)."""
    if not callable(tokenizer):  # tokenizers.Tokenizer: what the fast wrapper's call runs, without the wrapper
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                    return_token_type_ids=False)
    return enc["input_ids"], enc["offset_mapping"]


def encode_chunk(chunk: list[tuple[bool, dict]], tokenizer, tpl: Template,  # noqa: ANN001
                 settings: EncodeSettings) -> tuple[list[dict], list[dict], EncodeStats]:
    """(is_eval, example) pairs -> train samples, eval samples, stats."""
    stats = EncodeStats()
    rendered = []  # (is_eval, [(text, ranges), ...])
    for is_eval, example in chunk:
        stats.rows += 1
        try:
            rendered.append((is_eval, example_texts(example, tpl, settings)))
        except RowError as e:
            if not settings.skip_bad_rows:
                raise
            stats.add_bad(str(e))
    texts = [text for _, pieces in rendered for text, _ in pieces]
    ids, offsets = encode_texts(tokenizer, texts) if texts else ([], [])
    train, evals, t = [], [], 0
    for is_eval, pieces in rendered:
        labeled = [label_tokens(ids[t + k], offsets[t + k], pieces[k][1], settings.max_seq_len)
                   for k in range(len(pieces))]
        t += len(pieces)
        sample = _sample(labeled, stats)
        if sample is not None:
            (evals if is_eval else train).append(sample)
    return train, evals, stats


def _sample(labeled: list, stats: EncodeStats) -> dict | None:
    stats.longest_prompt = max([stats.longest_prompt] + [x.prompt_len for x in labeled])
    stats.truncated += any(x.truncated for x in labeled)
    if any(x.trained == 0 for x in labeled):  # every trained token fell beyond max_seq_len (or none existed)
        stats.dropped += 1
        return None
    stats.tokens += sum(len(x.input_ids) for x in labeled)
    stats.trained_tokens += sum(x.trained for x in labeled)
    if len(labeled) == 1:
        return {"input_ids": labeled[0].input_ids, "labels": labeled[0].labels}
    chosen, rejected = labeled
    return {"chosen_input_ids": chosen.input_ids, "chosen_labels": chosen.labels,
            "rejected_input_ids": rejected.input_ids, "rejected_labels": rejected.labels}


# --------------------------------------------------------------------------- the stream, in parallel

_WORKER: dict = {}


def _worker_tokenizer(tokenizer):  # noqa: ANN001, ANN202
    """What a pool worker gets of the tokenizer: a fast tokenizer's Rust core as its JSON, which the worker loads
    with `tokenizers` alone. Unpickling the transformers wrapper imports transformers and torch in every worker: 15
    workers took 97 s to start on a 16-core H100 host (2 took 13.6 s), for a tokenizer that unpickles in 0.8 s
    (2026-12-06). A slow (Python) tokenizer goes as it is."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return ("json", backend.to_str()) if backend is not None else ("object", tokenizer)


def _init_worker(tokenizer, tpl: Template, settings: EncodeSettings) -> None:  # noqa: ANN001
    # Each worker tokenizes one chunk at a time; Rust-side threads on top of the processes would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    kind, value = tokenizer
    if kind == "json":
        from tokenizers import Tokenizer

        value = Tokenizer.from_str(value)
        value.no_truncation()  # as the wrapper's call leaves it: no truncation, no padding asked
        value.no_padding()
    _WORKER.update(tokenizer=value, tpl=tpl, settings=settings)


def _work(chunk: list[tuple[bool, dict]]):
    return encode_chunk(chunk, _WORKER["tokenizer"], _WORKER["tpl"], _WORKER["settings"])


def resolve_num_proc(num_proc: int) -> int:
    """Processes to tokenize with. 0: one per core but one, left to the parent, which reads, normalizes and
    collects results (on 2 cores a pool measured slower than one process: 4.8k vs 6.6k rows/s, ChatbotData), and
    at most MAX_PROCS."""
    if num_proc > 0:
        return num_proc
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, MAX_PROCS))


def _context():
    # Not fork: a worker forked from this process inherits whatever locks its other threads held at that moment
    # (a server's, torch's, a tokenizer's) and may wait on one forever. CI 2026-12-05: in the full test suite,
    # after the serve and llama.cpp tests had run in-process, a forked pool never answered (the pool test timed
    # out at 60 s; alone it takes 1 s). forkserver forks workers from a clean server process (Python 3.14's
    # default on Linux); macOS and Windows spawn.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods and sys.platform != "darwin"
                                       else "spawn")


def encode_stream(tagged: Iterable[tuple[bool, dict]], tokenizer, tpl: Template,  # noqa: ANN001
                  settings: EncodeSettings, num_proc: int = 0) -> tuple[list[dict], list[dict], EncodeStats]:
    """Encode (is_eval, example) pairs; returns train samples, eval samples and merged stats, in input order.
    Chunks are encoded in this process for SERIAL_S seconds, the rest (if any) by a pool of num_proc workers."""
    train, evals, stats = [], [], EncodeStats()
    procs = resolve_num_proc(num_proc)
    chunks = _chunks(tagged, CHUNK)
    start = time.perf_counter()
    for chunk in chunks:  # here first: a pool only for what is left after SERIAL_S, so small data never waits on one
        _collect([encode_chunk(chunk, tokenizer, tpl, settings)], train, evals, stats)
        if procs > 1 and time.perf_counter() - start > SERIAL_S:
            break
    else:
        return train, evals, stats
    head = list(itertools.islice(chunks, 1))
    if not head:  # the source ended with the chunk that ran past SERIAL_S
        return train, evals, stats
    chunks = itertools.chain(head, chunks)
    # imap keeps every worker busy while results come back; the semaphore stops its feeder thread from reading
    # a streamed source further than WINDOW chunks per worker ahead of the results taken.
    ahead, stop = threading.BoundedSemaphore(procs * WINDOW), threading.Event()
    worker_args = (_worker_tokenizer(tokenizer), tpl, settings)
    with _context().Pool(procs, initializer=_init_worker, initargs=worker_args) as pool:
        try:
            for result in pool.imap(_work, _bounded(chunks, ahead, stop)):
                ahead.release()
                _collect([result], train, evals, stats)
        finally:
            # On an error the loop ends early; Pool.terminate then joins the feeder thread, which must not stay
            # blocked on the semaphore (that hangs forever), so tell it to return.
            stop.set()
    return train, evals, stats


def _bounded(chunks: Iterator[list], ahead: threading.BoundedSemaphore, stop: threading.Event) -> Iterator[list]:
    for chunk in chunks:
        while not ahead.acquire(timeout=0.05):
            if stop.is_set():
                return
        yield chunk


def _collect(results: Iterable, train: list, evals: list, stats: EncodeStats) -> None:
    for chunk_train, chunk_eval, chunk_stats in results:
        train.extend(chunk_train)
        evals.extend(chunk_eval)
        stats.merge(chunk_stats)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
