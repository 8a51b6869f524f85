"""Recompute on the reference path when the model is called with use_cache=True: the LoRA gradients of every
mode equal those without recompute, with the whole model and with its base weights sharded by FSDP2 (gloo, a
world of one, on the CPU). The recompute must not add a layer's keys and values to the KV cache twice."""

import pytest
import torch
import torch.distributed as dist
from tiny_lora import tiny_lora_llama

from ppalli.train.distributed import World, fsdp_mesh, shard_base_weights
from ppalli.train.recompute import apply_recompute, decoder_layers

LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield World(0, 1, 0)
    dist.destroy_process_group()


def _model():
    return tiny_lora_llama(LLAMA).train()


def _grads(model, ids):
    loss = model(input_ids=ids, labels=ids, use_cache=True).loss  # a cache is made and handed to every layer
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("mode", ["offload", "full", "selective"])
def test_recompute_with_a_kv_cache_gives_the_gradients_of_no_recompute(mode, sharded, one_rank):
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    ref = _grads(_model(), ids)
    model = _model()
    apply_recompute(model, mode)
    if sharded:
        device = torch.device("cpu")
        shard_base_weights(model, decoder_layers(model), fsdp_mesh(one_rank, device), device)
    got = _grads(model, ids)
    for name, g in ref.items():  # fp32, the same operations in the same order: equal (a doubled cache: 100% off)
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)
