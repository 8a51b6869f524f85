"""A rough tokens/s guess for a plan: model FLOPs per token over a card's dense rate times a measured efficiency.

FLOPs per token for LoRA (DESIGN.md, recompute not counted): 4*N_matmul + 12*L*d*s + 6*N_lora; the base's
weight gradients are never computed, so 4 (forward + input gradient) instead of 6. Recompute adds one more
forward of the checkpointed layers (on the fused path, without the MLP's down projection).
"""

from __future__ import annotations

import math

from ppalli.plan.memory import SELECTIVE_SHARE, ModelSpec

# Share of a card's dense bf16 rate reached, counting model FLOPs only, on an H100 SXM (989 TFLOP/s dense).
# HF + PEFT (BENCHMARKS.md), Llama-3.1-8B, no checkpointing, 2x2048: 8,091 tok/s x 33.5 GFLOP = 271 TFLOP/s
# = 27%. ppalli's fused path, no checkpointing, on 2026-11-25 (benchmarks/results/*-t1-s4.json, *-t4-s4-final
# .json): Llama-3.1-8B (hidden 4096) 4x2048, 17,147 tok/s x 33.49 GFLOP = 58%; Llama-3.2-1B (hidden 2048)
# 8x2048, 87,695 x 5.82 GFLOP = 52%. Narrower layers do less work per launched op; between and beyond the two
# widths the share follows log2(hidden), held within them.
REFERENCE_EFFICIENCY = 0.27
FAST_EFFICIENCY = {2048: 0.52, 4096: 0.58}
RECOMPUTE_SHARE = {"none": 0.0, "selective": SELECTIVE_SHARE, "full": 1.0, "offload": 1.0}
# plan.deterministic's kernels on a GPU (SDPA flash for cuDNN, GEMMs for the LoRA B gradients): the step time
# times this. H200, 2026-12-03: Llama-3.2-1B 8x2048 174.7 -> 192.4 ms (results/2026-12-03-h200-t4-s15-
# deterministic.md); short packed rows of ko_chatbot_qa took 1.34x (results/2026-12-03-h200-s15-train-*.json).
DETERMINISTIC_SLOWDOWN = 1.10


def fast_efficiency(hidden: int) -> float:
    """The fused path's measured share at this width (FAST_EFFICIENCY), log-linear between the widths measured."""
    (w0, e0), (w1, e1) = sorted(FAST_EFFICIENCY.items())
    t = min(max((math.log2(max(hidden, 1)) - math.log2(w0)) / (math.log2(w1) - math.log2(w0)), 0.0), 1.0)
    return e0 + t * (e1 - e0)


def flops_per_token(spec: ModelSpec, seq_len: int, n_lora: int) -> float:
    """Model FLOPs of one trained token (forward + backward), Llama-3.1-8B at s=2048: 33.5 GFLOP."""
    return 4 * spec.matmul_params_per_token + 12 * spec.layers * spec.hidden * seq_len + 6 * n_lora


def reference_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """DPO's reference log-probs: one more forward with the adapters off (2 N_matmul + 4 L d s), no backward."""
    return 2 * spec.matmul_params_per_token + 4 * spec.layers * spec.hidden * seq_len


def recomputed_weights(spec: ModelSpec, fast_path: bool = True) -> int:
    """Weights a recompute of every layer multiplies through: all but the lm_head, less the MLP's down
    projection on the fused path (its output is thrown away: kernels/lora_mlp.py)."""
    weights = spec.matmul_params_per_token - spec.vocab * spec.hidden
    if fast_path:
        weights -= spec.layers * spec.experts_per_token * spec.intermediate * spec.hidden
    return weights


def recompute_flops_per_token(spec: ModelSpec, seq_len: int, checkpointing: str,
                              recompute_layers: int | None = None, fast_path: bool = True) -> float:
    """One more forward of the checkpointed decoder layers: their matmuls (2 N, recomputed_weights) and
    attention (4 L d s)."""
    layer_matmuls = recomputed_weights(spec, fast_path)
    share = RECOMPUTE_SHARE[checkpointing]
    if checkpointing == "selective" and recompute_layers is not None:
        share = min(recompute_layers, spec.layers) / spec.layers
    return share * (2 * layer_matmuls + 4 * spec.layers * spec.hidden * seq_len)


