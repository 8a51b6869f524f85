"""`ppalli data preview`: rendered samples with trained text highlighted, lengths, truncation and packing.

Spans are runs of tokens with the same label, cut from the rendered text at token start offsets. Offsets are
character positions, so a span never splits a Hangul syllable even where byte-level BPE splits one character
over several tokens (those tokens share one start and so one label), and the text shown is exactly the text
trained on, with no decode artifacts around special tokens or SentencePiece spaces.
"""

from __future__ import annotations

import itertools
import math

from rich.markup import escape

from ppalli.data.masking import IGNORE, Labeled, label_tokens
from ppalli.data.pipeline import BadRows, iter_examples, prepare, settings_of, source_specs
from ppalli.data.templates import resolve_template
from ppalli.data.tokenize import encode_texts, example_texts

HISTOGRAM_BINS = 10


def preview(data_cfg, tokenizer, n: int = 3, *, seed: int = 42, objective: str = "sft") -> dict:  # noqa: ANN001
    """The first n examples as highlighted spans, plus stats of the whole prepared data (through the cache)."""
    prepared = prepare(data_cfg, tokenizer, seed=seed, objective=objective)
    tpl = resolve_template(data_cfg.template, tokenizer)
    settings = settings_of(data_cfg, objective)
    examples = iter_examples(source_specs(data_cfg), seed=seed, streaming=True,
                             bad=BadRows() if data_cfg.skip_bad_rows else None)
    samples = []
    for example in itertools.islice(examples, n):
        pieces = example_texts(example, tpl, settings)
        names = ["sample"] if len(pieces) == 1 else ["chosen", "rejected"]
        samples.append({"where": example["where"],
                        "texts": [_text_view(name, text, ranges, tokenizer, settings.max_seq_len)
                                  for name, (text, ranges) in zip(names, pieces)]})
    lengths = [n for s in prepared.train + prepared.eval for n in _answer_lengths(s)]
    return {"template": prepared.template, "stop_strings": prepared.stop_strings, "stats": prepared.stats,
            "samples": samples, "lengths": length_summary(lengths, data_cfg.max_seq_len)}


def _answer_lengths(sample: dict) -> list[int]:
    """Sequence lengths: one per SFT sample, chosen and rejected each for a pair (each is cut to max_seq_len)."""
    if "input_ids" in sample:
        return [len(sample["input_ids"])]
    return [len(sample["chosen_input_ids"]), len(sample["rejected_input_ids"])]


def _text_view(name: str, text: str, ranges: list, tokenizer, max_len: int) -> dict:  # noqa: ANN001
    (ids,), (offsets,) = encode_texts(tokenizer, [text])
    labeled = label_tokens(ids, offsets, ranges, max_len)
    return {"name": name, "tokens": len(labeled.input_ids), "trained": labeled.trained,
            "cut_tokens": labeled.full_len - len(labeled.input_ids), "dropped": labeled.trained == 0,
            "spans": spans(text, offsets, labeled)}


def spans(text: str, offsets: list[tuple[int, int]], labeled: Labeled) -> list[dict]:
    """Runs of equally labeled kept tokens as {"text", "trained"}, cut at token start offsets.

    offsets cover every token, the cut ones included: when truncation keeps only some of the byte tokens of a
    character, the first cut token starts inside the last kept one's character, and the shown text ends before
    that character rather than show bytes that were not kept.
    """
    kept = len(labeled.input_ids)
    if not kept:
        return []
    end_of_kept = min(offsets[kept - 1][1], offsets[kept][0]) if kept < len(offsets) else len(text)
    runs, start = [], 0
    for _, group in itertools.groupby(range(kept), key=lambda t: labeled.labels[t] != IGNORE):
        members = list(group)
        after = members[-1] + 1
        end = min(offsets[after][0] if after < kept else end_of_kept, end_of_kept)
        if end > start:
            runs.append({"text": text[start:end], "trained": labeled.labels[members[0]] != IGNORE})
        start = max(start, end)
    return runs


def length_summary(lengths: list[int], max_seq_len: int) -> dict:
    if not lengths:
        return {"count": 0, "min": 0, "mean": 0, "max": 0, "histogram": []}
    width = max(1, math.ceil(max_seq_len / HISTOGRAM_BINS))
    counts = [0] * HISTOGRAM_BINS
    for n in lengths:
        counts[min((n - 1) // width, HISTOGRAM_BINS - 1)] += 1
    bins = [{"lo": i * width + 1, "hi": min((i + 1) * width, max_seq_len), "count": c} for i, c in enumerate(counts)]
    return {"count": len(lengths), "min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1),
            "max": max(lengths), "histogram": bins}


def format_preview(view: dict) -> str:
    """Rich markup: trained text bold green, context (no loss) dim; then lengths and counts."""
    lines = [f"[bold]template[/bold] {escape(view['template'])}   [bold]stops[/bold] "
             f"{escape(', '.join(view['stop_strings']))}",
             "[bold green]trained[/bold green]  [dim]context (no loss)[/dim]", ""]
    for i, sample in enumerate(view["samples"], start=1):
        for t in sample["texts"]:
            cut = f", {t['cut_tokens']} cut by max_seq_len" if t["cut_tokens"] else ""
            cut += " [red](dropped: no response token fits)[/red]" if t["dropped"] else ""
            lines.append(f"[bold]#{i} {t['name']}[/bold] {escape(sample['where'])}: {t['tokens']} tokens, "
                         f"{t['trained']} trained{cut}")
            lines.append("".join(f"[bold green]{escape(s['text'])}[/bold green]" if s["trained"]
                                 else f"[dim]{escape(s['text'])}[/dim]" for s in t["spans"]))
            lines.append("")
    return "\n".join(lines + _histogram_lines(view["lengths"]) + _stats_lines(view["stats"]))


def _histogram_lines(lengths: dict) -> list[str]:
    lines = [f"[bold]lengths[/bold] {lengths['count']} samples, min {lengths['min']}, mean {lengths['mean']}, "
             f"max {lengths['max']} tokens"]
    top = max((b["count"] for b in lengths["histogram"]), default=0)
    for b in lengths["histogram"]:
        bar = "█" * (round(40 * b["count"] / top) if top else 0)
        lines.append(f"  {b['lo']:>6}-{b['hi']:<6} {bar} {b['count']}")
    return lines


def _stats_lines(stats: dict) -> list[str]:
    eff = stats.get("packing_efficiency")
    packing = f", packing efficiency {eff:.1%}" if eff is not None else ""
    lines = [f"[bold]rows[/bold] {stats['rows_read']} read, {stats['rows_bad']} bad, {stats['truncated']} "
             f"truncated, {stats['dropped']} dropped (max_seq_len {stats['max_seq_len']}){packing}"]
    lines += [f"  [yellow]skipped[/yellow] {escape(m)}" for m in stats.get("bad_rows", [])]
    return lines
