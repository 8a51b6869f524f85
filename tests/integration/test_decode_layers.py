"""ppalli's decode layers (ppalli/infer/decode_layers.py) against the models' own layers, on the CPU through Triton's
interpreter in fp32: the same logits at the prompt and every decode step, on the static cache (the graph's) and the
growing one, one row and left-padded rows; the swap undone afterwards; the models they leave alone, with the reason.
On CUDA the graph replays them (tests/gpu/test_graph_decode_gpu.py)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from fast.fast_reference import tiny_config, tiny_lora_model, wrap_lora  # noqa: E402

from ppalli.export.merge import merge_for_inference  # noqa: E402
from ppalli.infer.decode_layers import decode_layers, decode_problem, swapped_in  # noqa: E402
from ppalli.infer.generate import _Decoder, generate_rows  # noqa: E402
from ppalli.infer.graph import StaticDecoder  # noqa: E402
from ppalli.kernels.lora_linear import stacked_base_weight  # noqa: E402

CPU = torch.device("cpu")
FAMILIES = ["llama", "qwen2", "qwen3", "gemma", "phi3"]  # full-length caches: the static decoder's


def _merged(family: str, attn: str = "sdpa"):
    model = tiny_lora_model(family, attn=attn)
    for p in model.parameters():
        p.data.normal_(0, 0.2)  # LoRA B = 0 at init would hide the adapters
    return merge_for_inference(model)[0]


def _static_steps(model, ids, mask=None, n=4):
    """Logits of the prompt and n greedy steps on the static cache, (n + 1, B, V)."""
    decoder = StaticDecoder(model, 24, CPU, graph=False, rows=ids.shape[0])
    logits = [decoder.prefill(ids, mask)]
    for _ in range(n):
        logits.append(decoder(logits[-1].argmax(-1, keepdim=True)).clone())
    return torch.stack(logits)


def _growing_steps(model, ids, mask, n=4):
    """The same on the growing cache (HF builds the masks), rows left-padded."""
    decoder = _Decoder(model)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = [decoder.rows(ids, mask, positions)]
    for _ in range(n):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits.append(decoder.rows(logits[-1].argmax(-1, keepdim=True), mask, positions).clone())
    return torch.stack(logits)


def _padded_rows():
    ids = torch.randint(1, 256, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :5] = 0
    return ids * mask, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_layers_give_the_models_logits_on_the_static_cache(family):
    model = _merged(family)
    assert decode_problem(model) is None
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = _static_steps(model, ids)
        with decode_layers(model) as swapped:
            assert swapped
            got = _static_steps(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_padded_rows_on_both_caches(family):
    model = _merged(family)
    ids, mask = _padded_rows()
    with torch.inference_mode():
        want_static, want_growing = _static_steps(model, ids, mask), _growing_steps(model, ids, mask)
        with decode_layers(model):
            got_static, got_growing = _static_steps(model, ids, mask), _growing_steps(model, ids, mask)
    torch.testing.assert_close(got_static, want_static, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_growing, want_growing, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "exaone4"])
def test_windows_and_post_norms_on_the_growing_cache(family):
    """Sliding-window layers (window 6, rows of 7 + 8 tokens: the window slides), Gemma-2/3's sandwich norms,
    Gemma-2's attention logit softcapping (cap 5, HF's eager attention: it has no SDPA path), Gemma-3's
    local/global RoPE, EXAONE-4's post-norms without input norms and its global layers without RoPE, on the cache
    HF grows (its sliding layers keep the window, its masks say which keys a row sees): HF's logits."""
    model = _merged(family, "eager" if family == "gemma2" else "sdpa")
    assert decode_problem(model) is None and not swapped_in(model)
    ids, mask = _padded_rows()
    with torch.inference_mode():
        want = _growing_steps(model, ids, mask, n=8)
        with decode_layers(model) as swapped:
            # in place, the layers' own check fails (an instance forward); swapped_in is what graph_problem asks then
            assert swapped and swapped_in(model) and decode_problem(model) is not None
            got = _growing_steps(model, ids, mask, n=8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _adapter_model(model):
    """PEFT LoRA on every projection, left unmerged, with non-zero B (the decode layers must add its branch)."""
    model = wrap_lora(model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])  # plain, q/k/v biases, fused q/k/v and gate/up
