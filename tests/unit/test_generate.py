"""Generation: the own decode loop matches HF greedy decoding, stops, samples reproducibly, streams whole
characters; the chat loop and the prompt-file batch built on it."""

import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

from ppalli.demo.tokenizer import IM_END, build_demo_tokenizer
from ppalli.errors import DataError
from ppalli.infer.chat import chat_loop, fit_history, generate_batch, read_prompts
from ppalli.infer.generate import TextStream, generate, generate_greedy_rows

PROMPT = "한국의 수도는 어디인가요?"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_demo_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def prompt_ids(tok):
    return torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])


def _strip_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_hf_generate(model, tok, prompt_ids, penalty):
    ours = generate(model, tok, prompt_ids, max_new_tokens=30, greedy=True, repetition_penalty=penalty)
    hf = model.generate(prompt_ids, max_new_tokens=30, do_sample=False, repetition_penalty=penalty)
    want = _strip_eos(hf[0, prompt_ids.shape[1]:].tolist(), tok.eos_token_id)  # ours never returns the stop
    assert ours == want and len(ours) > 5


def test_stops_at_stop_ids_and_generation_config_eos(model, tok, prompt_ids):
    free = generate(model, tok, prompt_ids, max_new_tokens=20, greedy=True)
    assert len(free) == 20
    stop = free[5]  # greedy surely emits it again, at its first index
    expected = free[:free.index(stop)]
    assert generate(model, tok, prompt_ids, max_new_tokens=20, greedy=True, stop_ids=[stop]) == expected
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    assert generate(model, tok, prompt_ids, max_new_tokens=20, greedy=True) == expected


def test_sampling_is_on_by_default_and_seeded(model, tok, prompt_ids):
    greedy = generate(model, tok, prompt_ids, max_new_tokens=12, greedy=True)
    first = generate(model, tok, prompt_ids, max_new_tokens=12, seed=1)
    assert generate(model, tok, prompt_ids, max_new_tokens=12, seed=1) == first
    samples = [generate(model, tok, prompt_ids, max_new_tokens=12, seed=s) for s in range(4)]
    assert any(s != greedy for s in samples)
    assert len({tuple(s) for s in samples}) > 1


def test_narrowest_filters_reduce_to_greedy(model, tok, prompt_ids):
    greedy = generate(model, tok, prompt_ids, max_new_tokens=12, greedy=True)
    top_k = generate(model, tok, prompt_ids, max_new_tokens=12, top_k=1, top_p=1.0, temperature=1.5, seed=0)
    top_p = generate(model, tok, prompt_ids, max_new_tokens=12, top_p=1e-6, temperature=1.5, seed=0)
    assert top_k == greedy and top_p == greedy


def test_max_new_tokens_and_training_mode(model, tok, prompt_ids):
    model.train()
    assert generate(model, tok, prompt_ids, max_new_tokens=0) == []
    assert len(generate(model, tok, prompt_ids, max_new_tokens=7, greedy=True)) == 7
    assert model.training  # the caller's mode comes back


def test_stream_concatenation_equals_final_decode(model, tok, prompt_ids):
    pieces = []
    # temperature 1 over a random model: many byte tokens that split characters
    out = generate(model, tok, prompt_ids, max_new_tokens=60, temperature=1.0, top_p=1.0, seed=3,
                   on_token=pieces.append)
    assert "".join(pieces) == tok.decode(out, skip_special_tokens=True)
    assert len(pieces) > 10


