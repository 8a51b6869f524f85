"""Phi-3 / Phi-3.5 / Phi-4-mini: one fused qkv_proj (out = [q | k | v]) and one fused gate_up_proj
(out = [gate | up]), so LoRA on each is one adapter over the concatenated output. The fast path runs
them as two LoRA linears and splits the outputs; residual dropout (resid_pdrop) must be 0."""

from ppalli.models.families import FamilySpec


def _problem(config) -> str | None:
    rope = getattr(config, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    if partial != 1.0:
        return f"partial rotary embedding (factor {partial})"
    if getattr(config, "resid_pdrop", 0.0):
        return f"residual dropout {config.resid_pdrop}"
    return None


PHI3 = FamilySpec(name="phi3", layer_classes=("Phi3DecoderLayer",), qkv=("qkv_proj",),
                  mlp=("gate_up_proj", "down_proj"), problem=_problem)
