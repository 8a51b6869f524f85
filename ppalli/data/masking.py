"""Labels from character segments and token offsets.

The rendered text is tokenized once, as a whole, with offsets; segment boundaries are character positions, and

    a token is trained when the first character of its span lies inside a trained segment.

Why this rule: tokenizing the prompt and the response separately gives ids the model never sees at inference
(the BPE merges at the seam differ), so the text is tokenized once and the boundary is read from offsets, never
from string search on tokens. A token that straddles the boundary (a prompt's trailing space merged with the
response's first word) therefore goes with the prompt and is not trained; a Hangul syllable that byte-level BPE
splits over several tokens gives all of them the same start, so they always share one label. Built-in templates
end prompts on a newline or a special token, where no merge straddles.

Labels follow the HF convention (CONTRACTS.md): labels[t] = input_ids[t] where trained, else -100, and the loss
shifts them. labels[0] is always -100: a sample's first token has no previous token to predict it from, and a
packed batch must not learn to predict it from the previous sample's end.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

IGNORE = -100


def join_segments(segments: list[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]]]:
    """The text to tokenize and its trained character ranges [start, end), adjacent ones merged."""
    parts, ranges, pos = [], [], 0
    for text, trained in segments:
        end = pos + len(text)
        if trained and text:
            if ranges and ranges[-1][1] == pos:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((pos, end))
        parts.append(text)
        pos = end
    return "".join(parts), ranges


def trained_spans(offsets: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token index ranges [lo, hi) whose first characters lie in the trained character ranges.

    Token starts never decrease, so each character range maps to one contiguous token range found by bisection:
    O(ranges * log tokens) instead of a Python step per token.
    """
    starts = [start for start, _ in offsets]
    spans = []
    for begin, end in ranges:
        lo, hi = bisect.bisect_left(starts, begin), bisect.bisect_left(starts, end)
        if hi > lo:
            spans.append((lo, hi))
    return spans


@dataclass(frozen=True, slots=True)
class Labeled:
    input_ids: list[int]
    labels: list[int]
    trained: int  # tokens with a label
    prompt_len: int  # tokens before the first trained one (the whole length when none is trained)
    full_len: int  # tokens before truncation
    truncated: bool


def label_tokens(ids: list[int], offsets: list[tuple[int, int]], ranges: list[tuple[int, int]],
                 max_len: int) -> Labeled:
    """Labels for one tokenized text, truncated to max_len tokens (the end is cut: prompts come first)."""
    n = min(len(ids), max_len)
    labels = [IGNORE] * n
    trained, first = 0, len(ids)
    for lo, hi in trained_spans(offsets, ranges):
        lo = max(lo, 1)  # position 0 never carries a label
        if hi <= lo:
            continue
        first = min(first, lo)
        kept = min(hi, n)  # truncation cuts the end
        if kept > lo:
            labels[lo:kept] = ids[lo:kept]
            trained += kept - lo
    return Labeled(list(ids[:n]), labels, trained, first, len(ids), len(ids) > max_len)


def answer_spans(sample: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) for each run of trained labels, in order: the tokens before it (the conversation
    up to that answer, earlier answers as the sample holds them) and the run. A preference sample's are its chosen
    answer's."""
    prefix = "chosen_" if "chosen_input_ids" in sample else ""
    ids, labels = sample[f"{prefix}input_ids"], sample[f"{prefix}labels"]
    spans, at = [], 0
    while (start := next((i for i in range(at, len(labels)) if labels[i] != IGNORE), None)) is not None:
        at = next((i for i in range(start, len(labels)) if labels[i] == IGNORE), len(labels))
        spans.append((list(ids[:start]), list(labels[start:at])))
    return spans


def prompt_and_reference(sample: dict) -> tuple[list[int], list[int]] | None:
    """The first of answer_spans (the prompt training conditioned the first answer on), or None when the sample
    trains no token."""
    spans = answer_spans(sample)
    return spans[0] if spans else None
