"""A rough tokens/s guess for a plan: model FLOPs per token over a card's dense rate times a measured efficiency.

FLOPs per token for LoRA (DESIGN.md, recompute not counted): 4*N_matmul + 12*L*d*s + 6*N_lora; the base's
weight gradients are never computed, so 4 (forward + input gradient) instead of 6. Recompute adds one more
forward of the checkpointed layers.
"""

from __future__ import annotations

from ppalli.plan.memory import SELECTIVE_SHARE, ModelSpec

# Share of a card's dense bf16 rate reached, measured on an H100 SXM (989 TFLOP/s dense) in BENCHMARKS.md,
# counting model FLOPs only: HF + PEFT, Llama-3.1-8B, no checkpointing, 2x2048: 8,091 tok/s x 33.5 GFLOP
# = 271 TFLOP/s = 27%. Unsloth's fused path without checkpointing, 4x2048: 15,328 x 33.5 = 513 = 52%;
# ppalli's fused path is held to beat that (T1), so 52% is the cautious figure for it. Small models reach
# less (Llama-3.2-1B HF: 18% of 798), so this overestimates them.
REFERENCE_EFFICIENCY = 0.27
FAST_EFFICIENCY = 0.52
RECOMPUTE_SHARE = {"none": 0.0, "selective": SELECTIVE_SHARE, "full": 1.0, "offload": 1.0}


def flops_per_token(spec: ModelSpec, seq_len: int, n_lora: int) -> float:
    """Model FLOPs of one trained token (forward + backward), Llama-3.1-8B at s=2048: 33.5 GFLOP."""
    return 4 * spec.matmul_params_per_token + 12 * spec.layers * spec.hidden * seq_len + 6 * n_lora


def recompute_flops_per_token(spec: ModelSpec, seq_len: int, checkpointing: str,
                              recompute_layers: int | None = None) -> float:
    """One more forward of the checkpointed decoder layers: their matmuls (2 N) and attention (4 L d s)."""
    layer_matmuls = spec.matmul_params_per_token - spec.vocab * spec.hidden
    share = RECOMPUTE_SHARE[checkpointing]
    if checkpointing == "selective" and recompute_layers is not None:
        share = min(recompute_layers, spec.layers) / spec.layers
    return share * (2 * layer_matmuls + 4 * spec.layers * spec.hidden * seq_len)


def est_tokens_per_s(spec: ModelSpec, *, seq_len: int, n_lora: int, tflops: float, fast_path: bool,
                     checkpointing: str, recompute_layers: int | None = None) -> float:
    """Tokens/s ~ dense rate x efficiency / (model + recompute FLOPs per token). HF + PEFT 8B with full
    checkpointing, 4x2048 on an H100: predicts 5,500, measured 5,865."""
    work = (flops_per_token(spec, seq_len, n_lora)
            + recompute_flops_per_token(spec, seq_len, checkpointing, recompute_layers))
    efficiency = FAST_EFFICIENCY if fast_path else REFERENCE_EFFICIENCY
    return tflops * 1e12 * efficiency / work
