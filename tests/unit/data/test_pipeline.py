"""prepare(): eval rows, the cache, parallel tokenization, streaming, mixing, objectives and stats."""

from __future__ import annotations

import json
import threading

import pytest

from ppalli.config import SourceConfig
from ppalli.data import tokenize
from ppalli.data.masking import IGNORE
from ppalli.data.pipeline import prepare
from ppalli.data.templates import resolve_template
from ppalli.data.tokenize import CHUNK, EncodeSettings, encode_stream, encode_texts, example_texts
from ppalli.errors import DataError

CHATBOT = "ko_chatbot_qa/ChatbotData.csv"


def _key(sample) -> tuple:
    return tuple(sample["input_ids"])


def test_eval_share_and_count_are_seeded(shared_data, make_cfg, qwen_tok):
    cfg = make_cfg(shared_data / CHATBOT, limit=200, eval_split=0.1)
    a, b = prepare(cfg, qwen_tok, seed=1), prepare(cfg, qwen_tok, seed=2)
    assert len(a.eval) == 20 and len(a.train) == 180
    assert {_key(s) for s in a.eval} != {_key(s) for s in b.eval}
    assert {_key(s) for s in a.train + a.eval} == {_key(s) for s in b.train + b.eval}
    counted = prepare(make_cfg(shared_data / CHATBOT, limit=200, eval_split=7), qwen_tok, seed=1)
    assert len(counted.eval) == 7


def test_eval_path(shared_data, make_cfg, qwen_tok, tmp_path):
    extra = tmp_path / "eval.jsonl"
    extra.write_text(json.dumps({"Q": "안녕", "A": "반가워"}, ensure_ascii=False) + "\n", encoding="utf-8")
    prepared = prepare(make_cfg(shared_data / CHATBOT, limit=30, eval_split=0.5, eval_path=str(extra)), qwen_tok,
                       seed=0)
    assert (len(prepared.train), len(prepared.eval)) == (30, 1)  # eval_path replaces the split


def test_cache_hit_equals_a_fresh_build_and_content_changes_miss(tmp_path, make_cfg, qwen_tok):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(20)),
                    encoding="utf-8")
    cfg = make_cfg(path, eval_split=0.2)
    fresh = prepare(cfg, qwen_tok, seed=3)
    cached = prepare(cfg, qwen_tok, seed=3)
    assert not fresh.stats["cached"] and cached.stats["cached"]
    assert (cached.train, cached.eval) == (fresh.train, fresh.eval)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    path.write_text(path.read_text(encoding="utf-8").replace("a19", "b19"), encoding="utf-8")
    assert not prepare(cfg, qwen_tok, seed=3).stats["cached"]
    assert not prepare(make_cfg(path, eval_split=0.2, max_seq_len=512), qwen_tok, seed=3).stats["cached"]


def test_process_pool_gives_the_same_samples(shared_data, make_cfg, qwen_tok, tmp_path, monkeypatch):
    one = prepare(make_cfg(shared_data / CHATBOT, limit=1200, num_proc=1), qwen_tok, seed=0)
    monkeypatch.setattr(tokenize, "SERIAL_S", 0.0)  # the pool after the first chunk, however fast this machine is
    # a second cache folder, so the pool really runs instead of reading the first result back
    two = prepare(make_cfg(shared_data / CHATBOT, limit=1200, num_proc=2, cache_dir=str(tmp_path / "other")),
                  qwen_tok, seed=0)
    assert not two.stats["cached"]
    assert one.train == two.train and one.stats["tokens"] == two.stats["tokens"]


def test_streaming_keeps_every_row_and_splits_by_hash(shared_data, make_cfg, qwen_tok):
    whole = prepare(make_cfg(shared_data / CHATBOT, limit=400, eval_split=0.25), qwen_tok, seed=5)
    streamed = prepare(make_cfg(shared_data / CHATBOT, limit=400, eval_split=0.25, streaming=True), qwen_tok, seed=5)
    assert sorted(map(_key, streamed.train + streamed.eval)) == sorted(map(_key, whole.train + whole.eval))
    assert 60 < len(streamed.eval) < 140  # about a quarter, drawn row by row


def test_sources_mix_by_weight(shared_data, make_cfg, qwen_tok):
    sources = [SourceConfig(path=str(shared_data / CHATBOT), weight=1.0),
               SourceConfig(path=str(shared_data / "ko_instruct_evol" / "evol_ko.jsonl"), weight=1.0)]
    prepared = prepare(make_cfg("", sources=sources), qwen_tok, seed=0)
    used = prepared.stats["mix_used"]
    assert prepared.stats["mix_ended_by"].endswith("evol_ko.jsonl") and used[1] == 476
    assert 0.8 < used[0] / used[1] < 1.25  # equal weights: about as many rows from each


def test_sft_on_preference_data_trains_the_chosen_answer(shared_data, make_cfg, qwen_tok):
    path = shared_data / "ko_preference_rlhf" / "step2_yitingxie_ko.jsonl"
    with open(path, encoding="utf-8") as f:
        chosen = json.loads(f.readline())["chosen"]
    (sample,) = prepare(make_cfg(path, limit=1), qwen_tok, seed=0).train
    assert qwen_tok.decode([t for t in sample["labels"] if t != IGNORE]) == chosen + "<|im_end|>"


