"""ppalli's decode layers (ppalli/infer/decode_layers.py) replayed from the CUDA graph: the logits of the models' own
layers stepped eagerly, in fp32 for tiny models of each covered family and in bf16 at Llama-3.2-1B's layer shape
(GQA 32/8, head dim 64, two layers); left-padded rows likewise; the families that decode on the growing cache
(sliding windows, Gemma-2/3's sandwich norms and Gemma 2's softcap, EXAONE 4's post-norms) stepped eagerly; and
generate's answer through them from the graph equals its answer without the graph."""

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from fast.fast_reference import tiny_lora_model  # noqa: E402

from ppalli.export.merge import merge_for_inference  # noqa: E402
from ppalli.infer.decode_layers import decode_layers, decode_problem  # noqa: E402
from ppalli.infer.generate import generate  # noqa: E402
from ppalli.infer.graph import StaticDecoder  # noqa: E402

CUDA = torch.device("cuda")


class _NoStop:
    eos_token_id = None
    pad_token_id = 0


def _merged(family: str, attn: str = "sdpa"):
    model = tiny_lora_model(family, attn=attn)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return merge_for_inference(model.to(CUDA))[0]


def _llama_1b_layers():
    """Two layers of Llama-3.2-1B's shape in bf16, random weights (std 0.02, as initialised)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(CUDA):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def _steps(model, ids, mask=None, graph=False, n=8):
    """Logits (n + 1, B, V) of the prompt and n steps fed the same seeded tokens: greedy tokens would part at a
    near-tie of random weights and make the two runs incomparable."""
    decoder = StaticDecoder(model, ids.shape[1] + n + 1, CUDA, graph=graph, rows=ids.shape[0])
    tokens = torch.randint(0, model.config.vocab_size, (n, ids.shape[0], 1), generator=torch.Generator().manual_seed(5))
    logits = [decoder.prefill(ids, mask).clone()]
    for token in tokens.to(CUDA):
        logits.append(decoder(token).clone())
    return torch.stack(logits)


def _rows(vocab: int):
    ids = torch.randint(1, vocab, (4, 12), generator=torch.Generator().manual_seed(3)).to(CUDA)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[3, :9] = 0
    return ids * mask, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma", "phi3"])
def test_graph_replays_of_the_decode_layers_give_the_models_logits(family):
    model = _merged(family)
    assert decode_problem(model) is None
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(1)).to(CUDA)
    with torch.inference_mode():
        want = _steps(model, ids)
        with decode_layers(model):
            got = _steps(model, ids, graph=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _padded_rows_alike(model):
    """Left-padded rows: the decode layers replayed from the graph against the model's own layers stepped eagerly."""
    ids, mask = _rows(256)
    with torch.inference_mode():
        want = _steps(model, ids, mask)
        with decode_layers(model):
            got = _steps(model, ids, mask, graph=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_padded_rows_from_the_graph_give_the_models_logits():
    _padded_rows_alike(_merged("qwen2"))


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "exaone4"])
def test_the_growing_cache_families_give_the_models_logits(family):
    """Left-padded rows of 12 + 8 tokens past windows of 6, on the cache HF grows (the graph takes full-length
    caches only): the compiled kernels (rms_norm_add, decode_attention with Gemma 2's softcap, rope with q/k norms)
    against the models' own layers, fp32. Gemma 2 on HF's eager attention, as it loads."""
    from ppalli.infer.generate import _Decoder

    model = _merged(family, "eager" if family == "gemma2" else "sdpa")
    assert decode_problem(model) is None

    def steps():
        ids, mask = _rows(256)
        decoder, positions = _Decoder(model), (mask.cumsum(-1) - 1).clamp(min=0)
        tokens = torch.randint(0, 256, (8, 4, 1), generator=torch.Generator().manual_seed(5)).to(CUDA)
        logits = [decoder.rows(ids, mask, positions).clone()]
        for token in tokens:
            mask = torch.cat([mask, mask.new_ones(4, 1)], dim=1)
            positions = positions[:, -1:] + 1
            logits.append(decoder.rows(token, mask, positions).clone())
        return torch.stack(logits)

    with torch.inference_mode():
        want = steps()
        with decode_layers(model) as swapped:
            assert swapped
            got = steps()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bf16_at_the_1b_layer_shape_no_further_from_fp32_than_the_models_layers():
    model = _llama_1b_layers()
    ids, mask = _rows(32000)
    with torch.inference_mode():
        exact = _steps(model.float(), ids, mask)
        model.to(torch.bfloat16)
        want = _steps(model, ids, mask)
        with decode_layers(model):
            got = _steps(model, ids, mask, graph=True)

    def err(a):
        return ((a - exact).norm() / exact.norm()).item()

    # the fused norm and RoPE round once where HF's ops round several times: no further from fp32 than HF's bf16
    assert err(got) <= 1.5 * err(want) + 1e-3, (err(got), err(want))


