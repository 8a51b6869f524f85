"""Predicted peak GPU memory of one LoRA / QLoRA training step, term by term.

The model counts what is alive at the two moments a LoRA step peaks:
- "loss": the loss's backward has just started; every tensor saved for backward is still held and the loss's
  own buffers are at their largest (HF's full fp32 logits dominate this moment).
- "layers": a decoder layer's backward; with checkpointing, one layer's activations are recomputed and held
  with that layer's gradient buffers.
peak = max of the two + CUDA context and allocator slack. `allocated` (peak less that overhead) is what
`torch.cuda.max_memory_allocated()` reports; benchmarks/bench_memory.py measures it.

Calibration (BENCHMARKS.md, HF + PEFT on an H100, LoRA r=16 all linear, bf16, SDPA, fused AdamW): the
reference-path terms below give Llama-3.1-8B GC 4x2048 31.4 GiB (measured 31.4), no GC 2x2048 58.6 (58.4),
nf4 GC 4x2048 21.8 (21.8), Llama-3.2-1B GC 8x2048 31.0 (31.1): see tests/unit/test_memory.py. The per-layer
saved set was also counted tensor by tensor on tiny PEFT Llamas on the CPU (the same file): within 0.2%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ppalli.errors import ConfigError, ModelError

GIB = 2**30
QUANTS = ("none", "nf4", "fp4")
CHECKPOINTING = ("none", "selective", "full", "offload")  # least recompute first
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0}  # per adapter weight
SELECTIVE_SHARE = 0.5  # "selective" without a layer count checkpoints every other decoder layer
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # CUDA context + cuBLAS/cuDNN handles: what nvidia-smi shows beyond torch
ALLOCATOR_SLACK = 0.04  # caching-allocator reserve above max_memory_allocated; bench_memory.py measures it
DROPOUT_MASK_BYTES = 1  # CUDA's fused dropout keeps a bool mask (the CPU path keeps an fp32 one)
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# Module names across the supported families -> the projections they are (phi3 fuses qkv and gate/up;
# EXAONE 3.x names its MLP c_fc_0 / c_fc_1 / c_proj and its output out_proj).
TARGET_NAMES = {
    "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",), "out_proj": ("o",),
    "qkv_proj": ("q", "k", "v"), "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",),
    "gate_up_proj": ("gate", "up"), "c_fc_0": ("gate",), "c_fc_1": ("up",), "c_proj": ("down",),
}


# --------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class ModelSpec:
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    n_params: int
    attention_bias: bool = False
    n_experts: int = 1  # mixture of experts: experts per layer (1 = dense)
    experts_per_token: int = 1

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one decoder layer (one expert for the MLP)."""
        d, i = self.hidden, self.intermediate
        return {"q": (d, self.q_dim), "k": (d, self.kv_dim), "v": (d, self.kv_dim), "o": (self.q_dim, d),
                "gate": (d, i), "up": (d, i), "down": (i, d)}

    def layer_linear_params(self, experts: int | None = None) -> int:
        """Weights of one layer's projections, counting `experts` MLP experts (default: all of them)."""
        experts = self.n_experts if experts is None else experts
        sizes = {k: a * b for k, (a, b) in self.linears().items()}
        attn = sizes["q"] + sizes["k"] + sizes["v"] + sizes["o"]
        return attn + experts * (sizes["gate"] + sizes["up"] + sizes["down"])

    @property
    def quantizable_params(self) -> int:
        """Weights bitsandbytes stores in 4 bits: every decoder linear; not embeddings, lm_head or norms."""
        return self.layers * self.layer_linear_params()

    @property
    def matmul_params_per_token(self) -> int:
        """Weights each token multiplies through: active experts only, lm_head included (for FLOPs)."""
        return self.layers * self.layer_linear_params(self.experts_per_token) + self.vocab * self.hidden

    @classmethod
    def from_config(cls, config: Any) -> ModelSpec:
        """From a transformers config object or a config.json dict (multimodal: its text config)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        if isinstance(d.get("text_config"), dict):  # e.g. gemma3, llava: the LLM is the text config
            d = {"model_type": d.get("model_type"), **d["text_config"]}
        return _spec_from_dict(d)


def _first(d: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    if default is None:
        raise ModelError(f"model config has none of {', '.join(keys)}: is it a decoder-only LLM config.json?")
    return default


def _spec_from_dict(d: dict) -> ModelSpec:
    family = str(d.get("model_type", "unknown")).removesuffix("_text")
    hidden = int(_first(d, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(d, "num_attention_heads", "n_head"))
    experts = max(1, int(_first(d, "num_local_experts", "num_experts", "n_routed_experts", default=1)))
    inter_keys = ("moe_intermediate_size", "intermediate_size") if experts > 1 else ("intermediate_size",)
    spec = ModelSpec(
        family=family, hidden=hidden, heads=heads,
        layers=int(_first(d, "num_hidden_layers", "num_layers", "n_layer")),
        kv_heads=int(_first(d, "num_key_value_heads", default=heads)),
        head_dim=int(_first(d, "head_dim", default=hidden // heads)),
        intermediate=int(_first(d, *inter_keys, "ffn_dim", "n_inner", default=4 * hidden)),
        vocab=int(_first(d, "vocab_size")),
        tied_embeddings=bool(d.get("tie_word_embeddings", family.startswith("gemma"))),
        n_params=0,
        attention_bias=bool(d.get("attention_bias", family == "qwen2")),
        n_experts=experts,
        experts_per_token=int(_first(d, "num_experts_per_tok", default=1)) if experts > 1 else 1,
    )
    return _with_params(spec)


def _with_params(s: ModelSpec) -> ModelSpec:
    """Count parameters: embeddings, projections, biases, norms (gemma2/3 have four per layer, qwen3/gemma3
    q/k norms), routers, final norm and an untied lm_head. Llama-3.1-8B: 8,030,261,248 exactly."""
    norms = (4 if s.family in ("gemma2", "gemma3") else 2) * s.hidden
    norms += 2 * s.head_dim if s.family in ("qwen3", "qwen3_moe", "gemma3") else 0
    bias = s.q_dim + 2 * s.kv_dim if s.attention_bias else 0
    router = s.hidden * s.n_experts if s.n_experts > 1 else 0
    per_layer = s.layer_linear_params() + norms + bias + router
    head = 0 if s.tied_embeddings else s.vocab * s.hidden
    n = s.vocab * s.hidden + s.layers * per_layer + s.hidden + head
    return ModelSpec(**{**s.__dict__, "n_params": n})


# --------------------------------------------------------------------------- adapters


def lora_projections(targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'all-linear' (every decoder projection, not lm_head, as PEFT reads it) or module names -> projections
    ('q', 'k', ... pass through, so resolving twice is harmless)."""
    if targets == "all-linear":
        return PROJECTIONS
    names = [targets] if isinstance(targets, str) else list(targets)
    found = []
    for name in names:
        if name in PROJECTIONS:  # already resolved
            found.append(name)
            continue
        if name not in TARGET_NAMES:
            raise ConfigError(f"lora.targets: {name!r} is not a projection ppalli knows "
                              f"({', '.join(TARGET_NAMES)}, or 'all-linear')")
        found.extend(p for p in TARGET_NAMES[name] if p not in found)
    return tuple(p for p in PROJECTIONS if p in found)


