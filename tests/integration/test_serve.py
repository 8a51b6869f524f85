"""`ppalli serve`: a tiny trained Qwen2 run behind the OpenAI-compatible API, spoken to over HTTP (urllib, and the
openai client when installed): answers equal `generate`'s, streamed text equals the whole answer, bad requests
get a 400 naming the field."""

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch
import xgrammar
from tiny import tiny_run_config

from ppalli.infer.generate import generate
from ppalli.infer.serve import ChatServer
from ppalli.models.load import load_run
from ppalli.train import recipe

QUESTION = [{"role": "user", "content": "오늘 뭐 먹지?"}]
TEXT = "/v1/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("serve")  # one trained run for the module (make_cfg is per test)
    cfg = tiny_run_config(tmp, shared_data, "qwen2", name="served", train__max_steps=2,
                          logging__sample_max_new_tokens=1)
    run_dir = recipe.train(cfg, print_fn=lambda *a, **k: None).run_dir
    run = load_run(run_dir, merge=True)
    srv = ChatServer(("127.0.0.1", 0), run, "served", max_new_tokens=16)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _post(url: str, payload, route: str = "/v1/chat/completions") -> tuple[int, bytes]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(url + route, data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_greedy_answer_is_generates_and_stream_is_the_same_text(server):
    srv, url = server
    run = srv.run
    ids = run.tokenizer(run.render_prompt(QUESTION), add_special_tokens=False)["input_ids"]
    want = generate(run.model, run.tokenizer, torch.tensor([ids]), max_new_tokens=10, greedy=True,
                    stop_ids=run.stop_ids)
    status, body = _post(url, {"model": "served", "messages": QUESTION, "max_tokens": 10, "temperature": 0})
    reply = json.loads(body)
    assert status == 200 and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == run.tokenizer.decode(want, skip_special_tokens=True)
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(want),
                              "total_tokens": len(ids) + len(want)}
    assert reply["choices"][0]["finish_reason"] == ("length" if len(want) == 10 else "stop")
    status, body = _post(url, {"messages": QUESTION, "max_tokens": 10, "temperature": 0, "stream": True})
    events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line.strip()]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        reply["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]


def test_seeded_sampling_repeats_and_the_server_caps_max_tokens(server):
    _, url = server
    ask = {"messages": QUESTION, "max_tokens": 999, "temperature": 1.0, "top_p": 0.95, "seed": 3}
    first, second = (json.loads(_post(url, ask)[1]) for _ in range(2))
    assert first["choices"][0]["message"] == second["choices"][0]["message"]
    assert first["usage"]["completion_tokens"] <= 16  # the server's --max-new-tokens


@pytest.mark.parametrize("payload,field", [
    (b"{not json", "not JSON"), ({"messages": []}, "'messages'"), ({"messages": [{"role": "bot", "content": "x"}]},
                                                                   "messages[0]"),
    ({"messages": QUESTION, "temperature": 3}, "'temperature' must be in [0.0, 2.0]"),
    ({"messages": QUESTION, "max_tokens": 0}, "'max_tokens' must be >= 1"),
    ({"messages": QUESTION, "n": 17}, "'n' must be in [1, 16]"), ({"messages": QUESTION, "tools": [{}]}, "'tools'"),
    ({"messages": QUESTION, "stop": [str(k) for k in range(17)]}, "'stop'"),
    ({"messages": QUESTION, "stop": [""]}, "'stop'"), ({"messages": QUESTION, "logprobs": 3}, "'logprobs'"),
    ({"messages": QUESTION, "top_logprobs": 2}, "'top_logprobs' needs 'logprobs'"),
    ({"messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be in [0, 20]"),
    ({"messages": QUESTION, "response_format": {"type": "json_schema"}}, "'response_format'"),
    ({"messages": QUESTION, "frequency_penalty": 2.5}, "'frequency_penalty' must be in [-2.0, 2.0]"),
    ({"messages": QUESTION, "top_k": -2}, "'top_k' must be >= -1"), ({"messages": QUESTION, "min_p": 1.5}, "'min_p'"),
    ({"messages": QUESTION, "repetition_penalty": 0}, "'repetition_penalty'"),
    ({"messages": [{"role": "user", "content": "가" * 5000}]}, "positions")])
def test_bad_requests_get_a_400_that_names_the_field(server, payload, field):
    status, body = _post(server[1], payload)
    error = json.loads(body)["error"]
    assert status == 400 and field in error["message"] and error["type"] == "invalid_request_error"


def test_a_body_too_large_or_without_a_byte_count_gets_a_400_unread(server):
    import socket

    srv, _ = server
    for length in (b"99999999999", b"abc"):
        s = socket.create_connection(srv.server_address[:2])
        s.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: " + length + b"\r\n\r\n{}")
        reply = b""
        while chunk := s.recv(4096):  # HTTP/1.0: the server closes the connection after its answer
            reply += chunk
        s.close()
        reply = reply.decode()
        assert reply.startswith("HTTP/1.0 400") and "Content-Length must be a byte count" in reply


def test_models_health_and_unknown_routes(server):
    _, url = server
    with urllib.request.urlopen(url + "/v1/models") as r:
        assert json.loads(r.read())["data"][0]["id"] == "served"
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/v1/embeddings")
    assert e.value.code == 404


def test_the_openai_client_reads_answers_and_streams(server):
    openai = pytest.importorskip("openai")
    _, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    whole = client.chat.completions.create(model="served", messages=QUESTION, max_tokens=8, temperature=0)
    streamed = client.chat.completions.create(model="served", messages=QUESTION, max_tokens=8, temperature=0,
                                              stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text == whole.choices[0].message.content and whole.usage.completion_tokens > 0
    streamed = client.chat.completions.create(model="served", messages=QUESTION, max_tokens=8, temperature=0,
                                              stream=True, logprobs=True, top_logprobs=2)
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(tokens) == whole.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in tokens)
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.chat.completions.create(model="served", messages=QUESTION, n=20)
    text = client.completions.create(model="served", prompt="서울은 한국의", max_tokens=4, temperature=0)
    assert text.object == "text_completion" and 0 < text.usage.completion_tokens <= 4
    several = client.chat.completions.create(model="served", messages=QUESTION, max_tokens=6, temperature=0, n=3)
    assert [c.message.content for c in several.choices] == [whole.choices[0].message.content[:len(
        several.choices[0].message.content)]] * 3  # greedy: three times the same answer (6 of its 8 tokens)


def test_a_client_leaving_mid_stream_frees_the_model(server):
    """The failed write ends that row: the next request is answered."""
    import socket

    srv, url = server
    body = json.dumps({"messages": QUESTION, "stream": True, "max_tokens": 16}).encode()
    s = socket.create_connection(srv.server_address[:2])
    s.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    s.recv(64)
    s.close()
    status, reply = _post(url, {"messages": QUESTION, "max_tokens": 2})
    assert status == 200 and json.loads(reply)["usage"]["completion_tokens"] <= 2


def test_concurrent_clients_each_get_the_answer_they_get_alone(server):
    """Sent at once, so they may share batches (Batcher): greedy answers of different lengths and a seeded
    sampled one, each as generate gives it alone, and a stream's text whole."""
    srv, url = server
    run = srv.run
    asks = [{"messages": [{"role": "user", "content": q}], "max_tokens": n, "temperature": 0}
            for q, n in (("오늘 뭐 먹지?", 10), ("안녕하세요", 4), ("서울 날씨 어때?", 16))]
    asks.append({"messages": QUESTION, "max_tokens": 8, "temperature": 1.0, "top_p": 0.95, "seed": 3})
    asks.append({**asks[0], "stream": True})
    replies: list = [None] * len(asks)
    threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, _post(url, asks[i])))
               for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for ask, (status, body) in zip(asks[:4], replies):
        ids = run.tokenizer(run.render_prompt(ask["messages"]), add_special_tokens=False)["input_ids"]
        want = generate(run.model, run.tokenizer, torch.tensor([ids]), max_new_tokens=ask["max_tokens"],
                        temperature=ask["temperature"] or 1.0, top_p=ask.get("top_p", 0.9),
                        greedy=ask["temperature"] == 0, seed=ask.get("seed"), stop_ids=run.stop_ids)
        assert status == 200
        assert json.loads(body)["choices"][0]["message"]["content"] == run.tokenizer.decode(
            want, skip_special_tokens=True)
    events = [e.removeprefix("data: ") for e in replies[4][1].decode().split("\n\n") if e.strip()]
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == json.loads(replies[0][1])["choices"][0]["message"]["content"]
    assert sum(srv.batcher.sizes) >= 5


