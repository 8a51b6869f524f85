"""Data-parallel training through torch.distributed, launched by torchrun (`ppalli train --nproc N`).

Each rank holds the adapter and takes every world-th sample of each optimizer step. The loss stays exact:
every rank divides its loss sum by the normalizer of the WHOLE step (all ranks' trained tokens, summed by
all-reduce), and the adapter gradients are summed across ranks, so N ranks give the update of one process
over the same samples (CPU tests hold 2 gloo ranks to 1 process with twice the accumulation, with and without
sharding). Files and the console belong to rank 0.

The frozen base weights are whole on every rank, or with plan.sharding=fsdp spread over the ranks by FSDP2
(`shard_base_weights`). The adapter is left out of the sharding either way: whole, in fp32, on every rank,
so its gradients, optimizer state and checkpoints are the same in both modes and a checkpoint resumes on any
number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init_from_env(cpu: bool = False) -> World:
    """Join the process group torchrun describes in the environment; a plain launch is a world of one.

    NCCL with one GPU per rank, gloo on the CPU (`cpu`: the run's plan.device is cpu, or no CUDA)."""
    from ppalli.errors import PpalliError

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "gloo" if cpu or not torch.cuda.is_available() else "nccl"
        if backend == "nccl":
            gpus = torch.cuda.device_count()
            if local >= gpus:
                raise PpalliError(f"--nproc {os.environ.get('LOCAL_WORLD_SIZE', size)} needs a GPU per process "
                                  f"and this machine has {gpus}: lower --nproc, or set plan.device=cpu")
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return World(rank, size, local)


def shard(samples: list, world: World) -> list:
    """This rank's share of a step's samples: every world-th one (ranks differ by at most one sample)."""
    return samples[world.rank::world.size] if world.active else samples


def sum_across(value: float | int, world: World, device: torch.device) -> float:
    if not world.active:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def sum_gradients(model, world: World) -> None:
    """All-reduce (sum) the adapter gradients, flattened into one buffer: one collective per step."""
    if not world.active:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # a rank with no sample this step still joins the sum
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def fsdp_mesh(world: World, device: torch.device):
    """The 1-D device mesh of all ranks that shard_base_weights spreads the base weights over. Made by every
    rank at once (a mesh may create a process group: a collective), before the ranks take turns loading."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world.size,))


def shard_base_weights(model, layers, mesh, device: torch.device) -> None:
    """FSDP2 over `mesh` (fsdp_mesh): each decoder layer a unit of its own (gathered for its forward and again
    for its backward), the rest (embeddings, lm_head, final norm) the root's. Trainable parameters are left
    out (ignored_params): moved whole to `device` and summed by `sum_gradients` like a data-parallel run's.
    No collective runs here (FSDP2 cuts each rank's shard locally), so ranks may call it one at a time.

    Gradients match an unsharded model's exactly (2 gloo ranks, tiny Llama with PEFT, 2026-12-03: largest
    difference 0.0)."""
    from torch.distributed.fsdp import fully_shard

    adapter = {p for p in model.parameters() if p.requires_grad}
    for p in adapter:
        p.data = p.data.to(device)
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=adapter)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the HF model
    fully_shard(root, mesh=mesh, ignored_params=adapter)


def broadcast_text(text: str, world: World) -> str:
    """Rank 0's value everywhere (the run directory name, which holds a timestamp)."""
    if not world.active:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def finish(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
