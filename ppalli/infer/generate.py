"""Token-by-token generation on the KV cache: sampling by default, every stop token, streamed text.

Users' two complaints after fine-tuning are a model that never stops and one that always says the same
thing. So the loop stops on the tokenizer's EOS, every EOS id of the generation config and the
template's end-of-turn ids, and samples unless greedy decoding is asked for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ppalli.infer.decode_layers import decode_layers, decode_problem
from ppalli.infer.graph import (
    StaticDecoder,
    base_model,
    compile_problem,
    compiled_slots,
    graph_problem,
    step_kwargs,
)
from ppalli.infer.logprobs import TokenLogprob, logprobs_of

_BROKEN = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence, e.g. half a Hangul syllable


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    greedy: bool = False
    repetition_penalty: float = 1.0  # CTRL's, as HF's: seen tokens (prompt too) move toward zero, x or / this
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token the answer already holds
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time the answer holds the token
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token, bias) added to its logit, greedy or sampled
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest (after temperature), as vLLM's min_p


class TextStream:
    """Turns token ids into text pieces as they come, never emitting a broken character.

    A byte-level token may hold half of a Hangul syllable; its text is held back until the syllable is
    complete. Each window is decoded with one earlier token as context and only the new tail is emitted,
    so SentencePiece's leading-space rule gives the same spaces as decoding everything at once (the
    offsets scheme of HF text-generation-inference).
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # everything before this has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _pending(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        return self._decode(self.ids[self.prefix_offset:])[len(prefix):]

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        new = self._pending()
        if new and not new.endswith(_BROKEN):
            self.on_text(new)
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def flush(self) -> None:
        """Emit whatever is held back, broken or not: generation is over and nothing will complete it."""
        new = self._pending()
        if new:
            self.on_text(new)
        self.prefix_offset = self.read_offset = len(self.ids)


class _Decoder:
    """One forward step on a growing KV cache; returns the last position's logits as float32 (B, V)."""

    def __init__(self, model):
        self.kwargs = step_kwargs(model, DynamicCache(config=getattr(base_model(model), "config", None)))
        self.model = model

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unpadded rows' next ids (B, t), the prompts' in one forward first -> the last position's logits (B, V)."""
        return self.model(input_ids=input_ids, **self.kwargs).logits[:, -1].float()

    prefill = __call__  # as StaticDecoder.prefill, for unpadded prompts

    def rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The step for a batch of rows (B, t): the last position's logits (B, V) float32."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         **self.kwargs)
        return out.logits[:, -1].float()


def stop_token_ids(model, tokenizer, extra: Iterable[int] | None = None) -> set[int]:
    """The tokenizer's EOS, the generation config's EOS ids (one or a list) and `extra` (end-of-turn ids)."""
    config = getattr(model, "generation_config", None)
    ids: set[int] = set(extra or ())
    for source in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    return ids


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty as HF applies it: seen tokens' logits move toward zero by `penalty`."""
    if penalty == 1.0:
        return logits
    scores = logits.gather(0, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen, scores)


