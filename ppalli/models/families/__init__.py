"""What the fast path needs to know about each model family, one small file per family.

A `FamilySpec` names the decoder layer classes the fast path swaps and where their pieces live: the
projection attribute names (separate q/k/v or Phi-3's fused qkv_proj), the norms around attention and
the MLP (Llama's pre-norm, Gemma-2's sandwich, EXAONE-4's post-norm), the RMSNorm weight offset
(Gemma's 1 + w), the activation, q/k-norm, which layers use RoPE and a sliding window. Families are
found by the decoder layer's class name, so a config that transformers runs on another family's code
(EXAONE 3 on Llama's, in transformers >= 5.24) gets that family's swap. Nothing here imports
transformers; the specs are plain data read when the fast path is applied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


def attn_window(layer: nn.Module, config) -> int | None:
    """Sliding window of a layer: HF sets self_attn.sliding_window on sliding layers only (Qwen2/3, Gemma-2/3)."""
    return getattr(layer.self_attn, "sliding_window", None)


def always_rope(layer: nn.Module) -> bool:
    return True


def shared_rope(backbone: nn.Module, hidden, position_ids) -> Callable[[int], tuple]:
    """One (cos, sin) pair (B, T, D) for every layer, from the backbone's rotary embedding."""
    cos_sin = backbone.rotary_emb(hidden, position_ids)
    return lambda layer_idx: cos_sin


def no_problem(config) -> str | None:
    return None


@dataclass(frozen=True)
class FamilySpec:
    name: str
    layer_classes: tuple[str, ...]  # decoder layer class names this spec swaps
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # or ("qkv_proj",): one fused projection
    o: str = "o_proj"
    mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")  # or ("gate_up_proj", "down_proj")
    pre_attn_norm: str | None = "input_layernorm"  # norm on the attention input
    post_attn_norm: str | None = None  # norm on the attention output, before the residual add
    pre_mlp_norm: str | None = "post_attention_layernorm"
    post_mlp_norm: str | None = None
    norm_offset: float = 0.0  # RMSNorm scale is (offset + w): 1.0 for Gemma
    qk_norm: bool = False  # per-head RMSNorm self_attn.q_norm / k_norm before RoPE
    act_keys: tuple[str, ...] = ("hidden_act",)  # config fields naming the MLP activation, first present wins
    window: Callable = attn_window  # (layer, config) -> sliding window or None
    uses_rope: Callable = always_rope  # (layer) -> whether the layer rotates q and k
    rope_tables: Callable = shared_rope  # (backbone, hidden, position_ids) -> layer_idx -> (cos, sin)
    problem: Callable = no_problem  # (config) -> why this config cannot take the fast path, or None

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1

    @property
    def fused_gate_up(self) -> bool:
        return len(self.mlp) == 2

    def lora_targets(self) -> tuple[str, ...]:
        return (*self.qkv, self.o, *self.mlp)


def all_families() -> tuple[FamilySpec, ...]:
    from ppalli.models.families import exaone, gemma, llama, mistral, phi3, qwen2, qwen3

    return (llama.LLAMA, qwen2.QWEN2, qwen3.QWEN3, mistral.MISTRAL, gemma.GEMMA, gemma.GEMMA2, gemma.GEMMA3,
            phi3.PHI3, exaone.EXAONE4)


def family_for_layer(layer: nn.Module) -> FamilySpec | None:
    """The spec whose decoder layer class is `type(layer)`, or None for an unsupported family."""
    name = type(layer).__name__
    return next((f for f in all_families() if name in f.layer_classes), None)
