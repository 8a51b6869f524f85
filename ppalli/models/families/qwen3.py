"""Qwen3: Qwen2's layer without q/k/v biases, with per-head RMSNorm on q and k (self_attn.q_norm, k_norm)
applied before RoPE."""

from ppalli.models.families import FamilySpec

QWEN3 = FamilySpec(name="qwen3", layer_classes=("Qwen3DecoderLayer",), qk_norm=True)
