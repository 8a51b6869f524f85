"""A tiny random Llama with ppalli's LoRA on every linear layer, as the recipe attaches it, and every lora_B
drawn from N(0, 0.02): with PEFT's B = 0 every A gradient would be zero and a comparison could not fail."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ppalli.models.load import attach_lora


def tiny_lora_llama(config: dict, dtype: torch.dtype = torch.float32, r: int = 4):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=dtype)
    base.requires_grad_(False)
    model = attach_lora(base, r=r, alpha=2 * r, dropout=0.0, targets="all-linear", seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model
