"""The fast path: fused decoder layers swapped into one model instance, logged and reversible.

`apply_fast_path(model, ...)` replaces each decoder layer's `forward` on that layer object only (an instance
attribute shadowing the class method; no class, module or function of transformers or peft is touched,
and nothing happens at import time). The fused forward computes what the HF layer computes, with:
RMSNorm kernel -> lora_qkv (one saved input for q, k, v; RoPE, and Qwen3's / Gemma-3's / EXAONE-4's frozen
q/k-norms, applied inside) -> `attend` (the planner's backend; varlen for packed batches) -> lora_add_rms_norm
(o's LoRA term, the residual add, the MLP's norm; post-norm families: lora_linear (o) -> rms_norm_add) ->
lora_mlp (SwiGLU/GeGLU with a recomputing backward). `handle.revert()` deletes the instance
attributes, so the layers run their class's forward again, exactly as before.

The frozen base weights of q, k, v (where lora_qkv applies RoPE) are laid out as one (out, in) block per layer:
each parameter keeps its identity and values, its .data becomes a row block of the layer's tensor, so the
block's input gradient is one GEMM over K = Hq*D + 2 Hk*D instead of a GEMM plus two accumulating ones
(`stack_base_weights`, logged; revert gives each weight its own storage again). lora_qkv checks the layout at
each use and takes one GEMM per weight when anything (a .to(), a merge) has moved a weight since.

Activation recompute (ppalli.train.recompute) wraps the swapped forward: apply the fast path first, then
recompute; revert() removes both. HF's own gradient checkpointing lives in the class forward from
transformers 5.24 on, which the instance forward bypasses (in 5.17 it wraps __call__ and still applies).

`fast_causal_lm_loss` (fast_loss.py) runs the swapped decoder itself and fuses the lm_head with the loss.

Cases the fused layer does not cover make it call the original forward (generation with a KV cache,
attention weights requested, adapters merged or several active at once): logged once per reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ppalli.errors import PpalliError
from ppalli.kernels._utils import interpreting, is_recomputing, is_triton_available
from ppalli.kernels.factor_cache import FactorCache, using_factor_cache
from ppalli.kernels.fp8 import FP8_ATTR, Fp8Weights, fp8_shapes_ok, fp8_supported
from ppalli.kernels.geglu import geglu
from ppalli.kernels.lora_add_rms_norm import lora_add_rms_norm
from ppalli.kernels.lora_linear import (
    LoRAParts,
    lora_linear,
    lora_linear_split,
    lora_parts,
    lora_problem,
    stack_base_weights,
    unstack_base_weights,
)
from ppalli.kernels.lora_mlp import lora_mlp
from ppalli.kernels.lora_qkv import lora_qkv
from ppalli.kernels.rms_norm import rms_norm, rms_norm_residual
from ppalli.kernels.rms_norm_add import rms_norm_add
from ppalli.kernels.rope import apply_rope
from ppalli.kernels.swiglu import swiglu
from ppalli.models.attention import attend, resolve_backend
from ppalli.models.families import FamilySpec, family_for_layer

logger = logging.getLogger("ppalli")

# HF config activation names -> the fused kernels' names. gelu_new is the same tanh approximation.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}
_HF_MASKING = ("sdpa", "eager")  # HF implementations that hand layers a full (B, 1, T, T) mask for packed rows


# --------------------------------------------------------------------------- the model's parts


def causal_lm(model: nn.Module) -> nn.Module:
    """The HF *ForCausalLM inside a PEFT model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_of(model: nn.Module) -> nn.Module:
    """The decoder stack (LlamaModel, ...) holding embed_tokens, layers, norm and rotary_emb."""
    lm = causal_lm(model)
    inner = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    return inner if inner is not None and hasattr(inner, "layers") else lm.model


def activation(spec: FamilySpec, config) -> str | None:
    """The fused MLP activation for this config ("silu" / "gelu_tanh"), or None when unsupported."""
    name = next((getattr(config, k) for k in spec.act_keys if getattr(config, k, None)), None)
    return ACTIVATIONS.get(name)


