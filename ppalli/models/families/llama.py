"""Llama 2/3.x (and what transformers runs on Llama's code: EXAONE 3, SOLAR, Yi, ...).

Pre-norm decoder: x + attn(norm(x)), then x + mlp(norm(x)); SwiGLU MLP; RoPE on every layer; no window.
"""

from ppalli.models.families import FamilySpec


def _problem(config) -> str | None:
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return f"pretraining_tp={config.pretraining_tp} splits the projections"
    return None


LLAMA = FamilySpec(name="llama", layer_classes=("LlamaDecoderLayer",), problem=_problem)
