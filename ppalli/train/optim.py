"""Optimizers for the adapter weights."""

from __future__ import annotations

import logging

import torch

from ppalli.errors import ConfigError

log = logging.getLogger("ppalli")


def make_optimizer(params, *, name: str, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA: one kernel for all adapter tensors), bitsandbytes 8-bit AdamW, or SGD."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters: check lora.targets")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        return _bnb_adamw(params, name=name, lr=lr, weight_decay=weight_decay, betas=betas)
    fused = device.type == "cuda" and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                          for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused or None)


def _bnb_adamw(params, *, name: str, lr: float, weight_decay: float, betas) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"train.optimizer={name} needs bitsandbytes (pip install 'ppalli[qlora]'); "
                          "or use train.optimizer=adamw") from None
    cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