def test_generate_answers_alike_with_and_without_the_graph():
    model = _merged("llama")
    model.generation_config.eos_token_id = None  # the tiny config's EOS (2) would end the answers early
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4)).to(CUDA)
    eager = generate(model, _NoStop(), ids, max_new_tokens=24, greedy=True, graph=False)
    graphed = generate(model, _NoStop(), ids, max_new_tokens=24, greedy=True, graph=True)
    assert graphed == eager and len(graphed) == 24
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def _qlora(config, dtype):
    """`config`'s model with bitsandbytes NF4 projections (double quant) and an unmerged rank-16 LoRA adapter
    with non-zero B: what chat decodes after QLoRA."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ppalli.models.quant import quantize_model_4bit

    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(CUDA):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    quantize_model_4bit(model, compute_dtype=dtype, log_summary=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    return model.eval()


def test_qlora_fp32_from_the_graph_gives_the_models_logits():
    from fast.fast_reference import tiny_config

    config = tiny_config("llama")
    config.intermediate_size = 128  # down_proj's rows whole 64-blocks
    model = _qlora(config, torch.float32)
    assert decode_problem(model) is None
    _padded_rows_alike(model)


def test_qlora_bf16_at_the_1b_layer_shape_no_further_from_fp32_than_the_models_layers():
    """bf16 activations, NF4 weights: against the same weights dequantized into an fp32 run of HF's layers."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0)
    model = _qlora(config, torch.bfloat16)
    ids, mask = _rows(32000)
    with torch.inference_mode():
        want = _steps(model, ids, mask)
        with decode_layers(model) as swapped:
            assert swapped
            got = _steps(model, ids, mask, graph=True)
        exact = _fp32_twin(model, ids, mask)

    def err(a):
        return ((a.float() - exact).norm() / exact.norm()).item()

    assert err(got) <= 1.5 * err(want) + 1e-3, (err(got), err(want))


def _fp32_twin(model, ids, mask):
    """The model's logits in fp32 with its 4-bit weights dequantized exactly and the adapter added in fp32."""
    from transformers import AutoModelForCausalLM

    from ppalli.kernels.nf4 import dequantize_weight

    base = model.get_base_model()
    with torch.device(CUDA):
        twin = AutoModelForCausalLM.from_config(base.config, dtype=torch.float32).eval()
    state = {name: p.float() for name, p in base.named_parameters()
             if "lora_" not in name and "base_layer" not in name}
    for name, module in base.named_modules():
        if hasattr(module, "lora_A"):
            a, b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
            state[f"{name}.weight"] = dequantize_weight(module, torch.float32) + module.scaling["default"] * (b @ a)
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return _steps(twin, ids, mask)


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336)])  # 8B q, gate, down
def test_nf4_linear_at_8b_shapes_equals_the_dequantized_gemm(shape, m):
    bnb = pytest.importorskip("bitsandbytes")
    from ppalli.kernels.nf4 import dequantize_nf4
    from ppalli.kernels.nf4_linear import nf4_linear_fwd

    n, k = shape
    g = torch.Generator(device=CUDA).manual_seed(0)
    w = torch.randn(n, k, device=CUDA, generator=g, dtype=torch.bfloat16) * 0.02
    packed, qs = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    x = torch.randn(m, k, device=CUDA, generator=g, dtype=torch.bfloat16)
    xa = torch.randn(m, 16, device=CUDA, generator=g, dtype=torch.bfloat16)
    b = torch.randn(n, 16, device=CUDA, generator=g, dtype=torch.bfloat16) * 0.1
    w16 = bnb.functional.dequantize_4bit(packed, qs)
    assert torch.equal(dequantize_nf4(packed, qs), w16)
    want = x.float() @ w16.float().t() + xa.float() @ b.float().t()  # bnb's bf16 weights, fp32 products
    got = nf4_linear_fwd(x, packed, qs, None, xa, b).float()
    assert ((got - want).norm() / want.norm()).item() < 4e-3  # the bf16 output's rounding
