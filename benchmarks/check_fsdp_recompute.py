"""Recompute modes under FSDP2 on one GPU (NCCL, a world of one): per LoRA parameter, the relative error of
its gradient against the same model kept whole, for offload (reshard_after_forward on and off) and full.
Wrote results/2026-12-04-h200-s18-fsdp-offload-diag.txt (offload wrong: the model ran with use_cache=True and
the recompute added to the KV cache twice) and, after recompute.py dropped the cache, -diag-2.txt (all 0.0).

    python benchmarks/check_fsdp_recompute.py
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny model
from tiny_lora import tiny_lora_llama  # noqa: E402

from ppalli.train.recompute import apply_recompute, decoder_layers  # noqa: E402

LLAMA = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=False)


def build():
    return tiny_lora_llama(LLAMA, torch.bfloat16, r=8)


def grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def sharded(mode: str, reshard_after_forward: bool):
    model = build()
    apply_recompute(model, mode)
    mesh = init_device_mesh("cuda", (1,))
    adapter = {p for p in model.parameters() if p.requires_grad}
    for p in adapter:
        p.data = p.data.to("cuda")
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=adapter, reshard_after_forward=reshard_after_forward)
    fully_shard(model.get_base_model(), mesh=mesh, ignored_params=adapter)
    return model


def main() -> None:
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 128), device="cuda")
    ref_loss, ref = grads(build().cuda(), ids)
    for mode, reshard in (("offload", True), ("offload", False), ("full", True)):
        loss, got = grads(sharded(mode, reshard), ids)
        err = {k: round(((got[k] - ref[k]).norm() / ref[k].norm()).item(), 4) for k in ref}
        print(mode, "reshard_after_forward", reshard, "loss", loss, "ref", ref_loss)
        for k, v in sorted(err.items(), key=lambda kv: -kv[1])[:6]:
            print("   ", v, k.replace("base_model.model.model.", ""))
        layers = sorted({k.split(".layers.")[1].split(".")[0] for k, v in err.items() if v > 1e-2})
        print("    layers with any error > 1e-2:", layers)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
