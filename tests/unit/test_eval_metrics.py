"""Korean-aware ROUGE and exact match against hand-counted values and rouge_score's own tokenizer."""

import unicodedata

import pytest

pytest.importorskip("rouge_score")

from rouge_score import rouge_scorer as google  # noqa: E402
from rouge_score import tokenizers  # noqa: E402

from ppalli.eval import metrics as M  # noqa: E402

HYP, REF = "서울은 한국의 수도입니다", "서울은 한국의 수도이다"


def test_rouge_scores_default_tokenizer_reads_korean_as_nothing():
    """The failure this module exists for: rouge_score's default keeps [a-z0-9] only."""
    scores = google.RougeScorer(["rouge1"]).score(REF, HYP)
    assert scores["rouge1"].fmeasure == 0.0
    assert M.rouge(HYP, REF)["rouge1"] > 0


def test_word_unit_keeps_eojeol_whole():
    # words: 서울은 한국의 | 수도입니다 vs 수도이다 -> 2 of 3 unigrams, 1 of 2 bigrams, LCS 2
    r = M.rouge(HYP, REF, "word")
    assert r == pytest.approx({"rouge1": 2 / 3, "rouge2": 1 / 2, "rougeL": 2 / 3})


def test_syllable_unit_counts_by_hand():
    assert M.tokenize(HYP, "syllable") == list("서울은한국의수도입니다")
    # 11 and 10 syllables, 9 shared (서울은한국의수도 + 다): P 9/11, R 9/10
    # bigrams: 10 and 9, 7 shared (서울 울은 은한 한국 국의 의수 수도): F = 2*7 / (10 + 9)
    r = M.rouge(HYP, REF, "syllable")
    p, rec = 9 / 11, 9 / 10
    assert r["rouge1"] == pytest.approx(2 * p * rec / (p + rec))
    assert r["rouge2"] == pytest.approx(14 / 19)
    assert r["rougeL"] == pytest.approx(r["rouge1"])  # the shared syllables are in order


def test_particles_share_syllables_not_words():
    assert M.rouge("서울에서", "서울은", "word")["rouge1"] == 0.0
    assert M.rouge("서울에서", "서울은", "syllable")["rouge1"] == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))


@pytest.mark.parametrize("text", ["The cat sat on the mat.", "It's 10:30, and 3 cats_sat!", "GPU-RAM (80GB) x2"])
def test_word_unit_equals_rouge_scores_tokens_on_ascii(text):
    assert M.tokenize(text, "word") == tokenizers.DefaultTokenizer().tokenize(text)


def test_syllable_unit_keeps_latin_words_and_numbers_whole():
    tokens = M.tokenize("GPU 메모리 24GB, 東京です", "syllable")
    assert tokens == ["gpu", "메", "모", "리", "24gb", "東", "京", "で", "す"]


def test_decomposed_hangul_scores_like_composed():
    nfd = unicodedata.normalize("NFD", REF)
    assert nfd != REF
    assert M.tokenize(nfd, "syllable") == M.tokenize(REF, "syllable")
    assert M.rouge(nfd, REF, "word")["rouge1"] == 1.0


def test_exact_match_ignores_case_width_punctuation_and_spacing():
    assert M.exact_match(" 서울입니다. ", "서울입니다") == 1.0
    assert M.exact_match("ＡＢＣ  def!", "abc def") == 1.0
    assert M.exact_match("서울입니다", "서울이다") == 0.0


def test_empty_answer_scores_zero():
    assert M.rouge("", REF) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert M.exact_match("", REF) == 0.0


def test_score_pairs_and_means():
    rows = M.score_pairs([(REF, REF), ("", REF)])
    assert rows[0]["exact_match"] == 1.0 and rows[0]["syllable.rougeL"] == 1.0
    assert set(rows[0]) == {"exact_match"} | {f"{u}.{r}" for u in M.UNITS for r in M.ROUGE_TYPES}
    means = M.mean_scores(rows)
    assert means["word.rouge1"] == pytest.approx(0.5) and means["exact_match"] == pytest.approx(0.5)
    assert M.mean_scores([]) == {}


def test_unknown_unit_is_named():
    with pytest.raises(ValueError, match="unknown ROUGE unit 'morpheme'.*word, syllable"):
        M.rouge_scorer("morpheme")


def test_tool_call_scores_count_only_rows_whose_reference_calls():
    ref = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울", "unit": "c"}}\n</tool_call>'
    same = '<tool_call>{"arguments": {"unit": "c", "city": "서울"}, "name": "get_weather"}</tool_call>'  # reordered
    other_args = '<tool_call>{"name": "get_weather", "arguments": {"city": "부산"}}</tool_call>'
    llama = '{"name": "get_weather", "parameters": {"city": "서울", "unit": "c"}}'  # Llama 3.1's form
    rows = M.score_pairs([(same, ref), (other_args, ref), ("맑아요", ref), (llama, ref), ("맑아요", "맑아요")])
    assert [(r.get("tool_call.name_match"), r.get("tool_call.exact_match")) for r in rows] == [
        (1.0, 1.0), (1.0, 0.0), (0.0, 0.0), (1.0, 1.0), (None, None)]
    means = M.mean_scores(rows)
    assert means["tool_call.name_match"] == 0.75 and means["tool_call.exact_match"] == 0.5  # over the 4 calling rows
    assert means["exact_match"] == 0.2  # over all 5