def lora_param_count(spec: ModelSpec, r: int, targets: Any) -> int:
    """A (r x in) + B (out x r) per targeted projection; MLP experts each get their own adapter."""
    total = 0
    for p in lora_projections(targets):
        fan_in, fan_out = spec.linears()[p]
        copies = spec.n_experts if p in ("gate", "up", "down") else 1
        total += copies * r * (fan_in + fan_out)
    return spec.layers * total


def lora_state_bytes(n_lora: int, optimizer: str) -> int:
    """PEFT keeps adapter weights in fp32 even on a bf16 base (autocast_adapter_dtype=True, peft 0.21):
    4 bytes weight + 4 gradient + the optimizer's state (AdamW: two fp32 moments). Gradients are counted at
    both peaks: with accumulation they live across micro-steps (a slight over-count without it)."""
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ConfigError(f"train.optimizer: {optimizer!r} is not one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    return n_lora * (4 + 4 + OPTIMIZER_STATE_BYTES[optimizer])


# --------------------------------------------------------------------------- frozen weights


def weight_bytes(spec: ModelSpec, quant: str, double_quant: bool, dtype_bytes: int) -> int:
    """16-bit: every parameter at dtype_bytes. 4-bit (bitsandbytes nf4/fp4, blocksize 64): decoder linears
    take 0.5 byte per weight plus one absmax per 64 weights, fp32 (4.5 bits), or with double quantization
    uint8 plus an fp32 second-level scale per 256 blocks (~4.13 bits). Embeddings, lm_head and norms stay
    16-bit (transformers' get_keys_to_not_convert keeps the output embedding)."""
    if quant not in QUANTS:
        raise ConfigError(f"plan.quantization: {quant!r} is not one of {', '.join(QUANTS)}")
    if quant == "none":
        return spec.n_params * dtype_bytes
    q = spec.quantizable_params
    scales = q / 64 + q / (64 * 256) * 4 if double_quant else q / 64 * 4
    return int(q / 2 + scales) + (spec.n_params - q) * dtype_bytes


def root_params(spec: ModelSpec) -> int:
    """Parameters outside the decoder layers: embeddings, an untied lm_head, the final norm."""
    return spec.vocab * spec.hidden * (1 if spec.tied_embeddings else 2) + spec.hidden


def sharded_weight_bytes(spec: ModelSpec, dtype_bytes: int, shards: int) -> int:
    """16-bit weights one rank holds under FSDP2 over `shards` ranks: 1/shards of every decoder layer, two layers
    whole (the one running and the next, gathered ahead), and the root's embeddings, lm_head and final norm whole
    (FSDP2 keeps the root's parameters gathered from its forward to its backward)."""
    root = root_params(spec)
    decoder = spec.n_params - root
    return (decoder // shards + 2 * (decoder // spec.layers) + root) * dtype_bytes


def dequant_scratch_bytes(spec: ModelSpec, quant: str, dtype_bytes: int) -> int:
    """4-bit matmuls dequantize one weight at a time to the compute dtype (bitsandbytes MatMul4Bit.backward:
    `F.dequantize_4bit(B, state).to(grad.dtype)`): the largest projection, alive for one matmul."""
    if quant == "none":
        return 0
    return max(a * b for a, b in spec.linears().values()) * dtype_bytes


# --------------------------------------------------------------------------- saved activations


def _lora_input_bytes(fan_in: int, n_targeted: int, dtype_bytes: int, dropout: float, shared: bool) -> int:
    """Per token: what PEFT's LoRA saves of the input of `n_targeted` projections that share one input.
    PEFT casts the input to the adapter's fp32 in each module (`_cast_input_dtype`, peft 0.21), so q, k and
    v each keep their own fp32 copy for lora_A's weight gradient; the frozen base linear saves nothing
    (autograd saves mm inputs only for weights that need grad). An fp32 base makes the cast a no-op: one
    copy, or none when another op already saved that tensor (`shared`). Dropout > 0 saves its fp32 output
    and a mask per module instead."""
    if n_targeted == 0:
        return 0
    if dropout > 0:
        return n_targeted * fan_in * (4 + DROPOUT_MASK_BYTES)
    if dtype_bytes < 4:
        return n_targeted * fan_in * 4
    return 0 if shared else fan_in * 4


def _reference_lora_bytes(spec: ModelSpec, targets: tuple[str, ...], r: int, dt: int, dropout: float,
                          attention: str) -> int:
    """Per token, one layer: LoRA inputs by shared-input group, plus lora_A's (r,) fp32 output that lora_B saves.
    o_proj's input is SDPA's output (its kernels write (B, S, H, D), so transpose + contiguous copies
    nothing), which SDPA saves already."""
    d, inter = spec.hidden, spec.intermediate * spec.experts_per_token
    groups = ((("q", "k", "v"), d, False), (("o",), spec.q_dim, attention != "eager"), (("gate", "up"), d, False),
              (("down",), inter, False))
    total = sum(_lora_input_bytes(fan_in, sum(p in targets for p in names), dt, dropout, shared)
                for names, fan_in, shared in groups)
    return total + len(targets) * r * 4


def _attention_bytes(spec: ModelSpec, dt: int, seq_len: int, attention: str, attn_mask: bool) -> int:
    """Per token, one layer. SDPA (flash / cuDNN / efficient kernels) saves q, k, v, its output and an fp32
    logsumexp per head; with GQA and no mask transformers passes enable_gqa (k, v stay at kv width), with a
    mask (padding, packed documents) it calls repeat_kv first (transformers 5.24 use_gqa_in_sdpa) and SDPA
    keeps the mask made additive at dtype, (seq,) per token. Eager repeats k, v and saves the fp32 softmax
    and its dtype copy: (heads x seq) per token, quadratic in seq."""
    if attention == "eager":
        return dt * 3 * spec.q_dim + spec.heads * seq_len * (4 + dt)
    kv = spec.q_dim if attn_mask else spec.kv_dim
    mask = seq_len * dt if attn_mask else 0
    return dt * (2 * spec.q_dim + 2 * kv) + 4 * spec.heads + mask


def reference_layer_bytes_per_token(spec: ModelSpec, *, targets: tuple[str, ...], r: int, dtype_bytes: int,
                                    lora_dropout: float = 0.0, seq_len: int = 2048, attention: str = "sdpa",
                                    attn_mask: bool = False) -> int:
    """Bytes one decoder layer saves for backward per token, HF Llama-style layer + PEFT LoRA, frozen base:
    - two RMSNorms, each an fp32 copy of its input (`hidden_states.to(torch.float32)`, saved by pow and mul);
      the norm weight is frozen, so its bf16 output is not saved;
    - the LoRA inputs and lora_A outputs (see _reference_lora_bytes);
    - attention's q, k, v, output, logsumexp (see _attention_bytes); RoPE saves only cos/sin, shared;
    - SwiGLU: silu saves the gate output, the product saves silu(gate) and up: 3 x intermediate at dtype.
    Llama-3.1-8B, bf16, all-linear: 36d + 4kv + 10I bytes = 295 KB per token per layer."""
    dt = dtype_bytes
    norms = 2 * 4 * spec.hidden
    mlp = 3 * dt * spec.intermediate * spec.experts_per_token
    lora = _reference_lora_bytes(spec, targets, r, dt, lora_dropout, attention)
    return norms + lora + _attention_bytes(spec, dt, seq_len, attention, attn_mask) + mlp


def fast_layer_bytes_per_token(spec: ModelSpec, *, r: int, dtype_bytes: int) -> int:
    """Bytes one decoder layer saves per token on the fused path (ppalli/kernels), by design:
    - fused RMSNorm: its input at dtype + an fp32 rstd, twice (the fp32 upcast is never stored);
    - fused LoRA blocks (lora_qkv, lora_mlp): the normed input once per block at dtype, the adapter's
      (r,) intermediate per projection at dtype; h = silu(gate) * up is recomputed in backward, so the MLP
      keeps only gate and up;
    - attention (q, k, v at kv width, output, fp32 logsumexp); o_proj's input is the attention output itself
      (one storage, saved once).
    Llama-3.1-8B: 12d + 4kv + 4I = 111 KB per token per layer. Counted tensor by tensor on a tiny Llama
    (tests/unit/fast/test_fast_memory.py), and on an H100 (T1, 4 x 2048, no checkpointing, 2026-12-06): 43.03 GiB
    allocated at the peak against 43.31 predicted (45.37 when o_proj's input and the fp32 intermediates were
    counted apart); T4 (Llama-3.2-1B, 8 x 2048): 17.49 against 17.76. Preference objectives add
    fast_paired_surplus_per_token."""
    dt, d = dtype_bytes, spec.hidden
    norms = 2 * (dt * d + 4) + 2 * dt * d
    attention = dt * (2 * spec.q_dim + 2 * spec.kv_dim) + 4 * spec.heads
    mlp = 2 * dt * spec.intermediate * spec.experts_per_token
    return norms + attention + mlp + len(PROJECTIONS) * r * dt


def fast_paired_surplus_per_token(spec: ModelSpec, *, r: int, dtype_bytes: int) -> int:
    """What the preference objectives' fused runs still add to fast_layer_bytes_per_token: the count's earlier
    surplus (o_proj's input apart from the attention output, the (r,) products in fp32). Their peaks (H200,
    2026-12-04, results/2026-12-04-h200-s19-dpo-*.json: DPO 8B 8 packed pairs 41.01 GiB allocated, 1B 9.54) sit
    0.8-2.6 GiB above the exact count plus their modeled loss terms: a term of the paired passes not yet measured
    part by part (DPO's reference pass runs while the policy's activations are held). The surplus kept their
    plans as they were, above every one of those peaks, until that term is counted."""
    return dtype_bytes * spec.q_dim + len(PROJECTIONS) * r * max(0, 4 - dtype_bytes)


def backward_work_bytes_per_token(spec: ModelSpec, dtype_bytes: int, fast_path: bool) -> int:
    """Working buffers of one layer's backward at its largest (down_proj): reference PEFT makes the input
    gradient in fp32 through the adapter, casts it and adds the base's, so ~(4 + 2 dt) bytes per element of
    the intermediate and of the residual gradient; fused blocks write dt-sized gradients, ~2 dt. An upper
    estimate, not counted tensor by tensor; it matters only with checkpointing and a fused loss."""
    per = 2 * dtype_bytes if fast_path else 4 + 2 * dtype_bytes
    return per * (spec.intermediate * spec.experts_per_token + spec.hidden)


def final_norm_bytes_per_token(spec: ModelSpec, dtype_bytes: int, fast_path: bool) -> int:
    """The model's last RMSNorm before lm_head: an fp32 input copy on the reference path, dtype + rstd fused."""
    return dtype_bytes * spec.hidden + 4 if fast_path else 4 * spec.hidden


def loss_bytes(spec: ModelSpec, tokens: int, dtype_bytes: int, fused_ce: bool, logits_held: bool = True,
               logps_rows: int = 0, logps_kernel: bool = False) -> int:
    """Peak of the lm_head + cross-entropy at the start of backward.
    HF (transformers 5.24 ForCausalLMLoss): `.float()` makes an fp32 copy of the logits that cross_entropy's
    log_softmax turns into a saved fp32 output; backward allocates nll_loss's fp32 grad and log_softmax's
    fp32 grad before the first is freed: tokens x vocab x 12. The dtype logits count too while the caller
    holds the model output through backward (`logits_held`; ppalli's reference_lm_loss drops them).
    The three calibration runs agree on 12 + dtype and rule out 8 + dtype (2-4 GiB low).
    Fused (kernels/linear_cross_entropy.py, chunked like Liger): the fp32 gradient of the hidden states made
    during forward + one chunk of fp32 logits and their gradient; a chunk has about tokens x hidden logits.
    Preference objectives with `logps_rows` (train/linear_logps.py, chunks of that many rows): each token's
    fp32 log-prob and d logp / d h in the dtype, and for one chunk at a time its fp32 logits and their fp32
    gradient plus one more temporary (the softcap's fp32 factor, or the gradient's copy in the dtype), or with
    `logps_kernel` (CUDA, triton) only the chunk's logits in the dtype, overwritten by their gradient. H200,
    4096 tokens at Llama-3.2-1B's head (results/2026-12-04-h200-linear-logps-2.txt): +1.48 GiB measured for
    torch's ops (1.48 by this count), +0.26 for the kernel (0.26)."""
    if logps_rows:
        per_logit = dtype_bytes if logps_kernel else 12
        return tokens * (4 + spec.hidden * dtype_bytes) + min(tokens, logps_rows) * spec.vocab * per_logit
    if not fused_ce:
        return tokens * spec.vocab * ((dtype_bytes if logits_held else 0) + 12)
    chunk = min(tokens, 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(spec.vocab / spec.hidden))))))
    return tokens * spec.hidden * 4 + 2 * chunk * spec.vocab * 4


