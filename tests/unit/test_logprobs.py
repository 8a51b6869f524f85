"""Log-probabilities (ppalli/infer/logprobs.py): a decoded row's and a prompt's figures equal the log-softmax of the
model's logits over the whole sequence at once; token pieces carry each token's exact bytes for the real
tokenizers; the two APIs' shapes."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ppalli.demo.tokenizer import build_demo_tokenizer
from ppalli.infer.generate import Sampling, generate_rows
from ppalli.infer.logprobs import TokenPieces, chat_logprobs, covering, logprobs_of, prompt_logprobs, text_logprobs

TEXT = "빨리 파인튜닝하자! Fine-tune 2x faster, 한국어도 😀 𠜎 ok"  # 𠜎: 4 bytes no vocabulary here holds whole


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_demo_tokenizer(tmp_path_factory.mktemp("tok"))


def _model(tok, kind=LlamaForCausalLM, config=LlamaConfig):
    torch.manual_seed(0)
    cfg = config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 pad_token_id=tok.pad_token_id, eos_token_id=None, bos_token_id=None)
    return kind(cfg).eval()


def _whole(model, ids: list[int]) -> torch.Tensor:
    """(T-1, V) log-softmax of the model's logits over `ids` at once: position t scores token t + 1."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def test_logprobs_of_is_the_log_softmax_and_its_top():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([4, 0, 49])
    lp = logits.log_softmax(-1)
    got = logprobs_of(logits, tokens, top=5)
    for row, (chosen, alts) in enumerate(got):
        assert chosen == pytest.approx(lp[row, tokens[row]].item(), abs=1e-6)
        assert [i for i, _ in alts] == lp[row].topk(5).indices.tolist()
        assert [v for _, v in alts] == sorted((v for _, v in alts), reverse=True)
    assert all(alts == [] for _, alts in logprobs_of(logits, tokens, top=0))


@pytest.mark.parametrize("kind,config", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
def test_prompt_logprobs_chunked_equal_the_whole_logits(tok, kind, config):
    model = _model(tok, kind, config)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    whole = _whole(model, ids)
    got = prompt_logprobs(model, ids, top=3, rows=4)  # chunks of 4 positions: the last one short
    assert got[0] == (None, []) and len(got) == len(ids)
    for t, (chosen, alts) in enumerate(got[1:]):
        assert chosen == pytest.approx(whole[t, ids[t + 1]].item(), abs=1e-5)
        assert [i for i, _ in alts] == whole[t].topk(3).indices.tolist()


def test_decoded_rows_report_the_logprobs_of_their_own_sequence(tok):
    """Rows of one batch (left-padded prompts of two lengths, greedy and sampled, one asking no log-probs) get,
    for each new token, the log-prob the whole prompt + answer run at once gives it: raw, not the sampled
    distribution (temperature 1.5 and top-p 0.8 change nothing here)."""
    model = _model(tok)
    texts = ("안녕하세요, 오늘은", "Hi", "서울의 날씨는 어때요?")
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in texts]
    seen: dict[int, list] = {0: [], 1: [], 2: []}
    out = generate_rows(model, tok, prompts, max_new_tokens=[6, 9, 5], seeds=[None, 7, None],
                        sampling=[Sampling(greedy=True), Sampling(temperature=1.5, top_p=0.8), Sampling(greedy=True)],
                        top_logprobs=[2, 0, None], on_logprobs=lambda row, token, score: seen[row].append(score))
    assert seen[2] == [] and [len(seen[0]), len(seen[1])] == [len(out[0]), len(out[1])] == [6, 9]
    for row in (0, 1):
        whole = _whole(model, prompts[row] + out[row])[len(prompts[row]) - 1:]  # (new, V)
        for t, (chosen, alts) in enumerate(seen[row]):
            assert chosen == pytest.approx(whole[t, out[row][t]].item(), abs=1e-4)
            assert len(alts) == (2 if row == 0 else 0)
    assert all(alts[0][0] == token for (_, alts), token in zip(seen[0], out[0]))  # greedy: the top one is taken


def test_a_row_ended_by_its_stop_token_reports_that_token_last(tok):
    """The stop token is not in the answer, but its log-prob is reported (serve's text completions end with it, as
    vLLM's do)."""
    model = _model(tok)
    prompt = tok("안녕하세요", add_special_tokens=False)["input_ids"]
    free = generate_rows(model, tok, [prompt], max_new_tokens=8)[0]
    stop = free[3]
    seen: list = []
    out = generate_rows(model, tok, [prompt], max_new_tokens=8, stop_ids=[stop], top_logprobs=[0],
                        on_logprobs=lambda row, token, score: seen.append(token))[0]
    assert out == free[:free.index(stop)] and seen == out + [stop]


@pytest.mark.parametrize("name", ["tokenizer_llama3", "tokenizer_qwen2.5", "tokenizer_llama2"])
def test_token_pieces_carry_each_tokens_exact_bytes(shared_data, name):
    tokenizer = AutoTokenizer.from_pretrained(shared_data / name)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces = TokenPieces(tokenizer)
    joined = bytes(b for t in ids for b in pieces(t)[1])
    assert joined.decode().strip() == TEXT  # SentencePiece's first piece carries the prefix space
    assert any("\ufffd" in pieces(t)[0] for t in ids)  # a character split over tokens (byte pieces)
    for special in tokenizer.all_special_ids[:1]:  # (the tiktoken-built Llama 3 file here has none)
        assert pieces(special) == (tokenizer.convert_ids_to_tokens(special),
                                   list(tokenizer.convert_ids_to_tokens(special).encode()))


def test_the_two_apis_shapes_and_a_cut_answers_tokens(tok):
    ids = tok("가나다 abc", add_special_tokens=False)["input_ids"]
    scores = [(None, [])] + [(-0.5 * k, [(ids[k], -0.5 * k), (0, -9.0)]) for k in range(1, len(ids))]
    pieces = TokenPieces(tok)
    text = text_logprobs(pieces, ids, scores, top=1)
    assert text["token_logprobs"][0] is None and text["top_logprobs"][0] is None
    assert text["token_logprobs"][1:] == [-0.5 * k for k in range(1, len(ids))]
    assert all(len(top) == 1 for top in text["top_logprobs"][1:])
    assert text["text_offset"][0] == 0 and text["text_offset"] == sorted(text["text_offset"])
    chat = chat_logprobs(pieces, ids[1:], scores[1:])["content"]
    assert [c["logprob"] for c in chat] == text["token_logprobs"][1:]
    assert all(len(c["top_logprobs"]) == 2 and isinstance(c["bytes"], list) for c in chat)
    cut = tok.decode(ids[:2], skip_special_tokens=True)
    assert covering(tok, ids, cut) == 2 and covering(tok, ids, "") == 0