# For the planner's step estimate (ranking the plans that fit, and the printed guess).
# HBM bytes/s per dense FLOP/s: the H100 SXM's 3.35 TB/s over 989 TFLOP/s; cards in gpus.py carry no
# bandwidth, so it scales with their rate.
BYTES_PER_FLOP = 3.35e12 / 989e12
DEQUANT_BYTES_PER_WEIGHT = 2.5  # read 0.5 byte of NF4 (+ scales), write 2 bytes of bf16
DEQUANT_BANDWIDTH_SHARE = 0.8  # the NF4 kernel's 2,426-2,851 GB/s on the H100 (results/2026-11-25-h100-nf4.json)
# Host time to run one micro-batch through one decoder layer (forward, backward, the launches between):
# on the H100 machine, Llama-3.1-8B at micro-batch 1 x 4 with 4 of 32 layers recomputed ran steps of
# 651-982 ms, median 870, against a median 617 ms at micro-batch 2 x 2 with 20 recomputed
# (results/*-t2-run3-auto.json, *-t2-micro2.json): the fastest step near its GPU work, most far above it.
# Read as bound by the host (the cause is not established; Python's garbage collector is the other
# suspect): 870 ms / (4 x 32) = 6.8 ms.
HOST_SECONDS_PER_LAYER = 6.8e-3
DEFAULT_TFLOPS = 989.0  # no card known (CPU runs, unknown GPUs): rank as on an H100


def step_seconds(spec: ModelSpec, *, seq_len: int, batch: int, micro: int, n_lora: int, checkpointing: str,
                 recompute_layers: int | None = None, quant: str = "none", fast_path: bool = True,
                 tflops: float | None = None, tokens: int | None = None, reference: bool = False) -> float:
    """A step's estimated seconds: the longer of its GPU time (model + recompute FLOPs at the path's measured
    efficiency; for 4-bit weights, dequantizing every layer's weights in each micro-batch's forward, backward
    and recompute, so a larger micro-batch dequantizes fewer times) and host_seconds. HF + PEFT 8B with full
    checkpointing, 4x2048 on an H100: predicts 5,500 tokens/s, measured 5,865. tokens: what a step runs, when
    not batch x seq_len (both answers of preference pairs, or a packed step's data); reference: DPO's extra
    forward (reference_flops_per_token)."""
    rate = (tflops or DEFAULT_TFLOPS) * 1e12 * (fast_efficiency(spec.hidden) if fast_path else REFERENCE_EFFICIENCY)
    recompute = recompute_flops_per_token(spec, seq_len, checkpointing, recompute_layers, fast_path)
    per_token = flops_per_token(spec, seq_len, n_lora) + recompute
    if reference:
        per_token += reference_flops_per_token(spec, seq_len)
    gpu = (tokens or batch * seq_len) * per_token / rate
    steps = batch // micro
    if quant != "none":  # forward and backward dequantize every layer's weights, a recompute what it multiplies
        share = recompute / max(recompute_flops_per_token(spec, seq_len, "full", fast_path=fast_path), 1.0)
        layer_weights = spec.matmul_params_per_token - spec.vocab * spec.hidden
        dequantized = 2 * layer_weights + share * recomputed_weights(spec, fast_path)
        bandwidth = (tflops or DEFAULT_TFLOPS) * 1e12 * BYTES_PER_FLOP * DEQUANT_BANDWIDTH_SHARE
        gpu += steps * dequantized * DEQUANT_BYTES_PER_WEIGHT / bandwidth
    return max(gpu, host_seconds(spec, batch=batch, micro=micro))


def host_seconds(spec: ModelSpec, *, batch: int, micro: int) -> float:
    """The host's time to run a step's micro-batches through every decoder layer."""
    return batch // micro * spec.layers * HOST_SECONDS_PER_LAYER
