"""FSDP2's CUDA path on one GPU (NCCL, a world of one): a model read on the CPU, sharded onto the GPU by
`shard_base_weights`, gives the loss and LoRA gradients of the same model kept whole on the GPU.

Two ranks on one GPU are not possible with NCCL; the two-rank arithmetic is held by the CPU (gloo) tests in
tests/integration/test_distributed.py.
"""

import copy
import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from tiny_lora import tiny_lora_llama

from ppalli.train.distributed import World, fsdp_mesh, shard_base_weights
from ppalli.train.recompute import apply_recompute, decoder_layers

LLAMA = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=False)


@pytest.fixture
def one_rank():
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    yield World(0, 1, 0)
    dist.destroy_process_group()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


# recompute applied before sharding, as the recipe does: FSDP2 then gathers a layer's weights a third time, for
# the recompute inside its backward
@pytest.mark.parametrize("recompute", ["none", "full", "offload"])
def test_sharded_model_read_on_cpu_matches_the_whole_one(one_rank, recompute):
    from torch.distributed.tensor import DTensor

    model = tiny_lora_llama(LLAMA, torch.bfloat16, r=8)
    whole = copy.deepcopy(model).cuda()
    device = torch.device("cuda")
    apply_recompute(model, recompute)
    cpu_weight = weakref.ref(model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight)
    shard_base_weights(model, decoder_layers(model), fsdp_mesh(one_rank, device), device)
    gc.collect()
    assert cpu_weight() is None, "the CPU copy of a sharded weight is still referenced: the host would hold it"

    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer.weight, DTensor) and q.base_layer.weight.to_local().is_cuda
    assert q.lora_A["default"].weight.is_cuda and not isinstance(q.lora_A["default"].weight, DTensor)

    ids = torch.randint(0, LLAMA["vocab_size"], (2, 128), device=device)
    ref_loss, ref = _loss_and_grads(whole, ids)
    loss, got = _loss_and_grads(model, ids)
    # the same weights, gathered: only a GEMM algorithm picked for another buffer address could move the last bits
    # (a lost or misplaced shard moves them by ~100%)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=0)
    assert got.keys() == ref.keys()
    for k in ref:
        assert ((got[k] - ref[k]).norm() / ref[k].norm()).item() < 1e-2, k
