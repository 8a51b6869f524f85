"""Decoding replayed from a CUDA graph (ppalli/infer/graph.py) gives what eager decoding gives: the same greedy
answer as the growing-cache loop for a tiny fp32 model (PEFT LoRA unmerged, and with the fast path's layer swap
in place), and bit-equal logits to the same static-cache steps run eagerly; batched greedy rows (eval's
answers) likewise."""

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from decode_reference import decode_one  # noqa: E402
from fast.fast_reference import tiny_config, tiny_lora_model, wrap_lora  # noqa: E402

from ppalli.infer.generate import Sampling, _Decoder, generate  # noqa: E402
from ppalli.infer.graph import StaticDecoder, graph_problem  # noqa: E402

CUDA = torch.device("cuda")


class _NoStop:
    eos_token_id = None
    pad_token_id = 0  # left padding of batched rows


def _model(family: str = "llama"):
    model = tiny_lora_model(family).to(CUDA)
    for p in model.parameters():
        p.data.normal_(0, 0.2)  # LoRA B = 0 at init would hide the adapters
    return model


def _prompt(n: int = 11) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1)).to(CUDA)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3"])
def test_graph_answer_equals_the_eager_answer(family):
    model = _model(family)
    assert graph_problem(model, CUDA) is None
    eager = generate(model, _NoStop(), _prompt(), max_new_tokens=24, greedy=True, graph=False)
    graphed = generate(model, _NoStop(), _prompt(), max_new_tokens=24, greedy=True, graph=True)
    assert graphed == eager and len(graphed) == 24


def test_replayed_logits_are_the_eager_static_steps_bit_for_bit():
    model, ids = _model(), _prompt()
    with torch.inference_mode():
        plain = StaticDecoder(model, max_len=40, device=CUDA, graph=False)
        graphed = StaticDecoder(model, max_len=40, device=CUDA, graph=True)
        a, b = plain.prefill(ids), graphed.prefill(ids)
        assert torch.equal(a, b)
        for _ in range(8):
            token = a.argmax().view(1, 1)
            a, b = plain(token), graphed(token).clone()
            assert torch.equal(a, b)
    assert graphed.graph is not None


def test_sampling_from_the_graph_matches_eager_sampling_with_a_seed():
    model, ids, s = _model(), _prompt(), Sampling(temperature=0.8, top_p=0.9, repetition_penalty=1.1)
    with torch.inference_mode():
        runs = []
        for step in (_Decoder(model), StaticDecoder(model, max_len=ids.shape[1] + 20, device=CUDA, graph=True)):
            runs.append(decode_one(step, ids, 20, s, seed=3))
    assert runs[0] == runs[1]


def test_the_fast_path_swap_leaves_graph_decoding_exact():
    from ppalli.models.fast import apply_fast_path

    model = _model()
    eager = generate(model, _NoStop(), _prompt(), max_new_tokens=16, greedy=True, graph=False)
    handle = apply_fast_path(model, attention_backend="auto")
    try:
        graphed = generate(model, _NoStop(), _prompt(), max_new_tokens=16, greedy=True, graph=True)
    finally:
        handle.revert()
    assert graphed == eager


def test_batched_greedy_rows_from_the_graph_equal_the_eager_rows():
    from ppalli.infer.generate import generate_greedy_rows

    model = _model("qwen2")
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (9, 4, 13, 6)]
    eager = generate_greedy_rows(model, _NoStop(), prompts, max_new_tokens=20, graph=False)
    graphed = generate_greedy_rows(model, _NoStop(), prompts, max_new_tokens=20, graph=True)
    assert graphed == eager and all(len(r) == 20 for r in graphed)


def test_rows_with_their_own_limits_and_sampling_from_the_graph_equal_eager():
    """What `ppalli serve` batches: rows with their own limits, greedy and seeded sampled rows mixed, one ending at
    once; the graph's rows equal the eager ones, each ended at its limit and reported once."""
    from ppalli.infer.generate import generate_rows

    model = _model("qwen2")
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (9, 4, 13, 6)]
    samplings = [Sampling(greedy=True), Sampling(temperature=0.8, top_p=0.9), Sampling(greedy=True),
                 Sampling(temperature=0.8, top_p=0.9, frequency_penalty=0.5)]
    runs = []
    for graph in (False, True):
        ended = []
        runs.append(generate_rows(model, _NoStop(), prompts, max_new_tokens=[12, 20, 0, 7], sampling=samplings,
                                  seeds=[None, 5, None, 6], graph=graph, on_end=lambda r, ids, e=ended: e.append(r)))
        assert sorted(ended) == [0, 1, 2, 3]
    assert runs[0] == runs[1] and runs[1][2] == [] and all(len(r) <= n for r, n in zip(runs[1], [12, 20, 0, 7]))


