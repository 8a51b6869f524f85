"""Qwen2 / Qwen2.5: Llama's layer with biases on q, k, v (frozen, added by the base GEMM) and an optional
sliding window on the layers config.layer_types marks "sliding_attention" (self_attn.sliding_window)."""

from ppalli.models.families import FamilySpec

QWEN2 = FamilySpec(name="qwen2", layer_classes=("Qwen2DecoderLayer",))
