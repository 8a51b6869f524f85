"""The data stage: read -> normalize -> render -> tokenize -> mask, with eval split, stats and a cache.

`prepare` is the builder between the config and the data modules: it reads DataConfig and passes plain values on.

Eval rows: with data.eval_path, that file; else data.eval_split, a share (0 < x < 1) or a row count (>= 1) of
the rows, drawn with the seed. With data.streaming the rows are never all held, so a share is drawn row by row
(a seeded hash of the row's index, so about that share) and a count takes the first rows.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ppalli.data import cache
from ppalli.data.collate import pack_samples
from ppalli.data.formats import check_format_name, normalize_rows
from ppalli.data.sources import Mix, read_rows, source_kind
from ppalli.data.templates import Template, resolve_template
from ppalli.data.tokenize import EncodeSettings, EncodeStats, encode_stream
from ppalli.errors import DataError

log = logging.getLogger("ppalli.data")


@dataclass(frozen=True)
class SourceSpec:
    path: str
    weight: float = 1.0
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    split: str = "train"


@dataclass
class Prepared:
    train: list[dict]
    eval: list[dict]
    stats: dict
    template: str  # name of the template used: a built-in, "model" (the tokenizer's own) or "custom"
    stop_strings: list[str]  # strings that end a trained response: generation should stop on each


class BadRows:
    """Skipped rows under skip_bad_rows: counted, with the first few messages kept for the report."""

    def __init__(self, keep: int = 5):
        self.count, self.keep, self.examples = 0, keep, []

    def append(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(message)


# --------------------------------------------------------------------------- sources and examples


def source_specs(data_cfg) -> list[SourceSpec]:  # noqa: ANN001 - DataConfig
    """The sources to read: data.sources, else data.path; per-source format/columns fall back to data's."""
    check_format_name(data_cfg.format)
    if not data_cfg.sources:
        return [SourceSpec(_resolve_path(data_cfg.path), 1.0, data_cfg.format, dict(data_cfg.columns))]
    specs = []
    for i, src in enumerate(data_cfg.sources):
        if not src.path:
            raise DataError(f"data.sources[{i}].path: empty; give a data file, folder or hub id")
        check_format_name(src.format)
        specs.append(SourceSpec(_resolve_path(src.path), src.weight,
                                src.format if src.format != "auto" else data_cfg.format,
                                dict(src.columns or data_cfg.columns), src.split))
    return specs


def _resolve_path(path: str) -> str:
    if path == "demo":
        try:
            from ppalli.demo import demo_data_file
        except ImportError:
            raise DataError("data.path is 'demo' but this build has no demo data; give a data file") from None
        return str(demo_data_file())
    if not path:
        raise DataError("data.path: empty; give a data file (.jsonl, .json, .csv, .tsv, .parquet), a folder or "
                        "a hub id")
    return path


def iter_examples(specs: list[SourceSpec], *, seed: int, streaming: bool, bad: BadRows | None = None,
                  counter: list[int] | None = None) -> Mix:
    """Normalized examples of all sources, mixed by weight; iterate the returned Mix, then read its `used`."""
    streams = [normalize_rows(read_rows(s.path, split=s.split, streaming=streaming), s.format, s.columns, bad,
                              counter) for s in specs]
    return Mix(streams, [s.weight for s in specs], seed)