def _penalize_answer(logits: torch.Tensor, answer: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on (V,) logits: each token of the answer so far (not the prompt)
    loses `presence` once and `frequency` per occurrence."""
    if not answer or (presence == 0.0 and frequency == 0.0):
        return logits
    counts = torch.bincount(torch.tensor(answer, device=logits.device), minlength=logits.shape[-1])  # (V,)
    return logits - frequency * counts - presence * (counts > 0)


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest logits, (..., V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter of each row, (..., V): keep the fewest most likely tokens whose mass reaches p (the top one
    always stays)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs > p  # mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the tokens of each row, (..., V), at least p times as likely as its likeliest."""
    if p <= 0.0:
        return logits
    floor = logits.max(-1, keepdim=True).values + math.log(p)  # log(p x max prob), in logits (softmax's shift)
    return logits.masked_fill(logits < floor, float("-inf"))


def _sampling_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """(..., V) logits after the repetition penalty -> the probabilities sampled from: temperature, top-k, min-p,
    top-p."""
    return _top_p(_min_p(_top_k(logits / s.temperature, s.top_k), s.min_p), s.top_p).softmax(-1)


def _device(model) -> torch.device:
    return next(model.parameters()).device


class RowCancelled(Exception):
    """Raised by a row's on_text callback (generate_rows) to end that row where it is, e.g. its client left; the
    other rows go on."""


def generate(model, tokenizer, input_ids: torch.Tensor, *, max_new_tokens: int = 256, temperature: float = 0.7,
             top_p: float = 0.9, top_k: int = 0, greedy: bool = False, repetition_penalty: float = 1.0,
             stop_ids: Iterable[int] | None = None, seed: int | None = None,
             on_token: Callable[[str], None] | None = None, graph: bool | None = None,
             compile: bool = False, grammar=None) -> list[int]:
    """Generate after `input_ids` (1, T); returns the new token ids without the stop token.

    graph: decode steps replayed from a CUDA graph over a static KV cache (ppalli/infer/graph.py); None uses
    it wherever it is exact (CUDA, SDPA, no sliding window), False never. Models the decode layers cover
    (decode_layers.py: merged, or a 4-bit base with its adapter apart) decode through them. compile: the graph's
    step of the model's own layers compiled by torch.compile first (once per cache size: 20-40 s, then ~1.4-1.5x
    the tokens/s of those layers on an H200); not where the decode layers run, which were faster uncompiled.

    `on_token` receives text pieces as they are decoded (whole characters only); their concatenation
    equals ``tokenizer.decode(result, skip_special_tokens=True)``. The model runs in eval mode and gets
    its previous mode back. One row of generate_rows: the same loop, so a batch's row and this agree. grammar: a
    compiled grammar the answer is held to (generate_rows' grammars).
    """
    sampling = Sampling(temperature, top_p, top_k, greedy, repetition_penalty)
    return generate_rows(model, tokenizer, [input_ids[0].tolist()], max_new_tokens=max_new_tokens, sampling=sampling,
                         seeds=[seed], stop_ids=stop_ids, graph=graph, compile=compile, on_text=[on_token],
                         grammars=None if grammar is None else [grammar])[0]


def generate_greedy_rows(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 256,
                         stop_ids: Iterable[int] | None = None, graph: bool | None = None,
                         compile: bool = False, fill_rows: int = 0) -> list[list[int]]:
    """generate_rows, greedy: what `ppalli eval` answers its rows with."""
    return generate_rows(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, graph=graph,
                         compile=compile, fill_rows=fill_rows)


@torch.inference_mode()
def generate_rows(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int | list[int] = 256,
                  sampling: Sampling | list[Sampling] = Sampling(greedy=True), seeds: list[int | None] | None = None,
                  stop_ids: Iterable[int] | None = None, graph: bool | None = None, compile: bool = False,
                  fill_rows: int = 0, on_text: list[Callable[[str], None] | None] | None = None,
                  on_end: Callable[[int, list[int]], None] | None = None,
                  cancel: Callable[[], bool] | None = None, top_logprobs: list[int | None] | None = None,
                  on_logprobs: Callable[[int, int, TokenLogprob], None] | None = None,
                  grammars: list | None = None) -> list[list[int]]:
    """Answers to several prompts in one batch: each row's new ids, without its stop token.

    Prompts are left-padded (positions count from each row's first real token, padding masked), so a row gets
    the answer `generate(...)` gives it alone with the same sampling and seed (seeds[i] for row i), up to the float
    noise of the batched kernels (a near-tie can flip). One sequence's decoding is bound by the launches
    (benchmarks/bench_generate.py), so B rows cost little more than one. Sampled rows take the penalty,
    temperature, top-k and top-p steps together, each drawing from its own generator. graph, compile: as
    generate's. fill_rows: decode at least this many rows, the extra ones copies of the last prompt, finished
    from the start and dropped: a short last batch then runs the full batches' compiled step instead of
    compiling its own (20-40 s).

    Per row where a list is given (`ppalli serve` batches requests that ask differently): max_new_tokens, sampling
    (rows that share one are picked together). on_text[i] streams row i's text as generate's on_token does; one
    that raises RowCancelled ends its row there. on_end(i, ids) is called once as row i ends (its stop token, its
    limit, or cancelled), with its text flushed, so a short answer need not wait for the batch's longest.
    cancel() is asked once a step: True ends every open row where it is (a server shutting down).
    top_logprobs[i] (None: none) asks row i's log-probs: on_logprobs(i, token, (log-prob, top (id, log-prob) pairs))
    for each token the row takes, its stop token too, before its text goes out (infer/logprobs.py: the model's
    distribution, unsampled).
    grammars[i] (None: free text) holds row i to a compiled grammar (infer/structured.py: a JSON schema, a forced
    tool call): each step it picks only among the tokens the grammar allows next, and ends once the grammar does.
    """
    device = _device(model)
    stops = stop_token_ids(model, tokenizer, stop_ids)
    asked = len(prompts)
    limits = _per_row(max_new_tokens, asked, "max_new_tokens")
    samplings = _per_row(sampling, asked, "sampling")
    prompts = list(prompts) + [prompts[-1]] * max(fill_rows - asked, 0)
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    seeds = list(seeds or [None] * asked) + [None] * (len(prompts) - asked)
    pick = _RowPicker(prompts, samplings + samplings[-1:] * (len(prompts) - asked), seeds, device)
    rows = _Rows(asked, len(prompts), limits, stops, tokenizer, on_text, on_end, cancel)
    rows.logprobs(top_logprobs, on_logprobs)
    if grammars and any(g is not None for g in grammars):
        from ppalli.infer.structured import RowGrammars

        rows.grammars = RowGrammars(grammars, stops, len(prompts))
    step = _decoder(model, device, width + max(max(limits), 0), graph, rows=len(prompts), compile=compile)
    was_training = model.training
    model.eval()
    try:
        with _layers(model, step):
            _rows_loop(step, ids, mask, positions, pick, rows)
    finally:
        model.train(was_training)
    return rows.out[:asked]


def _per_row(value, rows: int, name: str) -> list:
    """One value for every row, or the list of each row's (its length checked)."""
    if not isinstance(value, list):
        return [value] * rows
    if len(value) != rows:
        raise ValueError(f"{name}: {len(value)} values for {rows} prompts (give one, or one a prompt)")
    return value


class _Rows:
    """Each row's answer so far and whether it is over: its stop token, its own limit, or its stream cancelled.
    Rows past `asked` (fill rows) are over from the start: never read, never waited for."""

    def __init__(self, asked: int, total: int, limits: list[int], stops: set[int], tokenizer,
                 on_text: list[Callable[[str], None] | None] | None, on_end: Callable[[int, list[int]], None] | None,
                 cancel: Callable[[], bool] | None = None):
        self.limits, self.stops, self.on_end, self.cancel = limits, stops, on_end, cancel
        self.out: list[list[int]] = [[] for _ in range(total)]
        self.done = [row >= asked for row in range(total)]
        fns = list(on_text or []) + [None] * (total - len(on_text or []))
        self.streams = [TextStream(tokenizer, fn) if fn else None for fn in fns]
        self.tops: list[int | None] = [None] * total
        self.on_logprobs: Callable[[int, int, TokenLogprob], None] | None = None
        self.grammars = None  # infer.structured.RowGrammars where a row is held to a grammar
        for row in range(asked):
            if limits[row] <= 0:
                self._end(row)

    def logprobs(self, tops: list[int | None] | None, on_logprobs) -> None:
        """Which rows report their tokens' log-probs (tops[row]: how many alternatives), and to whom. With no row
        asking (serve passes every batch's list), the loop does no log-prob work at all."""
        if tops is not None and on_logprobs is not None and any(top is not None for top in tops):
            self.tops[:len(tops)], self.on_logprobs = list(tops), on_logprobs

    def scores(self, logits: torch.Tensor, tokens: torch.Tensor) -> list[TokenLogprob | None]:
        """(B, V) logits and the (B,) tokens picked from them -> each open reporting row's log-probs (else None),
        read off the device once."""
        want = [row for row, top in enumerate(self.tops) if top is not None and not self.done[row]]
        found: list[TokenLogprob | None] = [None] * len(self.tops)
        if want:
            index = torch.tensor(want, device=logits.device)
            top = max(self.tops[row] for row in want)
            for row, score in zip(want, logprobs_of(logits[index], tokens[index], top)):
                found[row] = (score[0], score[1][:self.tops[row]])
        return found

    def take(self, tokens: list[int], scores: list[TokenLogprob | None] | None = None) -> None:
        """One step's token of every row: appended where the row is open, ending the rows it ends."""
        for row, token in enumerate(tokens):
            if self.done[row]:
                continue
            if scores and scores[row] is not None:
                self.on_logprobs(row, token, scores[row])
            if token in self.stops:
                self._end(row)
                continue
            self.out[row].append(token)
            cancelled = False
            if self.streams[row]:
                try:
                    self.streams[row].push(token)
                except RowCancelled:
                    self.streams[row], cancelled = None, True  # nothing more goes to it, not even held-back text
            if cancelled or len(self.out[row]) >= self.limits[row]:
                self._end(row)
        if self.cancel is not None and self.cancel():
            for row in range(len(self.done)):
                if not self.done[row]:
                    self._end(row)

    def _end(self, row: int) -> None:
        self.done[row] = True
        if self.streams[row]:
            try:
                self.streams[row].flush()
            except RowCancelled:
                pass  # it ends either way
        if self.on_end:
            self.on_end(row, self.out[row])


def _rows_loop(step, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, pick: _RowPicker,
               rows: _Rows) -> None:
    """generate_rows' decoding: ids, mask, positions (B, T) of the left-padded prompts -> each row's new ids, in
    rows.out."""
    if all(rows.done):
        return
    # The static decoder keeps its own mask and positions. Eager rows of one width (one prompt: `generate`) need
    # neither: the cache's positions and a causal mask are theirs, as in HF's own decoding.
    static = not isinstance(step, _Decoder)
    own = static or bool(mask[:, 0].all())
    if static:
        logits = step.prefill(ids, mask)
    else:
        logits = step(ids) if own else step.rows(ids, mask, positions)
    for _ in range(max(rows.limits)):  # each open row takes a token a step: the longest limit ends them all
        held = rows.grammars  # rows held to grammars pick among the tokens theirs allows; log-probs stay the model's
        was_open = [not d for d in rows.done]
        tokens = pick(held.mask(logits, rows.done) if held else logits, rows.out, rows.done)  # (B,) on the device
        picked = tokens.tolist()
        rows.take(picked, rows.scores(logits, tokens) if rows.on_logprobs else None)
        if held:
            held.accept(picked, was_open)
        if all(rows.done):
            break
        if own:
            logits = step(tokens[:, None])
            continue
        mask = torch.cat([mask, mask.new_ones(ids.shape[0], 1)], dim=1)  # (B, T + n)
        positions = positions[:, -1:] + 1  # (B, 1)
        logits = step.rows(tokens[:, None], mask, positions)


class _RowPicker:
    """The next token of every row from (B, V) logits. Rows sharing a Sampling are picked together: one argmax for
    greedy rows without penalties, else the penalties on each row's own tokens, the sampling filters, and a draw
    from each row's generator (finished rows get 0, never read)."""

    def __init__(self, prompts: list[list[int]], samplings: list[Sampling], seeds: list[int | None],
                 device: torch.device):
        self.device = device
        self.generators = [torch.Generator(device=device).manual_seed(s) if s is not None else None for s in seeds]
        self.prompts = [torch.tensor(p, dtype=torch.long, device=device) for p in prompts]
        groups: dict[Sampling, list[int]] = {}
        for row, s in enumerate(samplings):
            groups.setdefault(s, []).append(row)
        one = len(groups) == 1  # the usual case (generate, eval, a batch asking alike): no row index needed
        self.groups = [(s, rows, None if one else torch.tensor(rows, device=device)) for s, rows in groups.items()]

    def __call__(self, logits: torch.Tensor, out: list[list[int]], done: list[bool]) -> torch.Tensor:
        """(B, V) logits -> (B,) tokens on the device, with no read of the device until the caller's (one a step,
        not one a row)."""
        if len(self.groups) == 1:
            s, rows, _ = self.groups[0]
            return self._pick(logits, s, rows, out, done)
        tokens = torch.zeros(logits.shape[0], dtype=torch.long, device=self.device)  # (B,)
        for s, rows, index in self.groups:
            tokens[index] = self._pick(logits[index], s, rows, out, done)
        return tokens

    def _pick(self, logits: torch.Tensor, s: Sampling, rows: list[int], out: list[list[int]],
              done: list[bool]) -> torch.Tensor:
        """(b, V) logits of `rows`, all sampled by s -> their (b,) tokens."""
        if s.repetition_penalty != 1.0:
            logits = torch.stack([_penalize(logits[i], self._seen(row, out[row]), s.repetition_penalty)
                                  for i, row in enumerate(rows)])
        if s.presence_penalty != 0.0 or s.frequency_penalty != 0.0:
            logits = torch.stack([_penalize_answer(logits[i], out[row], s.presence_penalty, s.frequency_penalty)
                                  for i, row in enumerate(rows)])
        if s.logit_bias:  # out of place: the caller's log-probs read the model's own logits
            ids, bias = zip(*s.logit_bias)
            logits = logits.index_add(1, torch.tensor(ids, device=logits.device),
                                      torch.tensor(bias, dtype=logits.dtype, device=logits.device).expand(
                                          logits.shape[0], -1))
        if s.greedy or s.temperature <= 0:
            return logits.argmax(-1)
        probs = _sampling_probs(logits, s)  # (b, V)
        if len(rows) == 1:  # one sequence (generate): no concatenation, one launch fewer a token
            return torch.multinomial(probs[0], 1, generator=self.generators[rows[0]])
        skip = torch.zeros(1, dtype=torch.long, device=self.device)  # a finished row's token, never read
        return torch.cat([skip if done[row] else torch.multinomial(probs[i], 1, generator=self.generators[row])
                          for i, row in enumerate(rows)])

    def _seen(self, row: int, new: list[int]) -> torch.Tensor:
        """Row's prompt and answer so far (n,), for the repetition penalty (only read when it is not 1)."""
        if not new:
            return self.prompts[row]
        return torch.cat([self.prompts[row], torch.tensor(new, dtype=torch.long, device=self.device)])


_log = logging.getLogger("ppalli.infer")
_SAID: set[str] = set()


def step_compiles(model, graph: bool | None = None, compile: bool = False) -> bool:
    """Whether decoding `model` runs a torch.compile'd step, as _decoder decides (asked for, the decode layers
    not taking over, a CUDA graph possible, compile_problem None). Callers fill a short last batch to full rows
    (generate_rows' fill_rows) only then, to reuse the compiled step: elsewhere the extra rows are only work."""
    if not compile or graph is False or decode_problem(model) is None:
        return False
    return graph_problem(model, _device(model)) is None and compile_problem(model) is None


def _decoder(model, device: torch.device, max_len: int, graph: bool | None, rows: int = 1, compile: bool = False):
    """The step function of `rows` sequences' decoding: from a CUDA graph where it is exact, else eager; with
    `compile`, the graph's step compiled first where compile_problem allows. (step_compiles answers the same
    question for callers ahead of the call: change the two together.)"""
    if compile and decode_problem(model) is None:
        _say_once(True, "decoding without torch.compile: ppalli's decode layers run this model faster uncompiled "
                  "(H200, Llama-3.1-8B from the graph: 177 tokens/s against 161 compiled, no 20-40 s compile)")
        compile = False
    if graph is False:
        _say_once(compile, "decoding without torch.compile: it compiles the graph's step, and the graph is off")
        return _Decoder(model)
    why = graph_problem(model, device, max_len)
    if why is None:
        problem = compile_problem(model) if compile else None
        if problem is None and compile:  # a compiled step's cache rounds up, which may pass a sliding window
            problem = graph_problem(model, device, compiled_slots(max_len))
        _say_once(problem, f"decoding without torch.compile: {problem}")
        decoder = StaticDecoder(model, max_len, device, graph=True, rows=rows, compile=compile and problem is None)
        _say_once(compile and problem is None, f"compiling the decode step for {rows} row(s) and {decoder.max_len} "
                  "cache slots at its first step (20-40 s; answers whose cache rounds to this size reuse it)")
        return decoder
    if graph:
        raise ValueError(f"graph decoding asked for, but {why}")
    _say_once(device.type == "cuda", f"decoding without a CUDA graph: {why}")
    _say_once(compile, f"decoding without torch.compile: it compiles the graph's step, and {why}")
    return _Decoder(model)


def _say_once(when, message: str) -> None:
    """Log `message` when `when` holds, once per message (not once per chat turn)."""
    if when and message not in _SAID:
        _SAID.add(message)
        _log.info(message)


def _layers(model, step):
    """ppalli's decode layers around the decoding (decode_layers.py), except under a compiled step: torch.compile
    fuses HF's layers itself and was not run over the swapped forward."""
    return decode_layers(model, enabled=not getattr(step, "compiled", False), log=lambda m: _say_once(True, m))
