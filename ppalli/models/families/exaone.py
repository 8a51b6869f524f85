"""EXAONE 4.0 (transformers' native exaone4; EXAONE 3.x runs on Llama's code, see llama.py).

Post-norm decoder: x + norm(attn(x)), then x + norm(mlp(x)) (no input norm), q/k-norm, SwiGLU. In the
hybrid models (config.sliding_window set) sliding layers use RoPE and a window while global layers use
no position embedding at all (NoPE), as Exaone4Attention.forward does.
"""

from ppalli.models.families import FamilySpec


def _window(layer, config) -> int | None:
    attn = layer.self_attn
    return attn.sliding_window if getattr(attn, "is_sliding", False) else None


def _uses_rope(layer) -> bool:
    attn = layer.self_attn
    return attn.sliding_window is None or getattr(attn, "is_sliding", False)


EXAONE4 = FamilySpec(name="exaone4", layer_classes=("Exaone4DecoderLayer",), pre_attn_norm=None,
                     post_attn_norm="post_attention_layernorm", pre_mlp_norm=None,
                     post_mlp_norm="post_feedforward_layernorm", qk_norm=True, window=_window, uses_rope=_uses_rope)