def test_truncation_is_counted(shared_data, make_cfg, qwen_tok):
    prepared = prepare(make_cfg(shared_data / "ko_instruct_evol" / "evol_ko.jsonl", max_seq_len=400), qwen_tok,
                       seed=0)
    stats = prepared.stats
    assert stats["truncated"] > 0 and stats["dropped"] == 0 and stats["max_seq_len"] == 400
    assert max(len(s["input_ids"]) for s in prepared.train) == 400
    assert stats["rows_read"] == 476 == stats["samples_train"]
    assert 0 < stats["packing_efficiency"] <= 1 and stats["rows_per_s"] > 0


def test_text_format_trains_every_token_and_eos(tmp_path, make_cfg, llama2_tok):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "빨리 배우자."}, ensure_ascii=False) + "\n", encoding="utf-8")
    (sample,) = prepare(make_cfg(path), llama2_tok, seed=0).train
    assert sample["input_ids"][0] == llama2_tok.bos_token_id and sample["input_ids"][-1] == llama2_tok.eos_token_id
    assert sample["labels"] == [IGNORE] + sample["input_ids"][1:]


def test_system_prompt_and_template_choice(shared_data, make_cfg, qwen_tok):
    prepared = prepare(make_cfg(shared_data / CHATBOT, limit=1, template="chatml", system_prompt="반말 금지"),
                       qwen_tok, seed=0)
    text = qwen_tok.decode(prepared.train[0]["input_ids"])
    assert text.startswith("<|im_start|>system\n반말 금지<|im_end|>\n<|im_start|>user\n12시 땡!")
    assert prepared.template == "chatml" and "<|im_end|>" in prepared.stop_strings


@pytest.mark.parametrize("which", ["qwen_tok", "llama3_tok", "llama2_tok"])
def test_a_pool_worker_tokenizes_as_the_wrapper_does(which, request):
    """Workers get the fast tokenizer's Rust core (no transformers import in each worker): the same ids and
    character offsets as the wrapper's call, on texts the real templates render (special tokens, Korean, blanks)."""
    tok = request.getfixturevalue(which)
    tpl = resolve_template("chatml" if which == "llama2_tok" else "auto", tok)
    example = {"messages": [{"role": "system", "content": "반말 금지"},
                            {"role": "user", "content": "오늘 날씨 어때? 😀"},
                            {"role": "assistant", "content": " 맑아요.\n\n  끝\t"}], "where": "t line 1"}
    texts = [text for text, _ in example_texts(example, tpl, EncodeSettings(max_seq_len=512))] + ["", "  a  b "]
    kind, _ = tokenize._worker_tokenizer(tok)
    tokenize._init_worker(tokenize._worker_tokenizer(tok), tpl, EncodeSettings(max_seq_len=512))
    try:
        worker = tokenize._WORKER["tokenizer"]
        ids, offsets = encode_texts(worker, texts)
    finally:
        tokenize._WORKER.clear()
    want_ids, want_offsets = encode_texts(tok, texts)
    assert kind == "json" and ids == want_ids
    assert [list(map(tuple, o)) for o in offsets] == [list(map(tuple, o)) for o in want_offsets]


def test_small_data_never_starts_a_pool(shared_data, make_cfg, qwen_tok, tmp_path, monkeypatch):
    """Under SERIAL_S of work: encoded here, whatever num_proc says (a pool's start cost more than the work)."""
    def no_pool():
        raise AssertionError("a pool was started for data this small")

    monkeypatch.setattr(tokenize, "_context", no_pool)
    prepared = prepare(make_cfg(shared_data / CHATBOT, limit=600, num_proc=4), qwen_tok, seed=0)
    assert prepared.stats["samples_train"] == 600


def test_a_worker_error_shuts_the_pool_down_without_hanging(qwen_tok, monkeypatch):
    """20 chunks, so the pool's feeder thread is waiting for room when a chunk fails in a worker; the first chunk
    (encoded here before the pool) is good."""
    monkeypatch.setattr(tokenize, "SERIAL_S", 0.0)
    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
    sft = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [(False, {**(pair if i < CHUNK else sft), "where": f"f line {i}"}) for i in range(CHUNK * 20)]
    tpl = resolve_template("chatml", qwen_tok)
    outcome = {}

    def run():
        try:
            encode_stream(iter(rows), qwen_tok, tpl, EncodeSettings(max_seq_len=64, objective="dpo"), num_proc=2)
        except DataError as e:
            outcome["error"] = str(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "encode_stream hung after a worker error"
    assert f"f line {CHUNK}: train.objective 'dpo' needs preference data" in outcome["error"]


def test_the_default_pool_is_one_worker_a_core_but_one_and_at_most_eight(monkeypatch):
    """num_proc 0 leaves a core to the reader and stops at MAX_PROCS, where more workers measured slower (16-core H100
    host: pools of 8 and 15 workers 5.2 and 6.7 s over 94.6k rows); a number given is taken as it is."""
    for cores, want in ((1, 1), (2, 1), (5, 4), (16, tokenize.MAX_PROCS), (64, tokenize.MAX_PROCS)):
        monkeypatch.setattr(tokenize.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)), raising=False)
        assert tokenize.resolve_num_proc(0) == want
    assert tokenize.resolve_num_proc(12) == 12
