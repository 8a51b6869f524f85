"""The planner's count of what one fused decoder layer saves for backward (plan/memory.py,
fast_layer_bytes_per_token) against what autograd is handed, tensor by tensor, on a tiny bf16 Llama: the
bytes per token of the last layer, taken as the difference between two sequence lengths so that the
per-layer constants (the adapters' bf16 weight copies) cancel."""

import peft
import pytest
import torch
from fast_reference import CPU_TIER
from transformers import LlamaConfig, LlamaForCausalLM

pytest.importorskip("triton")
from ppalli.models.fast import apply_fast_path  # noqa: E402
from ppalli.models.fast_loss import fast_causal_lm_loss  # noqa: E402
from ppalli.plan.memory import ModelSpec, fast_layer_bytes_per_token  # noqa: E402

pytestmark = CPU_TIER

R = 8


def _config() -> LlamaConfig:
    return LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=512, attn_implementation="sdpa")


def _model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).to(torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=R, target_modules="all-linear"))
    apply_fast_path(model, attention_backend="auto", log=lambda line: None)
    return model


def _saved_by_last_layer(tokens: int) -> int:
    """Bytes of the storages first handed to autograd inside the last decoder layer of a fresh model, in its first
    forward (parameters excluded; one storage saved twice, as o_proj's input is the attention output, counted
    once)."""
    model = _model()
    last = model.get_base_model().model.layers[-1]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside, seen = [False], {}
    hooks = [last.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
             last.register_forward_hook(lambda *a: inside.__setitem__(0, False))]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes() if inside[0] else 0
        return t

    ids = torch.randint(0, 512, (2, tokens // 2), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fast_causal_lm_loss(model, ids, ids)
    for h in hooks:
        h.remove()
    return sum(seen.values())


def test_fast_layer_bytes_match_what_autograd_saves():
    short, long = _saved_by_last_layer(128), _saved_by_last_layer(256)
    per_token = (long - short) / 128
    # the norms' inputs, rstd and normed inputs; q, k, v, the output and its fp32 logsumexp; gate and up; the
    # seven (r,) products. Exact: a hidden-sized tensor more or less is 256 of the 3,464 bytes.
    assert per_token == fast_layer_bytes_per_token(ModelSpec.from_config(_config()), r=R, dtype_bytes=2)