def _unit(seed: int, index: int) -> float:
    """A uniform number in [0, 1) from (seed, index): splitmix64, so a row's split never depends on the others."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) / 2**64


def tag_eval(examples: Iterator[dict], eval_split: float, seed: int, streaming: bool) -> Iterator[tuple[bool, dict]]:
    """(is_eval, example) pairs for data.eval_split."""
    if eval_split <= 0:
        return ((False, ex) for ex in examples)
    if streaming:
        if eval_split >= 1:
            return ((i < int(eval_split), ex) for i, ex in enumerate(examples))
        return ((_unit(seed, i) < eval_split, ex) for i, ex in enumerate(examples))
    rows = list(examples)
    n_eval = int(eval_split) if eval_split >= 1 else round(eval_split * len(rows))
    if eval_split < 1 and n_eval == 0 and len(rows) >= 2:
        n_eval = 1  # a share asked for must give at least one eval row
    if n_eval >= len(rows):
        raise DataError(f"data.eval_split: {eval_split:g} holds out {n_eval} of {len(rows)} rows, leaving none to "
                        "train on; lower it (e.g. 0.05) or set 0")
    chosen = set(random.Random(seed).sample(range(len(rows)), n_eval))
    return ((i in chosen, ex) for i, ex in enumerate(rows))


# --------------------------------------------------------------------------- prepare


def settings_of(data_cfg, objective: str) -> EncodeSettings:  # noqa: ANN001
    return EncodeSettings(max_seq_len=data_cfg.max_seq_len, train_on=data_cfg.train_on,
                          system_prompt=data_cfg.system_prompt, objective=objective,
                          skip_bad_rows=data_cfg.skip_bad_rows)


def prepare(data_cfg, tokenizer, *, seed: int, objective: str = "sft") -> Prepared:  # noqa: ANN001
    """Read, normalize, render, tokenize and mask the data of a DataConfig; cached by content hash."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"tokenizer {tokenizer.name_or_path}: ppalli needs a fast tokenizer (offsets locate "
                        "responses); load it with ppalli.models.tokenizer.load_tokenizer")
    specs = source_specs(data_cfg)
    tpl = resolve_template(data_cfg.template, tokenizer)
    settings = settings_of(data_cfg, objective)
    key, cache_dir = _cache_entry(data_cfg, specs, tokenizer, tpl, settings, seed)
    hit = cache.load(cache_dir, key) if key else None
    if hit is not None:
        train, evals, stats = hit
        log.info("tokenized data from the cache (%d train, %d eval samples)", len(train), len(evals))
        return Prepared(train, evals, {**stats, "cached": True}, tpl.name, list(tpl.stops))
    train, evals, stats = _build(data_cfg, specs, tokenizer, tpl, settings, seed)
    if key:
        cache.save(cache_dir, key, train, evals, stats)
    return Prepared(train, evals, {**stats, "cached": False}, tpl.name, list(tpl.stops))


def _cache_entry(data_cfg, specs, tokenizer, tpl: Template, settings: EncodeSettings,  # noqa: ANN001
                 seed: int) -> tuple[str | None, Path]:
    cache_dir = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else cache.default_cache_dir()
    paths = [s.path for s in specs] + ([data_cfg.eval_path] if data_cfg.eval_path else [])
    if data_cfg.streaming or any(source_kind(p) == "hub" for p in paths):
        return None, cache_dir  # no content to hash without reading it all (streamed) or downloading it (hub)
    parts = {
        "files": [cache.file_digest(p) for p in paths],
        "sources": [vars(s) for s in specs],
        "tokenizer": cache.tokenizer_digest(tokenizer),
        "template": [tpl.source, tpl.variables, tpl.stops, tpl.appends_eos],
        "settings": vars(settings),
        "data": {k: getattr(data_cfg, k) for k in ("eval_split", "limit", "format", "columns")},
        "seed": seed,
    }
    return cache.cache_key(parts), cache_dir