def test_logprobs_reported_from_the_graph_are_those_of_one_forward_over_the_sequence():
    """`ppalli serve`'s log-probs from the CUDA graph's rows (left-padded, mixed sampling): each token's equals the
    log-softmax of one forward over prompt + answer, as on the CPU (tests/unit/test_logprobs.py)."""
    from ppalli.infer.generate import generate_rows

    model = _model("qwen2")
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (9, 4, 13)]
    seen = {0: [], 1: [], 2: []}
    out = generate_rows(model, _NoStop(), prompts, max_new_tokens=[10, 14, 6], graph=True, seeds=[None, 3, None],
                        sampling=[Sampling(greedy=True), Sampling(temperature=0.9, top_p=0.9), Sampling(greedy=True)],
                        top_logprobs=[3, 0, None], on_logprobs=lambda row, token, score: seen[row].append(score))
    assert seen[2] == [] and [len(seen[0]), len(seen[1])] == [len(out[0]), len(out[1])]
    for row in (0, 1):
        with torch.inference_mode():
            whole = model(input_ids=torch.tensor([prompts[row] + out[row]], device=CUDA)).logits[0, :-1]
        whole = whole.float().log_softmax(-1)[len(prompts[row]) - 1:]  # (new, V)
        got = torch.tensor([lp for lp, _ in seen[row]], device=CUDA)
        torch.testing.assert_close(got, whole.gather(1, torch.tensor(out[row], device=CUDA)[:, None])[:, 0],
                                   rtol=1e-4, atol=1e-4)


def _nf4_model():
    """A tiny Llama in bf16 with its projections quantized by ppalli (bitsandbytes NF4, double quant) and PEFT
    LoRA on them: a QLoRA model as `ppalli chat` decodes it (a 4-bit base keeps the adapter unmerged)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from ppalli.models.quant import quantize_model_4bit

    config = tiny_config("llama")
    config.intermediate_size = 128  # the 4-bit blocks of 64 must not cross a row of down_proj
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(CUDA)
    for p in base.parameters():
        p.data.normal_(0, 0.2)
    quantize_model_4bit(base, compute_dtype=torch.bfloat16)
    return wrap_lora(base).eval()


def test_a_4bit_base_decodes_from_the_graph_with_the_eager_static_steps_logits():
    model, ids = _nf4_model(), _prompt()
    assert graph_problem(model, CUDA) is None
    with torch.inference_mode():
        plain = StaticDecoder(model, max_len=40, device=CUDA, graph=False)
        graphed = StaticDecoder(model, max_len=40, device=CUDA, graph=True)
        a, b = plain.prefill(ids), graphed.prefill(ids)
        assert torch.equal(a, b)
        for _ in range(12):  # one row: bitsandbytes' 4-bit gemv in every projection
            token = a.argmax().view(1, 1)
            a, b = plain(token), graphed(token).clone()
            assert torch.equal(a, b)
    assert graphed.graph is not None


def test_4bit_batched_rows_from_the_graph_equal_the_eager_static_rows():
    model = _nf4_model()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=gen) for n in (9, 4, 13)]
    ids = torch.zeros((3, 13), dtype=torch.long)
    mask = torch.zeros((3, 13), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 13 - len(prompt):], mask[row, 13 - len(prompt):] = prompt, 1
    ids, mask = ids.to(CUDA), mask.to(CUDA)
    with torch.inference_mode():
        plain = StaticDecoder(model, max_len=32, device=CUDA, graph=False, rows=3)
        graphed = StaticDecoder(model, max_len=32, device=CUDA, graph=True, rows=3)
        a, b = plain.prefill(ids, mask), graphed.prefill(ids, mask)
        assert torch.equal(a, b)
        for _ in range(10):  # three rows: dequantize, then a GEMM
            tokens = a.argmax(-1, keepdim=True)
            a, b = plain(tokens), graphed(tokens).clone()
            assert torch.equal(a, b)


def test_the_compiled_step_in_the_graph_answers_as_eager_decoding():
    model = _model()
    eager = generate(model, _NoStop(), _prompt(), max_new_tokens=24, greedy=True, graph=False)
    compiled = generate(model, _NoStop(), _prompt(), max_new_tokens=24, greedy=True, graph=True, compile=True)
    assert compiled == eager and len(compiled) == 24
    with torch.inference_mode():  # and the replayed logits are the compiled step's, run eagerly, to fp32 noise
        plain = StaticDecoder(model, max_len=40, device=CUDA, graph=False)
        graphed = StaticDecoder(model, max_len=40, device=CUDA, graph=True, compile=True)
        a, b = plain.prefill(_prompt()), graphed.prefill(_prompt())
        for _ in range(8):
            token = a.argmax().view(1, 1)
            a, b = plain(token), graphed(token).clone()
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert graphed.graph is not None


@pytest.mark.parametrize("family, attn", [("mistral", "sdpa"), ("gemma3", "sdpa"), ("gemma2", "eager")])
def test_window_models_within_their_window_replay_from_the_graph(family, attn):
    """Sliding window 6, prompt 3 + 2 steps: full-length layers in the cache (graph.full_length_cache), replayed
    from the graph under ppalli's decode layers, give the growing cache's logits (Gemma 2 on eager attention)."""
    from ppalli.export.merge import merge_for_inference
    from ppalli.infer.decode_layers import decode_layers

    model = tiny_lora_model(family, attn=attn).to(CUDA)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model = merge_for_inference(model)[0]
    ids = _prompt(3)
    with torch.inference_mode():
        dynamic = _Decoder(model)
        want = [dynamic.prefill(ids).clone()]
        with decode_layers(model) as swapped:
            assert swapped and graph_problem(model, CUDA, 6) is None
            graphed = StaticDecoder(model, max_len=6, device=CUDA, graph=True)
            got = [graphed.prefill(ids).clone()]
            for _ in range(2):
                token = want[-1].argmax(-1).view(1, 1)
                got.append(graphed(token).clone())
                want.append(dynamic(token).clone())
        assert graphed.graph is not None
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-4, atol=1e-4)