def norm_eps(norm: nn.Module) -> float:
    """An HF RMSNorm's epsilon (`variance_epsilon` in most families, `eps` in some)."""
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else norm.eps)


def _layer_targets(layer: nn.Module, spec: FamilySpec) -> dict[str, nn.Module | None]:
    attn, mlp = layer.self_attn, layer.mlp
    names = {n: attn for n in (*spec.qkv, spec.o)} | {n: mlp for n in spec.mlp}
    return {n: getattr(owner, n, None) for n, owner in names.items()}


def cu_seqlens_from_position_ids(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """(n+1,) int32 sample boundaries of a packed row (positions restart at 0), or None for one sample.

    One device sync (nonzero); collators that pack pass cu_seqlens and skip this.
    """
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    first = torch.zeros_like(pos, dtype=torch.bool)
    first[0] = True
    starts = torch.nonzero((pos == 0) | first).flatten()  # (n,)
    if starts.numel() <= 1:
        return None
    end = torch.tensor([pos.numel()], device=pos.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


# --------------------------------------------------------------------------- can it run?


def _config_problem(model: nn.Module, lora_cfg) -> str | None:
    if lora_cfg is not None:
        if getattr(lora_cfg, "use_dora", False):
            return "DoRA (use_dora) runs on the reference path"
        dropout = getattr(lora_cfg, "dropout", getattr(lora_cfg, "lora_dropout", 0.0)) or 0.0
        if dropout > 0:
            return f"lora dropout {dropout} > 0 runs on the reference path"
    if not is_triton_available():
        return "triton is not installed (pip install ppalli[fast])"
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cuda" and not interpreting():
        return f"the fused kernels need CUDA (model on {param.device.type}; TRITON_INTERPRET=1 runs them on CPU)"
    return None


def _family_problem(layers, config) -> tuple[FamilySpec | None, str | None]:
    specs = {family_for_layer(layer) for layer in layers}
    if len(specs) != 1 or None in specs:
        kinds = sorted({type(layer).__name__ for layer in layers})
        return None, f"no fast path for {', '.join(kinds)} (supported: llama, qwen2, qwen3, mistral, gemma 1-3, " \
                     "phi3, exaone4)"
    spec = specs.pop()
    if (why := spec.problem(config)) is not None:
        return spec, f"{spec.name}: {why}"
    if activation(spec, config) is None:
        act = next((getattr(config, k) for k in spec.act_keys if getattr(config, k, None)), None)
        return spec, f"{spec.name}: activation {act!r} has no fused kernel"
    if getattr(config, "attention_dropout", 0.0):
        return spec, f"attention dropout {config.attention_dropout} > 0"
    return spec, None


def _lora_problem(layers, spec: FamilySpec, prefix: str) -> str | None:
    for i, layer in enumerate(layers):
        for name, module in _layer_targets(layer, spec).items():
            where = f"{prefix}.layers.{i}.{name}"
            if module is None:
                return f"{where} not found"
            if not hasattr(module, "lora_A"):
                return f"LoRA missing on {where} (the fast path needs LoRA on {', '.join(spec.lora_targets())})"
            if (why := lora_problem(module, training_only_dropout=False)) is not None:
                return f"{where}: {why}"
    return None


def head_problem(model: nn.Module) -> str | None:
    """Why the lm_head is not its weight alone (what the fused loss and train/linear_logps.py multiply by), or
    None."""
    head = causal_lm(model).get_output_embeddings()
    if head is None:
        return "no lm_head"
    if hasattr(head, "lora_A"):
        return "LoRA on lm_head runs on the reference path"
    if getattr(head, "bias", None) is not None:
        return "lm_head has a bias"
    return None


def supports(model: nn.Module, lora_cfg=None) -> tuple[bool, str]:
    """Whether the fast path can run this (PEFT LoRA) model, and why not. lora_cfg: ppalli's or PEFT's LoraConfig
    (dropout / lora_dropout, use_dora), optional: the adapters on the model are checked either way."""
    if (why := _config_problem(model, lora_cfg)) is not None:
        return False, why
    try:
        backbone = backbone_of(model)
    except AttributeError:
        return False, f"{type(causal_lm(model)).__name__} has no decoder stack with .layers"
    layers = list(backbone.layers)
    spec, why = _family_problem(layers, backbone.config)
    if why is None:
        why = _lora_problem(layers, spec, type(backbone).__name__) or head_problem(model)
    if why is not None:
        return False, why
    return True, f"{spec.name}: fused RMSNorm, LoRA q/k/v/o and MLP, RoPE, attention; fused lm_head + loss"


# --------------------------------------------------------------------------- the fused layer


class FusedDecoderLayer:
    """The fused forward of one decoder layer; its bound `forward` is what the layer instance runs.

    Not an nn.Module on purpose: it registers nothing, so state_dict, parameters and saving are unchanged.
    """

    def __init__(self, layer: nn.Module, spec: FamilySpec, config, backend: str, handle: FastPathHandle,
                 index: int = 0):
        attn = layer.self_attn
        self.layer, self.spec, self.config, self.backend, self.handle = layer, spec, config, backend, handle
        self.index = index  # the layer's place in the stack: a pass of the factor cache starts at the lowest
        self.act = activation(spec, config)
        self.head_dim = attn.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.scale = attn.scaling
        self.window = spec.window(layer, config)
        self.softcap = getattr(attn, "attn_logit_softcapping", None)
        self.rope = spec.uses_rope(layer)
        # attention's residual add, o's LoRA term and the MLP's norm in one kernel (not under sandwich norms)
        self.add_norm = spec.post_attn_norm is None and None not in (spec.pre_attn_norm, spec.pre_mlp_norm)
        # q, k from their projections (and frozen per-head norms) into RoPE: lora_qkv applies it, owns the backward
        self.qkv_rope = self.rope and not spec.fused_qkv
        self.original = layer.forward  # the class's forward (bound) or an instance attribute already there

    def describe(self) -> str:
        if self.qkv_rope:
            parts = ["rms_norm", "lora_qkv+qk_norm+rope" if self.spec.qk_norm else "lora_qkv+rope"]
        else:
            parts = ["rms_norm", "lora_qkv" if not self.spec.fused_qkv else "lora_linear (fused qkv)"]
            parts += ["qk_norm"] * self.spec.qk_norm + ["rope" if self.rope else "no rope"]
        parts += [f"attend[{self.backend}]"] + [f"window {self.window}"] * (self.window is not None)
        parts += [f"softcap {self.softcap}"] * bool(self.softcap)
        parts += ["lora_add_rms_norm (o, residual, norm)" if self.add_norm else "lora_linear (o)"]
        parts += ["rms_norm_add (post-norms, residual, next norm)"] * bool(self.spec.post_attn_norm)
        parts += [f"lora_mlp[{self.act}]"]
        return ", ".join(parts)

    # ---- when not to run

    def _fallback_reason(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        if args:
            return "positional arguments after hidden_states"
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return "KV cache (generation)"
        if kwargs.get("output_attentions"):
            return "attention weights requested"
        if kwargs.get("position_embeddings") is None:
            return "no position embeddings passed"
        if hidden.device.type != "cuda" and not interpreting():
            return f"hidden states on {hidden.device.type}"
        return None

    def _read_parts(self) -> tuple[dict[str, LoRAParts] | None, str | None]:
        """(the LoRA parts of each projection, None) or (None, why one cannot run fused): read once a forward,
        as adapters can be disabled or merged at any time."""
        parts = {}
        for name, module in _layer_targets(self.layer, self.spec).items():
            if (why := lora_problem(module)) is not None:
                return None, f"{name}: {why}"
            parts[name] = lora_parts(module, checked=True)
        return parts, None

    def _attention_inputs(self, kwargs: dict):
        """(mask, cu_seqlens, max_seqlen) from what HF or fast_causal_lm_loss passes the layer."""
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            return None, cu, kwargs.get("max_length_q")
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) else None  # flex's BlockMask: rebuilt below
        if mask is None and not kwargs.get("ppalli_mask_exact"):
            if getattr(self.config, "_attn_implementation", "sdpa") not in _HF_MASKING:
                # flash/flex HF implementations pass no mask for packed rows: find the samples (one sync)
                return None, cu_seqlens_from_position_ids(kwargs.get("position_ids")), None
        return mask, None, None

    # ---- the computation

    def _norm(self, name: str | None, x: torch.Tensor) -> torch.Tensor:
        if name is None:
            return x
        norm = getattr(self.layer, name)
        return rms_norm(x, norm.weight, norm_eps(norm), self.spec.norm_offset)

    def _qkv(self, h: torch.Tensor, parts: dict):
        """h (B, T, d) -> q (B, T, Hq*D), k, v (B, T, Hk*D)."""
        if self.spec.fused_qkv:  # Phi-3: one LoRA over [q | k | v]
            qkv = lora_linear(h, parts[self.spec.qkv[0]])
            q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            return qkv.split([q_size, kv_size, kv_size], dim=-1)
        return lora_qkv(h, *(parts[n] for n in self.spec.qkv))

    def _attend(self, h, cos_sin, mask, cu, max_len, parts: dict) -> torch.Tensor:
        """h (B, T, d), the normed input -> the attention heads' output (B, T, Hq*D), before the o projection."""
        attn, (b, t, _) = self.layer.self_attn, h.shape
        norms = self._qk_norms(attn)
        if self.qkv_rope and (norms is not None or not self.spec.qk_norm):
            # RoPE (and q/k's norms) inside the q/k/v block: its backward forms dx in one GEMM (lora_qkv.py)
            q, k, v = lora_qkv(h, *(parts[n] for n in self.spec.qkv), rope=cos_sin, head_dim=self.head_dim,
                               qk_norms=norms)
        else:
            q, k, v = (z.view(b, t, -1, self.head_dim) for z in self._qkv(h, parts))
            if self.spec.qk_norm:  # per head, over D
                q = rms_norm(q, attn.q_norm.weight, norm_eps(attn.q_norm), self.spec.norm_offset)
                k = rms_norm(k, attn.k_norm.weight, norm_eps(attn.k_norm), self.spec.norm_offset)
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
            if self.rope:
                q, k = apply_rope(q, k, *cos_sin)
        o = attend(q, k, v, backend=self.backend, cu_seqlens=cu, max_seqlen=max_len, attention_mask=mask,
                   scale=self.scale, window=self.window, softcap=self.softcap)  # (B, T, Hq, D)
        return o.reshape(b, t, -1)

    def _qk_norms(self, attn: nn.Module):
        """((q_norm weight, eps), (k_norm weight, eps), offset) for lora_qkv, or None: no such norms, or they
        train (the fused pass gives them no gradient, so the norms then run one by one)."""
        if not self.spec.qk_norm or attn.q_norm.weight.requires_grad or attn.k_norm.weight.requires_grad:
            return None
        return ((attn.q_norm.weight, norm_eps(attn.q_norm)), (attn.k_norm.weight, norm_eps(attn.k_norm)),
                self.spec.norm_offset)

    def _mlp(self, h: torch.Tensor, parts: dict, residual: torch.Tensor) -> torch.Tensor:
        """h (B, T, d), already normed -> residual + the MLP block's output (B, T, d)."""
        if self.spec.fused_gate_up:  # Phi-3: one LoRA over [gate | up]; h is kept by the autograd activation
            gate, up = lora_linear(h, parts[self.spec.mlp[0]]).chunk(2, dim=-1)
            act = swiglu if self.act == "silu" else geglu
            out = lora_linear(act(gate, up), parts[self.spec.mlp[1]])
        elif self.spec.post_mlp_norm is None:  # the residual add joins the pass that adds down's LoRA term
            return lora_mlp(h, *(parts[n] for n in self.spec.mlp), act=self.act, residual=residual)
        else:
            out = lora_mlp(h, *(parts[n] for n in self.spec.mlp), act=self.act)
        return self._post_norm_add(residual, out, self.spec.post_mlp_norm, None)[0]

    def _post_norm_add(self, residual, y, post: str | None, pre: str | None):
        """(x = residual + post-norm(y), the next pre-norm of x or x): Gemma-2/3's sandwich and EXAONE-4's
        post-norms in one pass over (N, d) (rms_norm_add.py), op by op where a norm's weight trains."""
        post_n, pre_n = (getattr(self.layer, n) if n else None for n in (post, pre))
        if post_n is None or any(n is not None and n.weight.requires_grad for n in (post_n, pre_n)):
            x = residual + self._norm(post, y)
            return x, self._norm(pre, x)
        out = rms_norm_add(residual, y, post_n.weight, norm_eps(post_n), self.spec.norm_offset,
                           None if pre_n is None else (pre_n.weight, norm_eps(pre_n)))
        return out if pre_n is not None else (out, out)

    def _add_norm(self, hidden: torch.Tensor, o: torch.Tensor, parts: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, n): x = hidden + o projection of o (B, T, Hq*D), n = the MLP's RMSNorm of x, in one pass over
        (N, d) with the o projection's LoRA term inside (lora_add_rms_norm.py). Layers whose attention output
        is normed before the residual add (Gemma's sandwich norms) run the ops one by one."""
        norm, op = getattr(self.layer, self.spec.pre_mlp_norm), parts[self.spec.o]
        if op.a is None:
            y0, xa = lora_linear(o, op), None
        else:
            y0, xa = lora_linear_split(o, op)  # (N, d), (N, r)
        return lora_add_rms_norm(hidden, y0.view(hidden.shape), xa, op.b, op.scaling, norm.weight,
                                 norm_eps(norm), self.spec.norm_offset)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Drop-in for the HF layer's forward(hidden_states, attention_mask=, position_embeddings=, ...)."""
        why, parts = self._fallback_reason(hidden_states, args, kwargs), None
        if why is None:
            parts, why = self._read_parts()
        if why is not None:
            if kwargs.get("ppalli_mask_exact"):  # inside fast_causal_lm_loss the original would mis-mask packing
                raise PpalliError(f"fast path cannot run {type(self.layer).__name__}: {why}")
            self.handle.note_fallback(why)
            return self.original(hidden_states, *args, **kwargs)
        if not is_recomputing():  # a recompute reads the copies of the pass it belongs to
            self.handle.factors.start_layer(self.index)
        with using_factor_cache(self.handle.factors):
            return self._fused(hidden_states, parts, kwargs)

    def _fused(self, hidden_states: torch.Tensor, parts: dict, kwargs: dict) -> torch.Tensor:
        mask, cu, max_len = self._attention_inputs(kwargs)
        # the residual read through the input norm's view: its gradient is added in the norm's backward
        res, h = hidden_states, hidden_states  # EXAONE 4: no input norm
        if (norm := self.spec.pre_attn_norm) is not None:
            norm = getattr(self.layer, norm)
            res, h = rms_norm_residual(hidden_states, norm.weight, norm_eps(norm), self.spec.norm_offset)
        o = self._attend(h, kwargs["position_embeddings"], mask, cu, max_len, parts)  # (B, T, Hq*D)
        if self.add_norm:
            x, h = self._add_norm(res, o, parts)
        else:
            o = lora_linear(o, parts[self.spec.o])  # (B, T, d)
            x, h = self._post_norm_add(res, o, self.spec.post_attn_norm, self.spec.pre_mlp_norm)
        return self._mlp(h, parts, x)


# --------------------------------------------------------------------------- applying and reverting


_NO_INSTANCE_FORWARD = object()


def _swapped_directly(layer: nn.Module) -> bool:
    """The layer's instance forward is the fused one itself, with nothing wrapped around it."""
    return isinstance(getattr(layer.__dict__.get("forward"), "__self__", None), FusedDecoderLayer)


@dataclass
class FastPathHandle:
    """What apply_fast_path did to one model instance; `revert()` undoes it."""

    family: str
    backend: str
    backend_reason: str
    log: Callable[[str], None]
    swaps: list[tuple[nn.Module, object]] = field(default_factory=list)  # (layer, its previous forward attr)
    fallbacks: set[str] = field(default_factory=set)
    factors: FactorCache = field(default_factory=FactorCache)  # the fused layers' bf16 LoRA factors
    stacked: list[tuple[nn.Module, ...]] = field(default_factory=list)  # q/k/v base layers laid out as one block
    fp8: list[nn.Module] = field(default_factory=list)  # base layers given e4m3 copies (plan.fp8)

    @property
    def active(self) -> bool:
        return bool(self.swaps)

    def note_fallback(self, reason: str) -> None:
        if reason not in self.fallbacks:  # once per reason: a generate() call would log it every token
            self.fallbacks.add(reason)
            self.log(f"fast path: a layer ran its original forward ({reason})")

    def revert(self) -> None:
        """Put back each layer's previous forward: the class method (instance attribute deleted) or the
        instance attribute that was there before (e.g. an accelerate hook). Wrappers applied on top of the
        fused forward after the swap (activation recompute) go with it, logged."""
        for base in self.fp8:
            base.__dict__.pop(FP8_ATTR, None)
        if self.fp8:
            self.log(f"fast path: {len(self.fp8)} base layers back to bf16 GEMMs (their fp8 copies freed)")
        for bases in self.stacked:
            unstack_base_weights(bases)
        if self.stacked:
            self.log(f"fast path: q/k/v base weights of {len(self.stacked)} layers back in their own storage")
        wrapped = sum(not _swapped_directly(layer) for layer, _ in self.swaps)
        if wrapped:
            self.log(f"fast path: {wrapped} layers had wrappers over the fused forward (e.g. recompute); "
                     "reverting removes them too")
        for layer, previous in reversed(self.swaps):
            if previous is _NO_INSTANCE_FORWARD:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous
        if self.swaps:
            self.log(f"fast path: reverted {len(self.swaps)} layers to their original forward")
        self.swaps.clear()
        self.stacked.clear()
        self.fp8.clear()
        self.factors.clear()


def _fused_forward_of(layer: nn.Module):
    """The fused forward a layer runs, also under wrappers applied after the swap (functools.wraps sets
    __wrapped__, as ppalli.train.recompute's does), else None."""
    fn = layer.__dict__.get("forward")
    for _ in range(8):  # a few wrappers deep at most
        if fn is None or isinstance(getattr(fn, "__self__", None), FusedDecoderLayer):
            return fn
        fn = getattr(fn, "__wrapped__", None)
    return None


def _is_swapped(layer: nn.Module) -> bool:
    return _fused_forward_of(layer) is not None


def fully_swapped(model: nn.Module) -> bool:
    """Whether every decoder layer runs the fused forward (what decoder_hidden_states needs)."""
    return all(_is_swapped(layer) for layer in backbone_of(model).layers)


def apply_fast_path(model: nn.Module, *, attention_backend: str = "auto",
                    log: Callable[[str], None] | None = None, lora_cfg=None, fp8: bool = False) -> FastPathHandle:
    """Swap each decoder layer's forward, on this instance only, for the fused one; returns the handle to revert.

    attention_backend: the planner's choice ("auto", "sdpa", "flash_attention_2", ..., or an `attend` backend
    name such as "sdpa_cudnn"). log: a callable taking one line (default: the "ppalli" logger at INFO).
    fp8: the decoder layers' frozen base GEMMs in e4m3 (ppalli/kernels/fp8.py; plan.fp8).
    Raises PpalliError with the reason when `supports` says no.
    """
    log = log or logger.info
    ok, why = supports(model, lora_cfg)
    if not ok:
        raise PpalliError(f"fast path not applicable: {why}")
    backbone = backbone_of(model)
    if any(_is_swapped(layer) for layer in backbone.layers):
        raise PpalliError("the fast path is already applied to this model; revert its handle first")
    spec = family_for_layer(backbone.layers[0])
    device = next(model.parameters()).device
    supported, why = fp8_supported(device) if fp8 else (True, "")
    if not supported:
        raise PpalliError(f"plan.fp8: {why}")
    backend, reason = resolve_backend(attention_backend, device)
    handle = FastPathHandle(family=spec.name, backend=backend, backend_reason=reason, log=log)
    log(f"fast path: {spec.name}, attention {backend} ({reason})")
    if any(getattr(layer, "gradient_checkpointing", False) for layer in backbone.layers):
        log("fast path: HF gradient checkpointing is on; transformers >= 5.24 checkpoints inside the class "
            "forward, which the fused forward replaces: use ppalli.train.recompute (applied after this swap)")
    prefix = type(backbone).__name__
    for i, layer in enumerate(backbone.layers):
        fused = FusedDecoderLayer(layer, spec, backbone.config, backend, handle, i)
        handle.swaps.append((layer, layer.__dict__.get("forward", _NO_INSTANCE_FORWARD)))
        layer.forward = fused.forward
        log(f"fast path: {prefix}.layers.{i} ({type(layer).__name__}).forward -> fused ({fused.describe()})")
        handle.stacked += _stack_bases(layer, spec, fused)
    if handle.stacked:
        log(f"fast path: q/k/v base weights of {len(handle.stacked)} layers laid out as one (out, in) block each "
            "(same parameters and values), so the input gradient's base term is one GEMM")
    if fp8:
        _attach_fp8(handle, backbone.layers, spec)
    return handle


def _attach_fp8(handle: FastPathHandle, layers, spec: FamilySpec) -> None:
    """Give each 16-bit base layer of the LoRA blocks an Fp8Weights (its e4m3 copies, made on first use): the
    fused blocks then run its GEMMs in fp8. An instance attribute on that layer, removed by revert()."""
    skipped = 0
    for layer in layers:
        for module in _layer_targets(layer, spec).values():
            if module is None:
                continue
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            w = getattr(base, "weight", None)
            if w is None or not w.is_floating_point() or w.element_size() == 1 or not fp8_shapes_ok(w):
                skipped += 1  # 4-bit (packed bytes) or a side not a multiple of 16: 16-bit GEMMs
                continue
            base.__dict__[FP8_ATTR] = Fp8Weights()
            handle.fp8.append(base)
    handle.log(f"fast path: fp8 (e4m3, per-row scales) GEMMs for {len(handle.fp8)} frozen base layers"
               + (f"; {skipped} stay as they are (4-bit, or a side not a multiple of 16)" if skipped else "")
               + "; the lm_head, attention and the adapters stay bf16")


def _stack_bases(layer: nn.Module, spec: FamilySpec, fused: FusedDecoderLayer) -> list[tuple[nn.Module, ...]]:
    """Lay out the q/k/v base weights as one block where lora_qkv applies RoPE (and so owns the buffer its
    one-GEMM input gradient reads); -> the groups laid out. Gate and up stay apart: laid out as one, with their
    outputs the halves of one (N, 2I) buffer, T4 lost 2.2 ms a step and T1 gained 1.6 on the H200
    (benchmarks/results/2026-12-03-h200-*-s11-gateup.md against *-s11.md)."""
    if not fused.qkv_rope:
        return []
    bases = tuple(_layer_targets(layer, spec)[n].get_base_layer() for n in spec.qkv)
    return [bases] if stack_base_weights(bases) else []