def test_unmerged_adapters_give_peft_logits(family):
    model = tiny_lora_model(family)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    assert decode_problem(model) is None
    ids, mask = _padded_rows()
    lines = []
    with torch.inference_mode():
        want = _static_steps(model, ids, mask)
        with decode_layers(model, log=lines.append):
            got = _static_steps(model, ids, mask)
    assert "LoRA unmerged" in lines[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _qlora_llama():
    """A tiny Llama whose projections are bitsandbytes NF4 (double quant; every in_features a whole number of
    64-blocks) with an unmerged LoRA adapter: what chat decodes after QLoRA."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from ppalli.models.quant import keep_standard_layout, quantize_model_4bit

    config = tiny_config("llama")
    config.intermediate_size, config._attn_implementation = 128, "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.requires_grad_(False)
    quantize_model_4bit(model, compute_dtype=torch.float32, log_summary=False)
    keep_standard_layout(model)  # bnb's CPU forward would repack the weights into a layout only it reads
    return _adapter_model(model)


def test_4bit_bases_with_an_adapter_give_the_models_logits():
    model = _qlora_llama()
    assert decode_problem(model) is None
    ids, mask = _padded_rows()
    lines = []
    with torch.inference_mode():
        want_static, want_growing = _static_steps(model, ids, mask), _growing_steps(model, ids, mask)
        with decode_layers(model, log=lines.append):
            got_static, got_growing = _static_steps(model, ids, mask), _growing_steps(model, ids, mask)
    assert "4-bit bases" in lines[0] and "LoRA unmerged" in lines[0]
    torch.testing.assert_close(got_static, want_static, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_growing, want_growing, rtol=1e-4, atol=1e-4)


def test_a_group_with_4bit_and_16bit_bases_keeps_the_models_layers():
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from ppalli.models.quant import quantize_model_4bit

    config = tiny_config("llama")
    config.intermediate_size, config._attn_implementation = 128, "sdpa"
    model = quantize_model_4bit(AutoModelForCausalLM.from_config(config), compute_dtype=torch.float32,
                                skip_modules=("lm_head", "k_proj"), log_summary=False)
    assert "4-bit and 16-bit bases in one group" in decode_problem(model)


def test_the_swap_is_undone_and_leaves_no_inference_tensors():
    model = _merged("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with torch.inference_mode():
        with decode_layers(model):
            assert "forward" in model.model.layers[0].__dict__
            assert stacked_base_weight([attn.q_proj, attn.k_proj, attn.v_proj], torch.float32) is not None
            assert stacked_base_weight([mlp.gate_proj, mlp.up_proj], torch.float32) is not None
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert stacked_base_weight([attn.q_proj, attn.k_proj, attn.v_proj], torch.float32) is None  # own storage again
    for name, p in model.named_parameters():
        assert not p.is_inference(), name  # training after generation must still be possible
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0)


def test_generate_rows_runs_through_them(caplog, monkeypatch):
    import logging

    monkeypatch.setattr("ppalli.infer.generate._SAID", set())  # said once a process: another test may have said it
    model = _merged("llama")
    ids, mask = _padded_rows()
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]

    class Tok:
        eos_token_id, pad_token_id = None, 0

    with caplog.at_level(logging.INFO, logger="ppalli.infer"):
        got = generate_rows(model, Tok(), prompts, max_new_tokens=5, graph=False)
    assert [len(r) for r in got] == [5, 5, 5]
    assert any("decode layers" in r.message for r in caplog.records)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


@pytest.mark.parametrize("family, words", [("llama", "DoRA"), ("qwen2", "'flex_attention'")])
def test_models_they_do_not_cover_keep_their_layers_with_the_reason(family, words):
    model = tiny_lora_model(family, use_dora=True) if family == "llama" else _merged(family, "flex_attention")
    why = decode_problem(model)
    assert why is not None and words in why
    lines = []
    with torch.inference_mode(), decode_layers(model, log=lines.append) as swapped:
        assert not swapped
    assert lines and words in lines[0]


def test_compile_gives_way_to_the_decode_layers(caplog, monkeypatch):
    import logging

    from ppalli.infer.generate import _decoder

    monkeypatch.setattr("ppalli.infer.generate._SAID", set())
    with caplog.at_level(logging.INFO, logger="ppalli.infer"):
        step = _decoder(_merged("llama"), CPU, 40, graph=None, compile=True)
    assert not getattr(step, "compiled", False)
    assert "decode layers run this model faster uncompiled" in caplog.text


def test_hooked_projections_keep_the_models_layers():
    """accelerate's offload hooks replace a projection's forward on the instance: the direct GEMMs would skip them."""
    model = _merged("llama")
    proj = model.model.layers[1].mlp.down_proj
    proj.forward = proj.forward  # an instance attribute, as a hook leaves one
    assert "layer 1.down_proj" in decode_problem(model)
