"""Decoding on a static KV cache with the mask and position kept in buffers (ppalli/infer/graph.py), run eagerly
on the CPU: the same logits and greedy tokens as the growing-cache decoder. On CUDA the same steps are replayed
from a graph (tests/gpu/test_graph_decode_gpu.py)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_reference import decode_one  # noqa: E402
from fast.fast_reference import tiny_config, tiny_lora_model  # noqa: E402

from ppalli.infer.generate import Sampling, _Decoder  # noqa: E402
from ppalli.infer.graph import StaticDecoder, graph_problem  # noqa: E402

CPU = torch.device("cpu")


def _prompt(n: int = 9) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3"])
def test_static_steps_give_the_growing_cache_logits(family):
    model = tiny_lora_model(family)
    for p in model.parameters():
        p.data.normal_(0, 0.2)  # LoRA B = 0 at init would hide the adapters
    ids = _prompt()
    with torch.inference_mode():
        dynamic, static = _Decoder(model), StaticDecoder(model, max_len=32, device=CPU, graph=False)
        a, b = dynamic.prefill(ids), static.prefill(ids)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for _ in range(6):
            token = a.argmax().view(1, 1)
            a, b = dynamic(token), static(token)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_greedy_answer_is_the_same_through_the_decode_loop():
    model = tiny_lora_model("llama")
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    ids, greedy = _prompt(), Sampling(greedy=True)
    with torch.inference_mode():
        want = decode_one(_Decoder(model), ids, 12, greedy)
        got = decode_one(StaticDecoder(model, max_len=ids.shape[1] + 12, device=CPU, graph=False), ids, 12, greedy)
    assert got == want and len(got) == 12


def test_a_prompt_that_fills_the_cache_is_refused():
    model = tiny_lora_model("llama")
    with pytest.raises(ValueError, match="no room"):
        StaticDecoder(model, max_len=9, device=CPU, graph=False).prefill(_prompt(9))


def test_graph_problem_names_what_rules_the_graph_out():
    from transformers import AutoModelForCausalLM

    assert "cpu" in graph_problem(tiny_lora_model("llama"), CPU)
    cuda = torch.device("cuda")  # only the config is read: no CUDA needed for these answers
    assert graph_problem(tiny_lora_model("llama"), cuda) is None
    mistral = AutoModelForCausalLM.from_config(tiny_config("mistral"))  # sliding window 6
    assert "sliding" in graph_problem(mistral, cuda) and "7 cache slots" in graph_problem(mistral, cuda, 7)
    assert graph_problem(mistral, cuda, 6) is None  # prompt and answer within the window: full attention
    # eager attention: only where ppalli's decode layers take every layer (they read the 4D mask themselves)
    assert graph_problem(tiny_lora_model("llama", attn="eager"), cuda) is None
    assert "eager" in graph_problem(tiny_lora_model("llama", attn="eager", use_dora=True), cuda)


def _greedy_logits(step, ids: torch.Tensor, n: int) -> torch.Tensor:
    """(n, V) logits of the prompt and n - 1 greedy steps."""
    logits = [step.prefill(ids).clone()]
    for _ in range(n - 1):
        logits.append(step(logits[-1].argmax(-1).view(1, 1)).clone())
    return torch.cat(logits)


@pytest.mark.parametrize("family, attn", [("mistral", "sdpa"), ("gemma3", "sdpa"), ("gemma2", "eager")])
def test_window_models_within_their_window_decode_on_the_static_cache(family, attn):
    """Prompt and answer within the sliding window (6): the static cache's full-length layers (full_length_cache)
    give the growing cache's logits, through HF's layers and through ppalli's decode layers (Gemma 2 on eager
    attention only through them: HF's eager path would add the bool mask)."""
    from ppalli.export.merge import merge_for_inference
    from ppalli.infer.decode_layers import decode_layers

    model = tiny_lora_model(family, attn=attn)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model = merge_for_inference(model)[0]
    ids = _prompt(3)
    with torch.inference_mode():
        want = _greedy_logits(_Decoder(model), ids, 3)
        for swapped in ((True,) if attn == "eager" else (False, True)):
            with decode_layers(model, enabled=swapped) as on:
                assert on == swapped
                static = StaticDecoder(model, max_len=6, device=CPU, graph=False)
                cache = static.kwargs.get("cache", static.kwargs.get("past_key_values"))
                assert {type(layer).__name__ for layer in cache.layers} == {"StaticLayer"}  # a replay advances all
                got = _greedy_logits(static, ids, 3)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_graph_problem_lets_bitsandbytes_4bit_bases_through_and_nothing_else_quantized():
    from transformers import BitsAndBytesConfig

    cuda = torch.device("cuda")
    for quant, ok in (({"quant_method": "bitsandbytes", "load_in_4bit": True}, True),
                      (BitsAndBytesConfig(load_in_4bit=True), True),
                      (BitsAndBytesConfig(load_in_8bit=True), False),
                      ({"load_in_4bit": True}, False),  # no method named: not known to be bitsandbytes
                      ({"quant_method": "gptq", "bits": 4}, False)):
        model = tiny_lora_model("llama")
        model.config.quantization_config = quant
        problem = graph_problem(model, cuda)
        assert (problem is None) == ok, (quant, problem)
        assert ok or "quantized" in problem

    class Linear4bit(torch.nn.Linear):  # what models/quant.py swaps in, without touching the config
        pass

    class Linear8bitLt(torch.nn.Linear):
        pass

    swapped = tiny_lora_model("llama")
    swapped.add_module("probe", Linear4bit(2, 2))
    assert graph_problem(swapped, cuda) is None
    swapped.add_module("probe8", Linear8bitLt(2, 2))
    assert "8-bit" in graph_problem(swapped, cuda)


def test_left_padded_rows_each_get_their_own_logits():
    model = tiny_lora_model("qwen2")
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (7, 3, 5)]
    width = max(map(len, prompts))
    ids = torch.zeros((3, width), dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.inference_mode():
        rows = StaticDecoder(model, max_len=width + 6, device=CPU, graph=False, rows=3)
        alone = [_Decoder(model) for _ in prompts]
        got = rows.prefill(ids, mask)  # (3, V)
        want = torch.cat([d.prefill(torch.tensor([p])) for d, p in zip(alone, prompts)])
        for _ in range(5):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            tokens = want.argmax(-1)  # (3,)
            got = rows(tokens[:, None])
            want = torch.cat([d(t.view(1, 1)) for d, t in zip(alone, tokens)])
