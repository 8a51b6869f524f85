"""Shared pieces of the fast-path tests: tolerance checks that print max and mean differences, tiny PEFT
LoRA models built from configs, and the reference loss (plain logits + F.cross_entropy(reduction="sum")),
which is what the training loop's reference path computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ppalli.kernels._utils import interpreting

# The swap tests build their tiny models on the CPU and run the kernels in Triton's interpreter, which
# tests/conftest.py switches on only where there is no CUDA; on a GPU machine apply_fast_path refuses a CPU
# model (as it should), so those modules skip there and tests/gpu/test_fast_gpu.py covers CUDA.
CPU_TIER = pytest.mark.skipif(torch.cuda.is_available() and not interpreting(),
                              reason="CPU tier: tiny CPU models through the Triton interpreter (tests/gpu covers CUDA)")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

# fp32 on the CPU, both sides computing the same function. (atol, rtol) per check.
# - LoRA blocks: the same GEMMs summed in another order (addmm_ into one buffer vs separate outputs
#   added): a few fp32 ulps of values O(1), seen up to 2e-6; 1e-5 leaves 5x margin.
# - Whole tiny models: 2 layers of norm, attention and MLP compound those ulps and the RMSNorm kernel
#   rounds once where HF's Llama norm rounds twice (identical in fp32); seen up to 4e-6 on logits O(1).
# - Gradients over a model: summed over tokens and through softmax, seen up to 1e-5 on values O(1).
TOL = {
    "block": (1e-5, 1e-5),
    "logits": (5e-5, 1e-4),
    "grad": (5e-5, 1e-4),
    "loss": (1e-4, 1e-5),
}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, kind: str) -> None:
    """|a - e| <= atol + rtol |e| elementwise with the `kind` tolerances; the message gives max and mean diff."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = TOL[kind]
    a, e = actual.detach().float(), expected.detach().float()
    diff = (a - e).abs()
    assert torch.allclose(a, e, atol=atol, rtol=rtol), (
        f"{name}: max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e} "
        f"(atol {atol}, rtol {rtol})")


def lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of the LoRA parameters, cloned, then zeroed on the model."""
    out = {}
    for n, p in lora_params(model).items():
        assert p.grad is not None, f"{n} got no gradient"
        out[n] = p.grad.detach().clone()
        p.grad = None
    return out


def wrap_lora(model: nn.Module, targets=None, **kwargs) -> nn.Module:
    """PEFT LoRA with random A and B (init_lora_weights=False): PEFT's default B = 0 would leave every
    A gradient zero on both paths and the comparison unable to fail."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets or TARGETS, init_lora_weights=False)
    return get_peft_model(model, LoraConfig(**(cfg | kwargs)))


_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, use_cache=False)


def tiny_config(family: str):
    """Configs of the tiny models (hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 256) per family; the
    sliding windows (6) are shorter than the test rows so the window masks are exercised."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_COMMON)
    if family == "qwen2":
        return tf.Qwen2Config(**_COMMON)
    if family == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=16)
    if family == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=6)
    if family == "gemma":
        return tf.GemmaConfig(**_COMMON, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**_COMMON, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":
        return tf.Phi3Config(**_COMMON, pad_token_id=0)
    if family == "exaone4":
        return tf.Exaone4Config(**_COMMON, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    raise ValueError(family)


def tiny_lora_model(family: str, attn: str = "sdpa", **lora_kwargs) -> nn.Module:
    """A random-weight tiny causal LM of `family` in fp32 with PEFT LoRA on every projection."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(family)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    for name, p in model.named_parameters():  # HF starts norms at 1 (Gemma's at 0): a swapped weight would pass
        if "norm" in name:
            p.data.add_(torch.randn_like(p) * 0.2)
    targets = PHI3_TARGETS if family == "phi3" else TARGETS
    return wrap_lora(model, targets, **lora_kwargs).eval()


def reference_loss(model, input_ids, labels, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, trained tokens) from full logits: the reference path's computation."""
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits  # (B, T, V)
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           reduction="sum")
    return loss, (targets != -100).sum()