def _build(data_cfg, specs, tokenizer, tpl: Template, settings: EncodeSettings,  # noqa: ANN001
           seed: int) -> tuple[list[dict], list[dict], dict]:
    start = time.perf_counter()  # rows/s covers reading and normalizing too, not only tokenizing
    bad = BadRows() if data_cfg.skip_bad_rows else None
    counter = [0]
    mix = iter_examples(specs, seed=seed, streaming=data_cfg.streaming, bad=bad, counter=counter)
    examples = iter(mix)
    if data_cfg.limit is not None:
        examples = itertools.islice(examples, data_cfg.limit)
    if data_cfg.eval_path:
        eval_spec = SourceSpec(data_cfg.eval_path, 1.0, data_cfg.format, dict(data_cfg.columns))
        eval_examples = iter_examples([eval_spec], seed=seed, streaming=data_cfg.streaming, bad=bad)
        tagged = itertools.chain(((False, ex) for ex in examples), ((True, ex) for ex in eval_examples))
    else:
        tagged = tag_eval(examples, data_cfg.eval_split, seed, data_cfg.streaming)
    train, evals, enc = encode_stream(tagged, tokenizer, tpl, settings, data_cfg.num_proc)
    seconds = time.perf_counter() - start
    stats = _stats(specs, counter[0], bad, enc, mix, train, evals, seconds, settings, tpl)
    _check_usable(train, stats, enc, settings)
    _log_stats(stats)
    return train, evals, stats


def _stats(specs, rows_read: int, bad: BadRows | None, enc: EncodeStats, mix: Mix, train: list, evals: list,
           seconds: float, settings: EncodeSettings, tpl: Template) -> dict:  # noqa: ANN001
    sft = bool(train) and "input_ids" in train[0]
    packing = pack_samples(train, settings.max_seq_len).efficiency if sft else None
    bad_examples = (bad.examples if bad else []) + enc.bad_examples
    stats = {
        "rows_read": rows_read,
        "rows_bad": (bad.count if bad else 0) + enc.bad,
        "bad_rows": bad_examples[:5],
        "samples_train": len(train),
        "samples_eval": len(evals),
        "truncated": enc.truncated,
        "dropped": enc.dropped,
        "tokens": enc.tokens,
        "trained_tokens": enc.trained_tokens,
        "longest_prompt": enc.longest_prompt,
        "max_seq_len": settings.max_seq_len,
        "seconds": round(seconds, 3),
        "rows_per_s": round(enc.rows / seconds, 1) if seconds > 0 else None,
        "packing_efficiency": round(packing, 4) if packing is not None else None,
        "template": tpl.name,
        "sources": [s.path for s in specs],
    }
    if len(specs) > 1:
        stats["mix_used"] = list(mix.used)
        stats["mix_ended_by"] = specs[mix.ended_by].path if mix.ended_by is not None else None
    return stats


def _check_usable(train: list, stats: dict, enc: EncodeStats, settings: EncodeSettings) -> None:
    if train:
        return
    if stats["rows_bad"] and stats["rows_bad"] >= stats["rows_read"]:
        first = stats["bad_rows"][0] if stats["bad_rows"] else ""
        raise DataError(f"no usable rows: all {stats['rows_read']} rows were bad (first: {first})")
    if enc.dropped:
        raise DataError(f"every sample was dropped: data.max_seq_len is {settings.max_seq_len} tokens but the "
                        f"longest prompt is {enc.longest_prompt} tokens, so no response token fits; raise "
                        f"data.max_seq_len above the prompt lengths or shorten the prompts")
    raise DataError(f"no training samples left from {', '.join(stats['sources'])} (eval took "
                    f"{stats['samples_eval']}); add rows or lower data.eval_split")


def _log_stats(stats: dict) -> None:
    log.info("data: %d rows read, %d train / %d eval samples, %d tokens (%d trained), %s rows/s",
             stats["rows_read"], stats["samples_train"], stats["samples_eval"], stats["tokens"],
             stats["trained_tokens"], stats["rows_per_s"])
    if stats["rows_bad"]:
        log.warning("skipped %d bad rows (data.skip_bad_rows), first: %s", stats["rows_bad"],
                    "; ".join(stats["bad_rows"][:3]))
    if stats["truncated"] or stats["dropped"]:
        log.warning("%d samples truncated to data.max_seq_len=%d, %d dropped (no response token left)",
                    stats["truncated"], stats["max_seq_len"], stats["dropped"])
