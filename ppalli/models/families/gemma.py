"""Gemma 1, 2 and 3 (text).

All three: RMSNorm scale (1 + w), GeGLU MLP (gelu_pytorch_tanh), embeddings scaled by sqrt(d) inside the
embedding module (so the fast path's driver gets it by calling that module).
Gemma-2 adds sandwich norms (post_attention_layernorm on the attention output, pre/post_feedforward_layernorm
around the MLP), sliding-window layers, attention logit softcapping (self_attn.attn_logit_softcapping,
which the attention backends take as `softcap`) and final logit softcapping (config.final_logit_softcapping,
passed to the fused cross entropy). Gemma-3 keeps the sandwich, adds q/k-norm and gives local and global
layers their own RoPE tables.
"""

from ppalli.models.families import FamilySpec


def _gemma3_rope(backbone, hidden, position_ids):
    """Per layer type (sliding / full attention) RoPE tables, as Gemma3TextModel.forward builds them."""
    types = backbone.config.layer_types
    tables = {t: backbone.rotary_emb(hidden, position_ids, t) for t in set(types)}
    return lambda layer_idx: tables[types[layer_idx]]


def _gemma3_problem(config) -> str | None:
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention (embedding variant)"
    return None


_SANDWICH = dict(post_attn_norm="post_attention_layernorm", pre_mlp_norm="pre_feedforward_layernorm",
                 post_mlp_norm="post_feedforward_layernorm")

GEMMA = FamilySpec(name="gemma", layer_classes=("GemmaDecoderLayer",), norm_offset=1.0)
GEMMA2 = FamilySpec(name="gemma2", layer_classes=("Gemma2DecoderLayer",), norm_offset=1.0,
                    act_keys=("hidden_activation", "hidden_act"), **_SANDWICH)
GEMMA3 = FamilySpec(name="gemma3", layer_classes=("Gemma3DecoderLayer",), norm_offset=1.0, qk_norm=True,
                    act_keys=("hidden_activation", "hidden_act"), rope_tables=_gemma3_rope,
                    problem=_gemma3_problem, **_SANDWICH)