def held_activation_bytes(per_layer: int, checkpoint_input: int, layers: int, checkpointing: str,
                          recompute_layers: int | None = None) -> tuple[int, int]:
    """(held from forward until backward, recomputed during one layer's backward), both in bytes.
    none: every layer's saved set. selective: `recompute_layers` layers (default half) checkpointed, each
    keeping its input; the rest save everything. full: each layer's input only (HF non-reentrant
    checkpointing). offload: inputs go to pinned CPU memory; the GPU holds the one in use and the one being
    prefetched. Checkpointed runs rebuild one layer's saved set during its backward."""
    if checkpointing not in CHECKPOINTING:
        raise ConfigError(f"plan.checkpointing: {checkpointing!r} is not one of {', '.join(CHECKPOINTING)}")
    if checkpointing == "none":
        return layers * per_layer, 0
    if checkpointing == "selective":
        ckpt = math.ceil(layers * SELECTIVE_SHARE) if recompute_layers is None else min(layers, recompute_layers)
        return (layers - ckpt) * per_layer + ckpt * checkpoint_input, per_layer
    kept = layers if checkpointing == "full" else min(layers, 2)
    return kept * checkpoint_input, per_layer


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes at the predicted peak moment, by kind. `allocated` compares with torch.cuda.max_memory_allocated;
    `peak` adds what the process holds beyond it (CUDA context, allocator slack) and is what must fit."""

    weights: int
    lora: int  # adapter weights + gradients + optimizer states
    activations: int  # tensors saved for backward at the peak moment
    loss: int  # logits and loss buffers (0 when a layer's backward is the peak)
    transient: int  # one layer's backward buffers and 4-bit dequantization (0 at the loss peak)
    overhead: int
    phase: str  # "loss" or "layers": which moment is the peak
    per_layer: int  # one decoder layer's saved tensors, no checkpointing

    @property
    def allocated(self) -> int:
        return self.weights + self.lora + self.activations + self.loss + self.transient

    @property
    def peak(self) -> int:
        return self.allocated + self.overhead

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    @property
    def allocated_gib(self) -> float:
        return self.allocated / GIB

    def breakdown_gib(self) -> dict[str, float]:
        names = ("weights", "lora", "activations", "loss", "transient", "overhead")
        return {n: round(getattr(self, n) / GIB, 3) for n in names} | {"peak": round(self.peak_gib, 3)}


def overhead_bytes(allocated: int, device: str) -> int:
    """CUDA only: the context (not seen by torch's counters) and the caching allocator's slack."""
    return CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * allocated) if device.startswith("cuda") else 0


def estimate_peak_bytes(spec: ModelSpec, *, lora_r: int = 16, lora_targets: Any = "all-linear",
                        quant: str = "none", double_quant: bool = True, dtype_bytes: int = 2,
                        seq_len: int = 2048, micro_batch: int = 1, checkpointing: str = "none",
                        recompute_layers: int | None = None,
                        optimizer: str = "adamw", fused_ce: bool = False, fast_path: bool = False,
                        lora_dropout: float = 0.0, attention: str = "sdpa", attn_mask: bool = False,
                        fast_saved_per_token: int | None = None, logits_held: bool = True,
                        device: str = "cuda", fp8_copies: bool = False, shards: int = 1,
                        logps_rows: int = 0, logps_kernel: bool = False, paired: bool = False) -> MemoryEstimate:
    """Predicted peak of a training step. `micro_batch` counts sequences (a preference pair is two);
    `fast_saved_per_token` overrides the fused path's per-layer saved bytes per token; `logits_held`: the
    caller keeps the model output (and its dtype logits) alive through backward, as HF's own loss does;
    `fp8_copies`: plan.fp8's two e4m3 copies of each decoder linear weight (ppalli/kernels/fp8.py); `shards`:
    FSDP2 ranks the 16-bit base weights are spread over (`sharded_weight_bytes`); `logps_rows`: a preference
    objective scoring tokens through train/linear_logps.py in chunks of that many rows, `logps_kernel` by its
    Triton route (see loss_bytes); `paired`: a preference objective (fast_paired_surplus_per_token)."""
    targets = lora_projections(lora_targets)
    tokens, dt = micro_batch * seq_len, dtype_bytes
    if fast_path:
        per_token = fast_saved_per_token or fast_layer_bytes_per_token(spec, r=lora_r, dtype_bytes=dt)
        per_token += fast_paired_surplus_per_token(spec, r=lora_r, dtype_bytes=dt) if paired else 0
    else:
        per_token = reference_layer_bytes_per_token(spec, targets=targets, r=lora_r, dtype_bytes=dt,
                                                    lora_dropout=lora_dropout, seq_len=seq_len,
                                                    attention=attention, attn_mask=attn_mask)
    held, rebuilt = held_activation_bytes(tokens * per_token, tokens * dt * spec.hidden, spec.layers, checkpointing,
                                          recompute_layers)
    n_lora = lora_param_count(spec, lora_r, targets)
    # the fused path's compute-dtype copy of every adapter weight, made per forward pass and held through the
    # backward (ppalli/kernels/factor_cache.py): 84 MB for Llama-3.1-8B at r = 16, also under recompute
    fp8 = 2 * spec.quantizable_params if fp8_copies else 0  # 1 byte a weight each, plus (rows,) fp32 scales
    weights = sharded_weight_bytes(spec, dt, shards) if shards > 1 else weight_bytes(spec, quant, double_quant, dt)
    static = (weights + fp8,
              lora_state_bytes(n_lora, optimizer) + (n_lora * dt if fast_path else 0))
    final_norm = tokens * final_norm_bytes_per_token(spec, dt, fast_path)
    at_loss = (held + final_norm, loss_bytes(spec, tokens, dt, fused_ce, logits_held, logps_rows, logps_kernel), 0)
    work = tokens * backward_work_bytes_per_token(spec, dt, fast_path) + dequant_scratch_bytes(spec, quant, dt)
    at_layers = (held + rebuilt, 0, work)
    phase, (act, loss, transient) = max(("loss", at_loss), ("layers", at_layers), key=lambda p: sum(p[1]))
    allocated = sum(static) + act + loss + transient
    return MemoryEstimate(weights=static[0], lora=static[1], activations=act, loss=loss, transient=transient,
                          overhead=overhead_bytes(allocated, device), phase=phase, per_layer=tokens * per_token)
