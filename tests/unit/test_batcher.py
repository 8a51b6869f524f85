"""`ppalli serve`'s batching (infer/batcher.py) on a tiny fp32 Llama: requests waiting together are decoded as
one batch, each answer as it is alone (its own limit, sampling, seed, stream); a batch out of memory steps down and
answers every request that had sent nothing yet."""

import json
import queue
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ppalli.demo.tokenizer import build_demo_tokenizer
from ppalli.infer import batcher as batching
from ppalli.infer.batcher import Batcher, Job
from ppalli.infer.generate import RowCancelled, generate

TEXTS = ["한국의 수도는 어디인가요?", "안녕", "What is 2 plus 3? Answer in one word please"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tok = build_demo_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return SimpleNamespace(model=LlamaForCausalLM(config).eval(), tokenizer=tok, stop_ids=[])


def _req(max_new_tokens: int, temperature: float = 0.0, seed: int | None = None, stop=()) -> dict:
    return {"messages": [], "max_new_tokens": max_new_tokens, "max_asked": True, "temperature": temperature,
            "top_p": 0.9, "greedy": temperature == 0.0, "seed": seed, "stop": list(stop)}


def _streamed(req: dict, ids: list[int]) -> Job:
    return Job(req, ids, 0, queue.SimpleQueue())


def _alone(run, ids: list[int], req: dict) -> list[int]:
    return generate(run.model, run.tokenizer, torch.tensor([ids]), max_new_tokens=req["max_new_tokens"],
                    temperature=req["temperature"] or 1.0, top_p=req["top_p"], greedy=req["greedy"],
                    seed=req["seed"], stop_ids=run.stop_ids)


def _texts(job: Job) -> list[str]:
    pieces = []
    while (item := job.texts.get_nowait())[1] is not None:
        pieces.append(item[1])
    return pieces


def test_waiting_requests_share_one_batch_and_answer_as_alone(run):
    ids = [run.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    reqs = [_req(4), _req(12), _req(9, temperature=0.9, seed=5)]
    batcher = Batcher(run, rows=8, start=False)
    jobs = [batcher.submit(_streamed(r, i) if k == 1 else Job(r, i)) for k, (r, i) in enumerate(zip(reqs, ids))]
    assert batcher.run_once() == 3 and batcher.sizes == [3]
    assert batcher.run_once() == 0  # nothing left waiting
    for job, req, prompt in zip(jobs, reqs, ids):
        assert job.finished.is_set() and job.error is None
        assert job.new == _alone(run, prompt, req) and len(job.new) == req["max_new_tokens"]
        assert job.finish_reason == "length"
    assert "".join(_texts(jobs[1])) == run.tokenizer.decode(jobs[1].new, skip_special_tokens=True)


def test_rows_beyond_the_batch_size_wait_for_the_next_batch(run):
    ids = run.tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    batcher = Batcher(run, rows=2, start=False)
    jobs = [batcher.submit(Job(_req(3), ids)) for _ in range(3)]
    assert [batcher.run_once(), batcher.run_once()] == [2, 1]
    assert jobs[0].new == jobs[1].new == jobs[2].new == _alone(run, ids, _req(3))


def test_a_streaming_client_that_left_ends_its_row_and_the_others_go_on(run):
    ids = [run.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:2]]
    batcher = Batcher(run, start=False)
    gone, stays = batcher.submit(_streamed(_req(12), ids[0])), batcher.submit(Job(_req(12), ids[1]))
    gone.left = True  # as the handler marks it when a write fails
    batcher.run_once()
    assert gone.finished.is_set() and len(gone.new) == 1  # its first token went nowhere and ended the row
    assert stays.new == _alone(run, ids[1], _req(12))


def test_a_batch_out_of_memory_halves_and_retries_the_requests_that_sent_nothing(run, monkeypatch, caplog):
    real = batching.generate_rows
    calls = []

    def tight(model, tokenizer, prompts, **kw):  # memory for one row only, as a GPU that is nearly full
        calls.append(len(prompts))
        if len(prompts) > 1:
            kw["on_text"][0] and kw["on_text"][0]("x")  # the streaming row had sent text before the OOM
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(batching, "generate_rows", tight)
    ids = [run.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    batcher = Batcher(run, rows=4, start=False)
    streamed = batcher.submit(_streamed(_req(5), ids[0]))
    quiet = [batcher.submit(Job(_req(5), i)) for i in ids[1:]]
    batcher.run_once()
    assert batcher.rows == 1 and "batches of at most 1" in caplog.text
    assert streamed.finished.is_set() and "out of GPU memory" in streamed.error  # it had begun: no retry
    while batcher.run_once():
        pass
    assert calls == [3, 1, 1]
    for job, prompt in zip(quiet, ids[1:]):
        assert job.error is None and job.new == _alone(run, prompt, _req(5))


def test_other_failures_reach_every_open_request(run, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("device-side assert triggered")

    monkeypatch.setattr(batching, "generate_rows", broken)
    batcher = Batcher(run, start=False)
    jobs = [batcher.submit(Job(_req(3), [5, 6])) for _ in range(2)]
    batcher.run_once()
    assert all(j.finished.is_set() and "device-side assert" in j.error for j in jobs) and batcher.rows == 8


def test_an_answer_without_max_tokens_gets_the_room_left_and_one_asking_past_it_is_refused(run):
    from ppalli.infer.serve import BadRequest, ChatServer, parse_request

    served = SimpleNamespace(run=SimpleNamespace(tokenizer=run.tokenizer, render_prompt=lambda m: m[-1]["content"]),
                             context=20)
    ids = run.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    ask = {"messages": [{"role": "user", "content": TEXTS[0]}]}
    req = parse_request(json.dumps(ask).encode(), max_new_tokens=512)
    assert ChatServer.prompt_ids(served, req, req["prompts"][0], True) == (ids, 20 - len(ids))
    req = parse_request(json.dumps({**ask, "max_tokens": 21 - len(ids)}).encode(), max_new_tokens=512)
    with pytest.raises(BadRequest, match=f"{len(ids)} tokens and max_tokens {21 - len(ids)}.*smaller max_tokens"):
        ChatServer.prompt_ids(served, req, req["prompts"][0], True)
    served.context = len(ids)  # no room at all: refused even without max_tokens
    req = parse_request(json.dumps(ask).encode(), max_new_tokens=512)
    with pytest.raises(BadRequest, match="shorter messages$"):
        ChatServer.prompt_ids(served, req, req["prompts"][0], True)
    text = parse_request(json.dumps({"prompt": TEXTS[0]}).encode(), max_new_tokens=512, chat=False)
    assert text["max_new_tokens"] == 16 and text["temperature"] == 1.0  # OpenAI's text completion defaults
    with pytest.raises(BadRequest, match="shorter prompt$"):
        ChatServer.prompt_ids(served, text, TEXTS[0], False)


def _feed(job: Job, pieces: list[str]) -> bool:
    """Text pieces into the job as a row's stream gives them; whether a stop string ended the row."""
    for piece in pieces:
        try:
            job.on_text(piece)
        except RowCancelled:
            return True
    return False


@pytest.mark.parametrize("pieces,stops,sent,answer", [
    (["안녕", "하세요 ", "Obs", "erv", "ation: x"], ["Observation:"], ["안녕", "하세요 "], "안녕하세요 "),
    (["a\n", "\nb"], ["\n\n", "b"], ["a"], "a"),  # the earliest stop string wins, even across pieces
    (["ab", "c", "d"], ["bcx", "cd"], ["a", "b"], "ab"),  # "bc" held back, ruled out by "d", then "cd" ends it
    (["Obs", "erved it"], ["Observation:"], ["Observed it"], "Observed it"),  # held back, then released at the end
])
def test_stop_strings_cut_the_answer_and_hold_back_what_may_begin_one(pieces, stops, sent, answer):
    job = Job(_req(50, stop=stops), [1], 0, queue.SimpleQueue())
    hit = _feed(job, pieces)
    job.end([7] * len(pieces))
    assert _texts(job) == sent and job.answer == answer
    assert job.hit == hit and job.finish_reason == "stop"


def test_a_stop_string_ends_its_row_in_the_batch_and_the_answer_before_it_is_returned(run):
    ids = run.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    free = run.tokenizer.decode(_alone(run, ids, _req(12)), skip_special_tokens=True)
    stop = free[len(free) // 2:len(free) // 2 + 2]  # two characters from the answer's middle
    batcher = Batcher(run, start=False)
    cut, whole = batcher.submit(Job(_req(12, stop=[stop]), ids)), batcher.submit(Job(_req(12), ids))
    batcher.run_once()
    assert cut.answer == free[:free.index(stop)] and cut.finish_reason == "stop" and len(cut.new) < 12
    assert run.tokenizer.decode(whole.new, skip_special_tokens=True) == free


def test_close_stops_the_batch_in_hand_and_ends_the_decoding_thread(run):
    """A thread that ran the model and is alive at interpreter exit can abort the process (exit 134)."""
    batcher = Batcher(run)
    job = batcher.submit(Job(_req(200), [5, 6, 7], 0, queue.SimpleQueue()))
    assert job.texts.get(timeout=60)[1] is not None  # decoding has begun
    batcher.close(timeout=60)
    assert not batcher.thread.is_alive() and batcher.run_once() == 0
    assert job.finished.is_set() and 0 < len(job.new) < 200 and job.error is None


def test_streamed_text_goes_with_the_tokens_it_completes():
    """A token whose text may begin a stop string is held back with it, and goes with the text that releases it;
    the tokens of a stop string that ends the answer never go out (the server's last chunk sends what the whole
    answer keeps of them)."""
    job = Job({**_req(10), "logprobs": 0}, [1], 0, queue.SimpleQueue())
    job.stops = ["ab"]
    with pytest.raises(RowCancelled):
        for token, piece in enumerate(["x", "ca", "d", "a", "b"]):
            job.scored.append((token, (-1.0, [])))  # as generate_rows does: a token's log-probs, then its text
            job.on_text(piece)
    sent = []
    while not job.texts.empty():
        _, text, scored = job.texts.get_nowait()
        sent.append((text, [t for t, _ in scored]))
    assert job.hit and job.answer == "xcad"
    # "ca"'s "a" might begin "ab": "c" went alone, token 1 with "ad" (its text whole); "a" and "b" went nowhere
    assert sent == [("x", [0]), ("c", []), ("ad", [1, 2])]
    assert job.scored_out == 3
