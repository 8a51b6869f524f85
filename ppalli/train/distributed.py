"""Data-parallel training through torch.distributed, launched by torchrun (`ppalli train --nproc N`).

Each rank holds the whole model and adapter and takes every world-th sample of each optimizer step. The loss
stays exact: every rank divides its loss sum by the normalizer of the WHOLE step (all ranks' trained tokens,
summed by all-reduce), and the adapter gradients are summed across ranks, so N ranks give the update of one
process over the same samples (a CPU test holds 2 gloo ranks to 1 process with twice the accumulation).
Only the small adapter gradients travel; files and the console belong to rank 0.
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


def init_from_env() -> World:
    """Join the process group torchrun describes in the environment; a plain launch is a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
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