class ScriptedModel(torch.nn.Module):
    """Emits a fixed token sequence: each step's logits put all mass on the next scripted id."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.script, self.vocab_size, self.calls = script, vocab_size, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives generate() a device

    def forward(self, input_ids, cache=None, use_cache=None, logits_to_keep=0):
        logits = torch.zeros(1, input_ids.shape[1], self.vocab_size)
        logits[0, -1, self.script[self.calls]] = 100.0
        self.calls += 1
        return SimpleNamespace(logits=logits)


def _byte_tokens(tok, text: str) -> list[int]:
    """One token per UTF-8 byte: every Hangul syllable spans three tokens."""
    mapped = "".join(piece for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text))
    return tok.convert_tokens_to_ids(list(mapped))


def test_korean_stream_never_emits_broken_characters(tok):
    text = "한국의 수도는 서울입니다."
    script = _byte_tokens(tok, text) + [tok.eos_token_id]
    assert tok.decode(script[:1]) == "\ufffd"  # the test's premise: a lone byte is half a syllable
    pieces = []
    out = generate(ScriptedModel(script, len(tok)), tok, torch.tensor([[0]]), greedy=True, on_token=pieces.append)
    assert out == script[:-1]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert 1 < len(pieces) < len(out)  # streamed, and bytes were held back until syllables completed


def test_text_stream_flushes_truly_broken_bytes(tok):
    pieces = []
    stream = TextStream(tok, pieces.append)
    for token in _byte_tokens(tok, "가나")[:-1]:  # the last syllable never completes
        stream.push(token)
    assert pieces == ["가"]
    stream.flush()
    assert "".join(pieces) == tok.decode(_byte_tokens(tok, "가나")[:-1])


def _render(tok):
    return lambda messages: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_chat_loop_keeps_history_resets_and_exits(model, tok):
    seen, printed = [], []
    render = _render(tok)
    inputs = iter(["안녕하세요", "두 번째", "/help", "/reset", "hi", "/exit", "never read"])
    history = chat_loop(model, tok, lambda m: seen.append(len(m)) or render(m), temperature=0.7, top_p=0.9,
                        max_new_tokens=4, greedy=True, input_fn=lambda _: next(inputs),
                        print_fn=lambda *a, **k: printed.append("".join(map(str, a))))
    assert seen == [1, 3, 1]  # the second turn saw the first turn and its answer; /reset emptied it
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "hi"
    assert "(history cleared)" in printed and any("unknown command /help" in p for p in printed)
    assert next(inputs) == "never read"


def test_chat_loop_with_tools_shows_calls_and_takes_their_results(model, tok, monkeypatch, tmp_path):
    """The answers scripted (a random model calls no tool): the first calls two tools, whose results are the next
    two lines; the model answers once both are in, and every prompt is rendered with the tools."""
    import json

    import ppalli.infer.chat as chat
    from ppalli.errors import DataError

    path = tmp_path / "tools.json"
    path.write_text(json.dumps([{"type": "function", "function": {"name": "get_weather"}}, {"name": "get_time"}]))
    tools = chat.read_tools(path)
    replies = iter(['<tool_call>{"name": "get_weather", "arguments": {"city": "서울"}}</tool_call>\n'
                    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "맑고 3시예요."])
    asked = []
    monkeypatch.setattr(chat, "_answer", lambda model, tok, render, messages, *a: asked.append(
        (render(messages), len(messages))) or next(replies))
    prompts, printed = [], []
    inputs = iter(["서울 날씨랑 시간?", "맑음", "15:00", "/exit"])
    history = chat_loop(model, tok, lambda m, tools=None: prompts.append(tools) or "p", input_fn=lambda p: (
        printed.append(p), next(inputs))[1], print_fn=lambda *a, **k: printed.append("".join(map(str, a))),
        tools=tools)
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c["function"]["name"] for c in history[1]["tool_calls"]] == ["get_weather", "get_time"]
    assert [m["content"] for m in history[2:]] == ["맑음", "15:00", "맑고 3시예요."]
    assert [n for _, n in asked] == [1, 4] and prompts == [tools, tools]  # answered after both results
    assert '(calls get_weather({"city": "서울"}))' in printed and "get_time result> " in printed
    path.write_text("[]")
    with pytest.raises(DataError, match="no function schemas"):
        chat.read_tools(path)


def test_chat_loop_leaves_on_end_of_input(model, tok):
    def eof(_):
        raise EOFError

    assert chat_loop(model, tok, _render(tok), input_fn=eof, print_fn=lambda *a, **k: None) == []


def test_fit_history_drops_oldest_turns(tok):
    render = _render(tok)
    messages = [{"role": r, "content": f"turn {i} " * 10} for i, r in enumerate(["user", "assistant"] * 3)]
    messages.append({"role": "user", "content": "last"})
    budget = len(tok(render(messages[-3:]), add_special_tokens=False)["input_ids"])
    ids, dropped = fit_history(tok, render, messages, budget)
    assert dropped == 2 and len(messages) == 3 and messages[-1]["content"] == "last"
    assert len(ids) <= budget


def test_generate_batch_writes_jsonl(model, tok, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPT}\n\nWhat is 2 plus 3?\n", encoding="utf-8")
    prompts = read_prompts(prompts_file)
    assert prompts == [PROMPT, "What is 2 plus 3?"]
    out = generate_batch(model, tok, _render(tok), prompts, tmp_path / "out" / "answers.jsonl", max_new_tokens=6,
                         greedy=True, stop_ids=[tok.convert_tokens_to_ids(IM_END)])
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == prompts  # Korean kept as is, not \u-escaped
    assert PROMPT in out.read_text(encoding="utf-8")
    rendered = _render(tok)([{"role": "user", "content": PROMPT}])
    ids = torch.tensor([tok(rendered, add_special_tokens=False)["input_ids"]])
    direct = generate(model, tok, ids, max_new_tokens=6, greedy=True, stop_ids=[tok.convert_tokens_to_ids(IM_END)])
    assert rows[0]["output"] == tok.decode(direct, skip_special_tokens=True) and rows[0]["new_tokens"] == len(direct)


def test_read_prompts_names_the_missing_file(tmp_path):
    with pytest.raises(DataError, match="prompts.txt"):
        read_prompts(tmp_path / "prompts.txt")


def test_greedy_rows_answer_as_each_row_alone(model, tok):
    """Left-padded rows of unequal length, one stopping early, against one generate call per row (fp32)."""
    texts = [PROMPT, "안녕", "What is 2 plus 3? Answer in one word please", "안녕하세요, 반갑습니다"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) == 4

    def alone(stops):
        return [generate(model, tok, torch.tensor([p]), max_new_tokens=12, greedy=True, stop_ids=stops)
                for p in prompts]

    stop = alone(None)[0][2]  # row 0's third token ends it: a row that stops while the others go on
    want = alone([stop])
    assert len(want[0]) == 2 and max(len(w) for w in want) == 12
    assert generate_greedy_rows(model, tok, prompts, max_new_tokens=12, stop_ids=[stop]) == want
    assert generate_greedy_rows(model, tok, prompts, max_new_tokens=0) == [[], [], [], []]


def test_generate_batch_answers_greedy_prompts_in_batches_as_each_alone(model, tok, tmp_path):
    texts = [PROMPT, "안녕", "What is 2 plus 3? Answer in one word please", "안녕하세요, 반갑습니다", "네"]
    stops = [tok.convert_tokens_to_ids(IM_END)]
    out = generate_batch(model, tok, _render(tok), texts, tmp_path / "a.jsonl", max_new_tokens=10, greedy=True,
                         stop_ids=stops, rows=2)  # batches of 2, 2 and 1
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == texts
    for text, row in zip(texts, rows):
        ids = torch.tensor([tok(_render(tok)([{"role": "user", "content": text}]), add_special_tokens=False)
                            ["input_ids"]])
        alone = generate(model, tok, ids, max_new_tokens=10, greedy=True, stop_ids=stops)
        assert row["output"] == tok.decode(alone, skip_special_tokens=True) and row["new_tokens"] == len(alone)
    assert rows[0]["seconds"] == rows[1]["seconds"]  # one batch, one time


def test_generate_batch_samples_prompt_i_with_seed_plus_i(model, tok, tmp_path):
    texts = [PROMPT, "안녕", "네"]
    out = generate_batch(model, tok, _render(tok), texts, tmp_path / "s.jsonl", max_new_tokens=8, seed=5)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    ids = torch.tensor([tok(_render(tok)([{"role": "user", "content": texts[2]}]), add_special_tokens=False)
                        ["input_ids"]])
    alone = generate(model, tok, ids, max_new_tokens=8, seed=7)
    assert rows[2]["output"] == tok.decode(alone, skip_special_tokens=True)


@pytest.mark.parametrize("sampling", [dict(greedy=True, repetition_penalty=1.3),
                                      dict(temperature=0.9, top_p=0.8, top_k=20, repetition_penalty=1.2),
                                      dict(temperature=1.0, top_p=1.0)], ids=["greedy-penalty", "sampled", "plain"])
def test_sampled_rows_draw_as_each_row_alone_with_its_seed(model, tok, sampling):
    from ppalli.infer.generate import Sampling, generate_rows

    texts = [PROMPT, "안녕", "What is 2 plus 3? Answer in one word please"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    s = Sampling(**sampling)
    rows = generate_rows(model, tok, prompts, max_new_tokens=12, sampling=s, seeds=[11, 12, 13])
    alone = [generate(model, tok, torch.tensor([p]), max_new_tokens=12, seed=seed, **sampling)
             for p, seed in zip(prompts, [11, 12, 13])]
    assert rows == alone and all(len(r) > 3 for r in rows)


def test_fill_rows_are_decoded_but_neither_returned_nor_waited_for(model, tok):
    from ppalli.infer.generate import Sampling, generate_rows

    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in (PROMPT, "안녕", "네")]
    for sampling, seeds in ((Sampling(greedy=True), None), (Sampling(temperature=0.9), [1, 2, 3])):
        plain = generate_rows(model, tok, prompts, max_new_tokens=10, sampling=sampling, seeds=seeds)
        filled = generate_rows(model, tok, prompts, max_new_tokens=10, sampling=sampling, seeds=seeds, fill_rows=6)
        assert filled == plain and len(filled) == 3
    stop = plain[2][0]  # the last prompt stops at once: its copies must not keep the batch going
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        short = generate_rows(model, tok, prompts[2:], max_new_tokens=10, sampling=Sampling(temperature=0.9),
                              seeds=[3], stop_ids=[stop], fill_rows=4)
    finally:
        hook.remove()
    assert short == [[]] and len(forwards) == 1  # the prompts' forward, no decode step


def test_short_batches_are_filled_only_where_the_step_is_compiled(model, tok, tmp_path, monkeypatch):
    """step_compiles follows _decoder: no compile asked, no graph, or the decode layers taking over the model
    (they run it uncompiled) -> no fill; generate_batch then passes fill_rows only for a compiled step."""
    from ppalli.infer import chat
    from ppalli.infer import generate as gen

    monkeypatch.setattr(gen, "graph_problem", lambda model, device: None)  # as on a GPU
    monkeypatch.setattr(gen, "compile_problem", lambda model: None)
    monkeypatch.setattr(gen, "decode_problem", lambda model: "an unmerged adapter")
    assert gen.step_compiles(model, compile=True)
    assert not gen.step_compiles(model, compile=False) and not gen.step_compiles(model, graph=False, compile=True)
    monkeypatch.setattr(gen, "compile_problem", lambda model: "no C compiler")
    assert not gen.step_compiles(model, compile=True)
    monkeypatch.setattr(gen, "compile_problem", lambda model: None)
    monkeypatch.setattr(gen, "decode_problem", lambda model: None)  # the decode layers take over
    assert not gen.step_compiles(model, compile=True)

    fills = []
    monkeypatch.setattr(chat, "generate_rows", lambda *a, fill_rows, **k: fills.append(fill_rows) or [[]] * len(a[2]))
    for compiles in (True, False):
        monkeypatch.setattr(chat, "step_compiles", lambda model, compile, compiles=compiles: compiles)
        chat.generate_batch(model, tok, lambda m: m[-1]["content"], ["a", "b", "c"], tmp_path / "out.jsonl",
                            compile=True, rows=2)
    assert fills == [2, 2, 0, 0]


def test_eval_answers_fill_only_for_a_compiled_step(monkeypatch):
    from types import SimpleNamespace

    from ppalli.eval import runner
    from ppalli.infer import generate as gen

    fills = []
    monkeypatch.setattr(gen, "generate_greedy_rows", lambda *a, fill_rows, **k: fills.append(fill_rows) or [[1]])
    run = SimpleNamespace(model=None, tokenizer=SimpleNamespace(decode=lambda ids, **k: " x "), stop_ids=[])
    for compiles in (True, False):
        monkeypatch.setattr(gen, "step_compiles", lambda model, compile, compiles=compiles: compiles)
        assert runner.answers(run, [[5]], 4, compile=True, rows=8) == ["x"]
    assert fills == [8, 0]


def test_rows_end_each_at_its_own_limit_and_report_as_they_end(model, tok):
    from ppalli.infer.generate import Sampling, generate_rows

    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in (PROMPT, "안녕", "네")]
    ended = []
    rows = generate_rows(model, tok, prompts, max_new_tokens=[6, 2, 0], sampling=[Sampling(greedy=True)] * 3,
                         on_end=lambda row, ids: ended.append((row, list(ids))))
    assert [len(r) for r in rows] == [6, 2, 0]
    assert ended == [(2, []), (1, rows[1]), (0, rows[0])]  # the empty one at once, then as each reaches its limit
    assert rows[0] == generate(model, tok, torch.tensor([prompts[0]]), max_new_tokens=6, greedy=True)
    with pytest.raises(ValueError, match="max_new_tokens: 2 values for 3 prompts"):
        generate_rows(model, tok, prompts, max_new_tokens=[1, 2])


def test_logit_bias_steers_greedy_and_sampled_rows_and_leaves_the_scores(model, tok):
    """A -100 bias on the token greedy decoding picks first bans it; +100 on another makes every step pick it (greedy
    or sampled); the log-probs reported stay the model's own."""
    from ppalli.infer.generate import Sampling, generate_rows

    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    plain = generate(model, tok, torch.tensor([prompt]), max_new_tokens=4, greedy=True)
    banned = Sampling(greedy=True, logit_bias=((plain[0], -100.0),))
    forced = Sampling(temperature=1.0, top_p=1.0, logit_bias=((7, 100.0),))
    scores = []
    rows = generate_rows(model, tok, [prompt] * 3, max_new_tokens=4, sampling=[banned, forced, Sampling(greedy=True)],
                         seeds=[0, 0, 0], top_logprobs=[0, 0, 0],
                         on_logprobs=lambda row, token, score: scores.append((row, token, score)))
    assert rows[0][0] != plain[0] and rows[1] == [7] * 4 and rows[2] == plain
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    row1 = next(score for row, token, score in scores if row == 1)
    assert row1[0] == pytest.approx(float(first[7]), abs=1e-4)  # the model's own, not the biased one