def test_n_answers_count_seeds_up_and_stream_interleaved(server):
    srv, url = server
    run = srv.run
    ask = {"messages": QUESTION, "max_tokens": 8, "temperature": 1.0, "top_p": 0.95, "seed": 11, "n": 3}
    status, body = _post(url, ask)
    reply = json.loads(body)
    ids = run.tokenizer(run.render_prompt(QUESTION), add_special_tokens=False)["input_ids"]
    alone = [generate(run.model, run.tokenizer, torch.tensor([ids]), max_new_tokens=8, temperature=1.0, top_p=0.95,
                      seed=11 + i, stop_ids=run.stop_ids) for i in range(3)]
    assert status == 200 and [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in reply["choices"]] == [
        run.tokenizer.decode(a, skip_special_tokens=True) for a in alone]
    assert reply["usage"]["completion_tokens"] == sum(len(a) for a in alone)
    status, body = _post(url, {**ask, "stream": True})
    events = [json.loads(e.removeprefix("data: ")) for e in body.decode().split("\n\n")[:-2]]  # [DONE] last
    for i, choice in enumerate(reply["choices"]):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]


def test_a_stop_string_ends_the_answer_before_it_streamed_or_not(server):
    _, url = server
    ask = {"messages": QUESTION, "max_tokens": 16, "temperature": 0}
    free = json.loads(_post(url, ask)[1])["choices"][0]["message"]["content"]
    assert len(free) >= 4
    stop = free[len(free) // 2:len(free) // 2 + 2]
    reply = json.loads(_post(url, {**ask, "stop": stop})[1])["choices"][0]
    assert reply["message"]["content"] == free[:free.index(stop)] and reply["finish_reason"] == "stop"
    body = _post(url, {**ask, "stop": [stop, "never there"], "stream": True})[1]
    events = [json.loads(e.removeprefix("data: ")) for e in body.decode().split("\n\n")[:-2]]  # [DONE] last
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == reply["message"]["content"]


def test_text_completions_continue_the_prompt_as_the_tokenizer_takes_it(server):
    """/v1/completions: no template; several prompts x n choices, indexed prompt-major; a stream's text whole."""
    srv, url = server
    run = srv.run
    prompts = ["서울은 한국의", "The capital of Korea is"]
    ask = {"prompt": prompts, "max_tokens": 6, "temperature": 0}
    status, body = _post(url, {**ask, "n": 2}, TEXT)
    reply = json.loads(body)
    assert status == 200 and reply["object"] == "text_completion" and len(reply["choices"]) == 4
    for k, choice in enumerate(reply["choices"]):
        ids = run.tokenizer(prompts[k // 2])["input_ids"]
        want = generate(run.model, run.tokenizer, torch.tensor([ids]), max_new_tokens=6, greedy=True,
                        stop_ids=run.stop_ids)
        assert choice["index"] == k and choice["text"] == run.tokenizer.decode(want, skip_special_tokens=True)
    assert reply["usage"]["prompt_tokens"] == sum(len(run.tokenizer(p)["input_ids"]) for p in prompts)
    status, body = _post(url, {**ask, "prompt": prompts[0], "stream": True}, TEXT)
    events = [json.loads(e.removeprefix("data: ")) for e in body.decode().split("\n\n")[:-2]]
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == reply["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]
    status, body = _post(url, {"prompt": prompts[0]}, TEXT)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] <= 16  # OpenAI's default max_tokens


@pytest.mark.parametrize("payload,field", [({"prompt": [1, "a"]}, "'prompt'"), ({"prompt": ""}, "'prompt'"),
                                           ({"prompt": [[]]}, "'prompt'"), ({"prompt": [10 ** 9]}, "vocabulary"),
                                           ({"prompt": "x", "logprobs": 21}, "'logprobs'"),
                                           ({"prompt": "x", "max_tokens": 0}, "'max_tokens' must be >= 1"),
                                           ({"prompt": "x", "best_of": 3}, "'best_of'")])
def test_bad_text_completion_requests_name_the_field(server, payload, field):
    status, body = _post(server[1], payload, TEXT)
    assert status == 400 and field in json.loads(body)["error"]["message"]


def test_an_api_key_is_asked_on_every_route_but_health(server):
    srv, url = server
    srv.api_key = "s3cret"
    try:
        status, body = _post(url, {"messages": QUESTION, "max_tokens": 2})
        assert status == 401 and "--api-key" in json.loads(body)["error"]["message"]
        req = urllib.request.Request(url + "/v1/chat/completions", headers={
            "Content-Type": "application/json", "Authorization": "Bearer s3cret"},
            data=json.dumps({"messages": QUESTION, "max_tokens": 2}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/v1/models")
        assert e.value.code == 401
        with urllib.request.urlopen(url + "/health") as r:
            assert json.loads(r.read()) == {"status": "ok"}
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret")
        assert client.chat.completions.create(model="served", messages=QUESTION, max_tokens=2).choices
    finally:
        srv.api_key = None


def test_echo_scores_the_prompt_and_logprobs_score_the_answer(server):
    """What lm-evaluation-harness' local-completions asks (token-id prompt, echo, logprobs, max_tokens 0 or 1, greedy):
    the prompt's own tokens scored as one forward scores them, then the answer's, each greedy token the top one."""
    from ppalli.infer.logprobs import prompt_logprobs

    srv, url = server
    run = srv.run
    ids = run.tokenizer("서울은 한국의 수도이고")["input_ids"]
    want = prompt_logprobs(run.model, ids, top=2)
    status, body = _post(url, {"prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 0, "temperature": 0}, TEXT)
    choice = json.loads(body)["choices"][0]
    assert status == 200 and choice["text"] == run.tokenizer.decode(ids) and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][1:] == pytest.approx([c for c, _ in want[1:]], abs=1e-5)
    assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
    status, body = _post(url, {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0}, TEXT)
    lp = json.loads(body)["choices"][0]["logprobs"]
    new = len(lp["tokens"]) - len(ids)
    assert status == 200 and 0 < new <= 3 and lp["token_logprobs"][1:len(ids)] == pytest.approx(
        [c for c, _ in want[1:]], abs=1e-4)
    for k in range(len(ids), len(lp["tokens"])):  # greedy: each new token is its position's likeliest
        assert list(lp["top_logprobs"][k].values())[0] == pytest.approx(lp["token_logprobs"][k], abs=1e-6)
    status, body = _post(url, {"messages": QUESTION, "max_tokens": 6, "temperature": 0, "logprobs": True,
                               "top_logprobs": 3})
    reply = json.loads(body)
    content = reply["choices"][0]["logprobs"]["content"]
    assert status == 200 and len(content) == reply["usage"]["completion_tokens"]
    assert bytes(b for c in content for b in c["bytes"]).decode() == reply["choices"][0]["message"]["content"]
    assert all(c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"], abs=1e-6) and
               len(c["top_logprobs"]) == 3 for c in content)
    status, body = _post(url, {"messages": QUESTION, "max_tokens": 2})
    assert json.loads(body)["choices"][0]["logprobs"] is None


def _events(body: bytes) -> list[dict]:
    return [json.loads(e.removeprefix("data: ")) for e in body.decode().split("\n\n")[:-2]]  # [DONE] last


@pytest.mark.parametrize("stop", [None, "cut"], ids=["no-stop", "stop-string"])
def test_a_streams_logprobs_add_up_to_the_whole_answers(server, stop):
    """Each chunk carries the log-probs of the tokens whose text it completes, the last chunk those left: chat's
    content entries and a text completion's tokens, log-probs, alternatives and text offsets, joined over the
    stream, equal the whole answer's, with a stop string (tokens held back, then one cut) or without."""
    _, url = server
    ask = {"messages": QUESTION, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    free = json.loads(_post(url, ask)[1])["choices"][0]["message"]["content"]
    if stop:
        assert len(free) >= 4
        ask["stop"] = free[len(free) // 2:len(free) // 2 + 2]
    whole = json.loads(_post(url, ask)[1])["choices"][0]
    events = _events(_post(url, {**ask, "stream": True})[1])
    assert events[0]["choices"][0]["logprobs"] is None  # the role's chunk completes no token
    streamed = [c for e in events if (lp := e["choices"][0]["logprobs"]) for c in lp["content"]]
    assert streamed == whole["logprobs"]["content"] and streamed
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == whole["message"]["content"]
    text = {"prompt": "서울은 한국의", "max_tokens": 8, "temperature": 0, "logprobs": 2, **(
        {"stop": whole["message"]["content"][:1] or "x"} if stop else {})}
    whole = json.loads(_post(url, text, TEXT)[1])["choices"][0]
    events = _events(_post(url, {**text, "stream": True}, TEXT)[1])
    joined = {k: [x for e in events if (lp := e["choices"][0]["logprobs"]) for x in lp[k]]
              for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == whole["logprobs"] and "".join(e["choices"][0]["text"] for e in events) == whole["text"]


@pytest.mark.parametrize("max_tokens", [0, 4])
def test_an_echoed_stream_starts_with_the_prompt_and_adds_up_to_the_whole_answer(server, max_tokens):
    """echo with stream: each choice's first chunk is its prompt (as sent, or its token ids decoded) with the
    prompt's log-probs, then the answer as it decodes; joined, text and log-probs equal the whole answer's, for
    a string prompt and a token-id one, n 2 (choices interleaved), with and without log-probs."""
    srv, url = server
    ids = srv.run.tokenizer("서울은 한국의")["input_ids"]
    for prompt in ("서울은 한국의", ids):
        for logprobs in (None, 2):
            ask = {"prompt": prompt, "echo": True, "max_tokens": max_tokens, "temperature": 0, "n": 2,
                   **({"logprobs": logprobs} if logprobs is not None else {})}
            whole = sorted(json.loads(_post(url, ask, TEXT)[1])["choices"], key=lambda c: c["index"])
            events = _events(_post(url, {**ask, "stream": True}, TEXT)[1])
            for k, choice in enumerate(whole):
                mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == k]
                assert mine[0]["text"] == (prompt if isinstance(prompt, str) else srv.run.tokenizer.decode(ids))
                assert "".join(c["text"] for c in mine) == choice["text"] and choice["text"].startswith(mine[0]["text"])
                assert mine[-1]["finish_reason"] == choice["finish_reason"]
                if logprobs is None:
                    assert all(c["logprobs"] is None for c in mine) and choice["logprobs"] is None
                    continue
                assert mine[0]["logprobs"]["token_logprobs"][0] is None  # the prompt's first token: no score
                joined = {key: [x for c in mine if c["logprobs"] for x in c["logprobs"][key]]
                          for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
                assert joined == choice["logprobs"]


def test_lm_eval_harness_loglikelihood_requests_read_as_it_reads_them(server):
    """local-completions' loglikelihood payload as lm-evaluation-harness 0.4 sends it (a batch of token-id prompts,
    context + continuation, max_tokens 1, logprobs 1, echo), read as its parse_logprobs reads it: the sum of the
    continuation's log-probs, and whether each continuation token is its position's top one (exact float match)."""
    from ppalli.infer.logprobs import prompt_logprobs

    srv, url = server
    run = srv.run
    context = run.tokenizer("질문: 한국의 수도는? 답:")["input_ids"]
    pairs = [(context, run.tokenizer(" 서울", add_special_tokens=False)["input_ids"]),
             (context, run.tokenizer(" 부산", add_special_tokens=False)["input_ids"])]
    payload = {"model": "served", "prompt": [c + x for c, x in pairs], "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    status, body = _post(url, payload, TEXT)
    assert status == 200
    for choice, (c, x) in zip(sorted(json.loads(body)["choices"], key=lambda ch: ch["index"]), pairs):
        lp = choice["logprobs"]
        got = sum(lp["token_logprobs"][len(c):-1])
        greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(c):-1],
                                                                lp["top_logprobs"][len(c):-1]))
        want = prompt_logprobs(run.model, c + x, top=1)[len(c):]
        assert got == pytest.approx(sum(s for s, _ in want), abs=1e-4)
        assert greedy == all(alts[0][0] == t for (_, alts), t in zip(want, x))
        # the one token asked, taken from the scoring forward (no second pass): greedy decoding's first token
        first = generate(run.model, run.tokenizer, torch.tensor([c + x]), max_new_tokens=1, greedy=True,
                         stop_ids=run.stop_ids) or [None]
        stop = choice["finish_reason"] == "stop"
        assert stop == (first[0] is None) and len(lp["tokens"]) == len(c + x) + 1
        assert stop or lp["tokens"][-1] == srv.pieces(first[0])[0]


def test_tokenizer_routes_answer_as_vllms_do(server):
    """/tokenizer_info, /tokenize and /detokenize: what lm-evaluation-harness' remote tokenizer reads."""
    srv, url = server
    tok = srv.run.tokenizer
    with urllib.request.urlopen(url + "/tokenizer_info", timeout=60) as r:
        info = json.loads(r.read())
    assert info["eos_token"] == tok.eos_token and info["model_max_length"] == srv.context
    status, body = _post(url, {"prompt": "서울은 한국의", "add_special_tokens": False}, "/tokenize")
    ids = tok("서울은 한국의", add_special_tokens=False)["input_ids"]
    assert status == 200 and json.loads(body) == {"count": len(ids), "max_model_len": srv.context, "tokens": ids}
    status, body = _post(url, {"messages": QUESTION}, "/tokenize")
    want = tok(srv.run.render_prompt(QUESTION), add_special_tokens=False)["input_ids"]
    assert status == 200 and json.loads(body)["tokens"] == want
    status, body = _post(url, {"tokens": ids}, "/detokenize")
    assert status == 200 and json.loads(body) == {"prompt": "서울은 한국의"}
    assert _post(url, {"tokens": [-1]}, "/detokenize")[0] == 400 and _post(url, {"prompt": 3}, "/tokenize")[0] == 400


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
CALLED = QUESTION + [  # a history with a call (OpenAI's form: content null, arguments as JSON text) and its result
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "서울"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "맑음"}'}]


def _prompt_tokens(url: str, payload: dict) -> int:
    status, body = _post(url, {**payload, "max_tokens": 2, "temperature": 0})
    assert status == 200, body
    return json.loads(body)["usage"]["prompt_tokens"]


def test_tools_and_a_called_history_go_into_the_prompt_through_the_runs_template(server):
    srv, url = server
    tok = srv.run.tokenizer

    def tokens(messages, tools=None) -> int:
        return len(tok(srv.run.render_prompt(messages, tools=tools), add_special_tokens=False)["input_ids"])

    assert _prompt_tokens(url, {"messages": QUESTION, "tools": [WEATHER]}) == tokens(QUESTION, [WEATHER]) > \
        tokens(QUESTION)
    assert _prompt_tokens(url, {"messages": QUESTION, "tools": [WEATHER], "tool_choice": "none"}) == tokens(QUESTION)
    called = [QUESTION[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "서울"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "맑음"}'}]
    assert _prompt_tokens(url, {"messages": CALLED, "tools": [WEATHER]}) == tokens(called, [WEATHER])
    text = srv.run.render_prompt(called, tools=[WEATHER])
    assert '{"name": "get_weather", "arguments": {"city": "서울"}}' in text and "<tool_response>" in text


@pytest.mark.parametrize("payload, field", [
    ({"messages": QUESTION, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "'tool_choice'"),
    ({"messages": QUESTION, "tool_choice": "required"}, "'tool_choice'"),
    ({"messages": QUESTION, "tools": [WEATHER], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "send one of them"),
    ({"messages": QUESTION, "tools": "[{\"name\": 3}]"}, "'tools' should be a list of function schemas"),
    ({"messages": QUESTION[:1] + [{"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "get_weather", "arguments": "{city"}}]}]}, "messages[1] tool call 1's arguments"),
    ({"messages": QUESTION + [{"role": "tool", "content": None}]}, "messages[1]"),
    ({"messages": QUESTION, "functions": [WEATHER["function"]]}, "'functions'")])
def test_bad_tool_requests_name_the_field(server, payload, field):
    status, body = _post(server[1], payload)
    assert status == 400 and field in json.loads(body)["error"]["message"]


def test_a_streamed_answer_with_tools_comes_whole_in_openais_chunks(server):
    _, url = server
    ask = {"messages": QUESTION, "tools": [WEATHER], "max_tokens": 8, "temperature": 0}
    whole = json.loads(_post(url, ask)[1])["choices"][0]
    status, body = _post(url, {**ask, "stream": True})
    events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line.strip()]
    assert status == 200 and events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""} and deltas[-1]["delta"] == {}
    assert deltas[-1]["finish_reason"] == whole["finish_reason"]
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    assert content == (whole["message"]["content"] or "")
    calls = [c for d in deltas for c in d["delta"].get("tool_calls", [])]
    assert [c["function"] for c in calls] == [c["function"] for c in whole["message"].get("tool_calls", [])]


def test_logit_bias_bans_and_forces_tokens(server):
    srv, url = server
    ask = {"messages": QUESTION, "max_tokens": 3, "temperature": 0, "logprobs": True}
    plain = json.loads(_post(url, ask)[1])["choices"][0]
    ids = srv.run.tokenizer(plain["message"]["content"], add_special_tokens=False)["input_ids"]
    banned = json.loads(_post(url, {**ask, "logit_bias": {str(ids[0]): -100}})[1])["choices"][0]
    assert banned["message"]["content"] != plain["message"]["content"]
    forced = json.loads(_post(url, {**ask, "temperature": 1.0, "seed": 1, "logit_bias": {"1234": 100}})[1])
    assert forced["usage"]["completion_tokens"] == 3
    assert forced["choices"][0]["message"]["content"] == srv.run.tokenizer.decode([1234] * 3)


@pytest.mark.parametrize("bias", [{"12": 101}, {"x": 1}, [1, 2], {str(k): 1 for k in range(301)}, {"999999": 1}])
def test_bad_logit_bias_gets_a_400(server, bias):
    status, body = _post(server[1], {"messages": QUESTION, "logit_bias": bias})
    assert status == 400 and "'logit_bias'" in json.loads(body)["error"]["message"]


def test_reasoning_servers_leave_answers_without_thinking_as_they_are(server):
    """--reasoning splits only an answer that opens with <think> (tests/unit/test_thinking.py); this run's answers
    do not, so they come back as the plain server gives them, whole and streamed."""
    srv, url = server
    reasoning = ChatServer(("127.0.0.1", 0), srv.run, "served", max_new_tokens=16, reasoning=True)
    threading.Thread(target=reasoning.serve_forever, daemon=True).start()
    other = f"http://127.0.0.1:{reasoning.server_address[1]}"
    try:
        ask = {"messages": QUESTION, "max_tokens": 6, "temperature": 0}
        plain = json.loads(_post(url, ask)[1])["choices"][0]["message"]
        split = json.loads(_post(other, ask)[1])["choices"][0]["message"]
        assert split == plain and "reasoning_content" not in split
        events = _post(other, {**ask, "stream": True})[1].decode().split("\n\n")
        deltas = [json.loads(e.removeprefix("data: "))["choices"][0]["delta"] for e in events[:-2] if e]
        assert "".join(d.get("content", "") for d in deltas) == plain["content"]
    finally:
        reasoning.shutdown()
        reasoning.server_close()


TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["KST", "UTC"]}}, "required": ["tz"]}}}
DATE = {"type": "function", "function": {"name": "get_date", "parameters": {"type": "object", "properties": {}}}}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high"]}},
          "required": ["ok", "level"]}


def test_structured_answers_parse_whole_streamed_and_as_forced_calls(server):
    """response_format and a forced tool_choice hold the tiny random run's answers to JSON and to calls
    (infer/structured.py); its free answers are neither (tests/unit/test_structured.py)."""
    srv, _ = server
    roomy = ChatServer(("127.0.0.1", 0), srv.run, "served", max_new_tokens=48)  # room for a whole call
    threading.Thread(target=roomy.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{roomy.server_address[1]}"
    try:
        ask = {"messages": QUESTION, "temperature": 0,
               "response_format": {"type": "json_schema", "json_schema": {"name": "level", "schema": SCHEMA}}}
        whole = json.loads(_post(url, ask)[1])["choices"][0]
        value = json.loads(whole["message"]["content"])
        assert set(value) == {"ok", "level"} and value["level"] in ("low", "high") and whole["finish_reason"] == "stop"
        events = _post(url, {**ask, "stream": True})[1].decode().split("\n\n")
        deltas = [json.loads(e.removeprefix("data: "))["choices"][0]["delta"] for e in events[:-2] if e]
        assert "".join(d.get("content", "") for d in deltas) == whole["message"]["content"]
        sampled = json.loads(_post(url, {**ask, "temperature": 1.5, "n": 3, "seed": 1})[1])["choices"]
        assert all(set(json.loads(c["message"]["content"])) == {"ok", "level"} for c in sampled)
        text = json.loads(_post(url, {"prompt": "날씨:", "temperature": 0, "max_tokens": 48,
                                      "response_format": ask["response_format"]}, TEXT)[1])["choices"][0]["text"]
        assert set(json.loads(text)) == {"ok", "level"}  # text completions take response_format too (as vLLM's)
        anything = json.loads(_post(url, {**ask, "response_format": {"type": "json_object"}})[1])["choices"][0]
        # any object: this run writes a key without end, cut by max_tokens, but every token of it inside the grammar
        matcher = xgrammar.GrammarMatcher(roomy.grammars.for_request({"type": "object"}, None, None))
        assert anything["message"]["content"].startswith("{") and matcher.accept_string(anything["message"]["content"])
        assert matcher.is_completed() == (anything["finish_reason"] == "stop")
        for choice, names in (({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
                              ("required", {"get_time", "get_date"})):
            answer = json.loads(_post(url, {"messages": QUESTION, "temperature": 0, "tools": [TIME, DATE],
                                            "tool_choice": choice})[1])["choices"][0]
            assert answer["finish_reason"] == "tool_calls" and answer["message"]["content"] is None
            calls = answer["message"]["tool_calls"]
            assert calls and {c["function"]["name"] for c in calls} <= names
            assert all(json.loads(c["function"]["arguments"]).get("tz", "KST") in ("KST", "UTC") for c in calls)
        # a forced call streamed: its id and name first, then its arguments piece by piece as they decode, adding
        # up to the whole answer's call (call_stream.py)
        forced = {"messages": QUESTION, "temperature": 0, "tools": [TIME, DATE], "tool_choice": "required"}
        whole_calls = json.loads(_post(url, forced)[1])["choices"][0]["message"]["tool_calls"]
        events = _post(url, {**forced, "stream": True})[1].decode().split("\n\n")
        streamed = [json.loads(e.removeprefix("data: "))["choices"][0] for e in events if e.strip()
                    and e != "data: [DONE]"]
        parts = [tc for c in streamed for tc in c["delta"].get("tool_calls", [])]
        heads = [p for p in parts if "id" in p]
        assert [(h["index"], h["function"]["name"]) for h in heads] == [
            (k, c["function"]["name"]) for k, c in enumerate(whole_calls)]
        for k, call in enumerate(whole_calls):
            args = "".join(p["function"]["arguments"] for p in parts if p["index"] == k)
            assert json.loads(args) == json.loads(call["function"]["arguments"])
        assert len(parts) > len(heads) + 1 and streamed[-1]["finish_reason"] == "tool_calls"
        # the same call cut by max_tokens inside its arguments: whole and streamed alike, the call as far as it got
        # and finish_reason "length" (as OpenAI's API gives a cut call)
        used = json.loads(_post(url, forced)[1])["usage"]["completion_tokens"]
        for limit in range(used - 1, 0, -1):  # greedy: each limit cuts the same answer; the first inside arguments
            cut = {**forced, "max_tokens": limit}
            whole_cut = json.loads(_post(url, cut)[1])["choices"][0]
            if whole_cut["message"].get("tool_calls") and whole_cut["message"]["tool_calls"][-1]["function"][
                    "arguments"] not in ("", whole_calls[-1]["function"]["arguments"]):
                break
        events = _post(url, {**cut, "stream": True})[1].decode().split("\n\n")
        streamed = [json.loads(e.removeprefix("data: "))["choices"][0] for e in events if e.strip()
                    and e != "data: [DONE]"]
        parts = [tc for c in streamed for tc in c["delta"].get("tool_calls", [])]
        assert whole_cut["finish_reason"] == streamed[-1]["finish_reason"] == "length", (whole_cut, streamed[-1])
        cut_calls = whole_cut["message"]["tool_calls"]
        assert [c["function"]["name"] for c in cut_calls] == [p["function"]["name"] for p in parts if "id" in p]
        assert cut_calls[-1]["function"]["arguments"] == "".join(
            p["function"]["arguments"] for p in parts if p["index"] == len(cut_calls) - 1)
        assert cut_calls[-1]["function"]["arguments"] != whole_calls[-1]["function"]["arguments"]  # cut short
        # auto: the answer is free, but a call it opens (the <tool_call> token forced by logit_bias) is a valid one
        opening = srv.run.tokenizer.convert_tokens_to_ids("<tool_call>")
        auto = json.loads(_post(url, {"messages": QUESTION, "temperature": 0, "tools": [TIME, DATE],
                                      "logit_bias": {str(opening): 100}})[1])["choices"][0]
        assert auto["message"].get("tool_calls"), auto
        assert {c["function"]["name"] for c in auto["message"]["tool_calls"]} <= {"get_time", "get_date"}
        # response_format beside tools on auto: the schema's JSON or calls; the opening forced, a valid call
        both = {"messages": QUESTION, "temperature": 0, "tools": [TIME, DATE],
                "response_format": ask["response_format"]}
        reply = json.loads(_post(url, both)[1])["choices"][0]["message"]
        assert ({c["function"]["name"] for c in reply["tool_calls"]} <= {"get_time", "get_date"}
                if reply.get("tool_calls") else set(json.loads(reply["content"])) == {"ok", "level"}), reply
        called = json.loads(_post(url, {**both, "logit_bias": {str(opening): 100}})[1])["choices"][0]
        assert called["finish_reason"] == "tool_calls", called
        assert {c["function"]["name"] for c in called["message"]["tool_calls"]} <= {"get_time", "get_date"}
    finally:
        roomy.shutdown()
        roomy.server_close()


@pytest.mark.parametrize("route, tools", [("/v1/chat/completions", False), (TEXT, False),
                                          ("/v1/chat/completions", True)])
def test_a_stream_ends_with_its_usage_where_stream_options_ask(server, route, tools):
    """stream_options {"include_usage": true}: a last chunk with no choices and the usage the whole answer reports
    (OpenAI's; LangChain's streaming token counts read it); without it, no such chunk."""
    _, url = server
    ask = {"messages": QUESTION} if route != TEXT else {"prompt": "안녕"}
    ask = {**ask, "max_tokens": 5, "temperature": 0, "n": 2, **({"tools": [WEATHER]} if tools else {})}
    whole = json.loads(_post(url, ask, route)[1])
    for asked in (True, False):
        body = _post(url, {**ask, "stream": True, "stream_options": {"include_usage": asked}}, route)[1].decode()
        events = [e.removeprefix("data: ") for e in body.split("\n\n") if e.strip()]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert (last["choices"] == [] and last["usage"] == whole["usage"]) if asked else last["choices"]


def test_vllms_sampling_fields_are_taken(server):
    """top_k 1 leaves one token to sample: any temperature and seed give the greedy answer; min_p 1 the same (only
    the likeliest is as likely as itself); repetition_penalty and top_k -1 (vLLM's "off") are taken."""
    _, url = server
    ask = {"messages": QUESTION, "max_tokens": 8}
    greedy = json.loads(_post(url, {**ask, "temperature": 0})[1])["choices"][0]["message"]["content"]
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        sampled = json.loads(_post(url, {**ask, "temperature": 1.5, "seed": 5, **extra})[1])
        assert sampled["choices"][0]["message"]["content"] == greedy, extra
    status, body = _post(url, {**ask, "temperature": 0, "repetition_penalty": 1.3, "top_k": -1})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] <= 8
