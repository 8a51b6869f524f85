"""Text metrics for generation eval: ROUGE that reads Korean, exact match, and their means over a set.

rouge_score (Google's reference implementation, what HF `evaluate` wraps) does the n-gram and LCS math;
its default tokenizer keeps only [a-z0-9] and so scores any Korean answer 0 (a test holds it to that).
We hand it our own tokenizer, in one of two units:

- "word": NFKC, lower case, runs of letters and digits in any script; a Korean word (eojeol) stays whole.
  On ASCII text it gives rouge_score's default tokens (a test holds the two equal).
- "syllable": the same, but every Hangul syllable and every Han or kana character is a token of its own.
  Korean glues particles and endings to words, so as words "서울에서" and "서울은" share nothing; as
  syllables they share two of three. Latin words and numbers stay whole.

NFKC also composes decomposed jamo (text saved on macOS is often NFD), so both spellings of one
syllable score as one.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

from ppalli.errors import PpalliError

UNITS = ("word", "syllable")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

_WORD = re.compile(r"[^\W_]+")
# one token each: Hangul syllables, CJK ideographs (incl. extension A), hiragana and katakana
_CJK = "\uac00-\ud7a3\u3400-\u4dbf\u4e00-\u9fff\u3040-\u30ff"
_SYLLABLE = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


def tokenize(text: str, unit: str = "word") -> list[str]:
    if unit not in UNITS:
        raise ValueError(f"unknown ROUGE unit {unit!r}; choose one of {', '.join(UNITS)}")
    return (_WORD if unit == "word" else _SYLLABLE).findall(normalize(text))


class UnitTokenizer:
    """What rouge_score's RougeScorer(tokenizer=...) calls: `tokenize(text) -> list[str]`."""

    def __init__(self, unit: str):
        tokenize("", unit)  # checks the unit now, not at the first score
        self.unit = unit

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.unit)


def rouge_scorer(unit: str = "word"):
    """A RougeScorer for ROUGE-1, -2 and -L in `unit`, without stemming (Porter's stemmer is English-only)."""
    try:
        from rouge_score.rouge_scorer import RougeScorer
    except ImportError:
        raise PpalliError("ROUGE needs the rouge-score package: pip install 'ppalli[eval]' (or rouge-score)") from None
    return RougeScorer(list(ROUGE_TYPES), use_stemmer=False, tokenizer=UnitTokenizer(unit))


def rouge(prediction: str, reference: str, unit: str = "word", scorer=None) -> dict[str, float]:
    """F-measures {rouge1, rouge2, rougeL} of one prediction against one reference (0 when either is empty)."""
    scores = (scorer or rouge_scorer(unit)).score(reference, prediction)  # rouge_score's order: target first
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two are the same words after NFKC, lower case, punctuation and spacing removed."""
    return float(tokenize(prediction) == tokenize(reference))


def score_pairs(pairs: Sequence[tuple[str, str]], units: Iterable[str] = UNITS) -> list[dict[str, float]]:
    """Per-pair scores for (prediction, reference) pairs: exact_match and `<unit>.<rouge type>` for each unit, and
    where the reference calls tools, `tool_call.*` (tool_call_scores)."""
    scorers = {u: rouge_scorer(u) for u in units}
    rows = []
    for prediction, reference in pairs:
        row = {"exact_match": exact_match(prediction, reference)}
        for unit, scorer in scorers.items():
            for name, value in rouge(prediction, reference, unit, scorer).items():
                row[f"{unit}.{name}"] = value
        rows.append(row | tool_call_scores(prediction, reference))
    return rows


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the rows that have it (the corpus figure papers report for ROUGE F-measures; the
    tool-call scores over the rows whose reference calls a tool)."""
    names = dict.fromkeys(k for r in rows for k in r)
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in names}


def tool_call_scores(prediction: str, reference: str) -> dict[str, float]:
    """For a reference that calls tools (data/tools.py reads `<tool_call>` blocks or one JSON call):
    tool_call.name_match, 1.0 when the prediction calls the same functions in the same order, and
    tool_call.exact_match, when their arguments are equal too (as JSON objects: key order and spacing aside).
    Empty for a reference without calls."""
    from ppalli.data.tools import calls_in_answer

    want = calls_in_answer(reference)[1]
    if not want:
        return {}
    got = calls_in_answer(prediction)[1]
    names = [c["function"]["name"] for c in got] == [c["function"]["name"] for c in want]
    return {"tool_call.name_match": float(names),
            "tool_call.exact_match": float(names and [c["function"] for c in got] == [c["function"] for c in want])}