def test_presence_and_frequency_penalties_follow_openai_on_the_answer_only(model, tok):
    from ppalli.infer.generate import Sampling, _penalize_answer, generate_rows

    got = _penalize_answer(torch.zeros(5), [1, 1, 3], presence=0.5, frequency=0.25)
    assert got.tolist() == [0.0, -1.0, 0.0, -0.75, 0.0]  # the prompt's tokens are not counted: none passed
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in (PROMPT, "안녕")]
    s = Sampling(greedy=True, presence_penalty=0.7, frequency_penalty=0.4)
    rows = generate_rows(model, tok, prompts, max_new_tokens=30, sampling=[s, Sampling(greedy=True)])
    want = []  # the penalised row by hand: the whole sequence's forward each step, no cache
    with torch.no_grad():
        for _ in range(30):
            logits = model(torch.tensor([prompts[0] + want])).logits[0, -1]
            want.append(int(_penalize_answer(logits, want, 0.7, 0.4).argmax()))
    assert rows[0] == want and rows[1] == generate(model, tok, torch.tensor([prompts[1]]), max_new_tokens=30,
                                                   greedy=True)
    loops = generate(model, tok, torch.tensor([prompts[0]]), max_new_tokens=30, greedy=True)
    assert rows[0] != loops and len(set(loops)) < 30  # unpenalised, it loops (511, 1050, 511, 1050, ...)


def test_min_p_keeps_the_tokens_at_least_p_times_as_likely_as_the_top_one():
    import math

    from ppalli.infer.generate import Sampling, _min_p, _sampling_probs

    logits = torch.tensor([[0.0, math.log(0.5), math.log(0.1)], [math.log(0.3), 0.0, math.log(0.25)]])
    kept = torch.isfinite(_min_p(logits, 0.2))
    assert kept.tolist() == [[True, True, False], [True, True, True]]
    assert _min_p(logits, 0.0) is logits
    probs = _sampling_probs(logits, Sampling(temperature=1.0, top_p=1.0, min_p=0.4))
    assert probs[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0]) and probs[1, 2] == 0 and probs[1, 0] == 0
