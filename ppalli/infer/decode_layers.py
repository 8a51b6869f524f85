"""Decoder layers for generation in few kernels: each layer's forward swapped on that instance while decoding.

HF's Llama layer launches ~54 kernels per decode step: RMSNorm as 7 elementwise ops, RoPE as ~10, three q/k/v
GEMMs with split-K reductions, two residual adds, SiLU and the product apart. On an H200 (2026-12-04,
benchmarks/results/2026-12-04-h200-s22-decode-profile-8b.txt) a Llama-3.1-8B step from the CUDA graph ran 1,724
kernels in 6.98 ms of device time, while its GEMMs took 4.46 ms and its ~16 GB of weights need ~3.4 at the
card's bandwidth: a third of the step was small kernels. The swapped forward computes the same layer as

    h = rms_norm(x)                                 1 kernel (ppalli/kernels/rms_norm.py)
    q, k, v = h [Wq; Wk; Wv]^T (+ bias)             1 GEMM over the stacked weights
    q, k = rope(norm(q), norm(k)); k, v to cache    2 (kernels/rope.py, Qwen3's per-head norms inside; a growing
                                                    cache: rope, then the cache's own update)
    a = attention(q, k, v, mask)                    one new token: kernels/decode_attention.py; a prompt: SDPA
    x, h = x + a Wo^T, rms_norm(.)                  GEMM + 1 (kernels/lora_add_rms_norm.py without LoRA)
    x + act(h Wg^T) * (h Wu^T) Wd^T                 1 GEMM over [Wg; Wu], 1 (swiglu/geglu), GEMM, add

The q/k/v and gate/up weights become row blocks of one tensor per layer while the swap holds (each parameter
keeps its identity and values; `stack_base_weights`), and get their own storage back on revert, so saving,
merging or training afterwards sees the model as it was. bitsandbytes 4-bit bases (after QLoRA) are read as
they are stored, one nf4_linear launch a projection, and an adapter left unmerged (a 4-bit base, `--no-merge`)
adds its branch inside those launches or as one addmm_ a group (infer/decode_proj.py). The swap is per instance
(an instance `forward` shadowing the class's), logged, and reverted when decoding ends; any call it does not
cover (no cache, attention weights asked for, a partial rotary table, another dtype) runs the original forward.
Llama, Qwen2/3, Mistral, Phi-3, Gemma 1, 2 and 3, EXAONE 4 with SDPA or eager attention: Gemma-2/3's sandwich
norms and EXAONE-4's post-norms as x + norm(o) and the next norm in one kernel (kernels/rms_norm_add.py), Gemma-2's
attention logit softcapping inside decode_attention (the prompt: `_softcapped_attention`, as HF's eager path),
EXAONE-4's global layers without RoPE (their q/k norms alone), sliding-window layers through HF's masks and its
cache's own window (the growing cache: graph.py keeps ring caches off the static decoder). 8-bit, sharded or
offloaded bases, DoRA, several active adapters and the rest decode through HF's layers, the reason logged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ppalli.infer.decode_proj import ProjGroup, proj_problem
from ppalli.kernels._utils import interpreting, is_triton_available, next_power_of_2
from ppalli.kernels.decode_attention import decode_attention
from ppalli.kernels.geglu import geglu_fwd_stacked
from ppalli.kernels.lora_add_rms_norm import lora_add_rms_norm_fwd
from ppalli.kernels.lora_linear import stack_base_weights, unstack_base_weights
from ppalli.kernels.rms_norm import rms_norm_fwd
from ppalli.kernels.rms_norm_add import rms_norm_add_fwd
from ppalli.kernels.rope import rope_fwd, rope_into_cache
from ppalli.kernels.swiglu import swiglu_fwd_stacked
from ppalli.models.attention import eager_attention
from ppalli.models.families import family_for_layer
from ppalli.models.fast import activation, backbone_of, causal_lm, norm_eps

_log = logging.getLogger("ppalli.infer")
_GLU = {"silu": swiglu_fwd_stacked, "gelu_tanh": geglu_fwd_stacked}  # by the fast path's activation names


def _row_blocks(d: int) -> tuple[int, int, int]:
    """lora_add_rms_norm's launch for a few rows: a program per row over the whole width. Its training setting
    (16 rows, 512 columns a step) took 10.0 us a Llama-3.1-8B decode step's row (H200, 2026-12-04,
    results/2026-12-04-h200-s22-decode-profile-8b.txt), one program walking 8 blocks twice."""
    return 1, min(4096, next_power_of_2(d)), 4


class DecodeLayer:
    """The swapped forward of one decoder layer (see the module docstring); not an nn.Module, so the
    model's parameters and state_dict stay as they are."""

    def __init__(self, layer: nn.Module, spec, config, dtype: torch.dtype):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer, self.spec, self.dtype = layer, spec, dtype
        self.qkv = ProjGroup([getattr(attn, n) for n in spec.qkv], dtype)  # (q, k, v) or Phi-3's (qkv_proj,)
        self.o = ProjGroup([getattr(attn, spec.o)], dtype)
        self.gate_up = ProjGroup([getattr(mlp, n) for n in spec.mlp[:-1]], dtype)  # (gate, up) or (gate_up_proj,)
        self.down = ProjGroup([getattr(mlp, spec.mlp[-1])], dtype)
        # pre-norms (None: EXAONE 4 has none) and Gemma-2/3's / EXAONE-4's post-norms (None: pre-norm families)
        self.norm1, self.norm2, self.post_attn, self.post_mlp = (
            getattr(layer, n) if n else None
            for n in (spec.pre_attn_norm, spec.pre_mlp_norm, spec.post_attn_norm, spec.post_mlp_norm))
        self.rope = spec.uses_rope(layer)  # EXAONE 4's global layers: no position embedding at all
        self.q_norm, self.k_norm = (attn.q_norm, attn.k_norm) if spec.qk_norm else (None, None)
        self.head_dim, self.scale, self.layer_idx = attn.head_dim, attn.scaling, attn.layer_idx
        self.softcap = getattr(attn, "attn_logit_softcapping", None) or None  # Gemma 2
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.glu: Callable = _GLU[activation(spec, config)]
        self.original = layer.forward

    def stack(self) -> None:
        for group in (self.qkv, self.gate_up):
            if len(group.bases) > 1 and not group.four_bit:
                stack_base_weights(group.bases)

    def unstack(self) -> None:
        for group in (self.qkv, self.gate_up):
            if len(group.bases) > 1 and not group.four_bit:
                unstack_base_weights(group.bases)

    def _covers(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cos_sin = kwargs.get("position_embeddings")
        return (not args and cache is not None and cos_sin is not None and not kwargs.get("output_attentions")
                and cos_sin[0].shape[-1] == self.head_dim and hidden_states.dtype == self.dtype)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Drop-in for the HF layer's forward(hidden_states, attention_mask=, position_embeddings=, cache=, ...)."""
        if not self._covers(hidden_states, args, kwargs):
            return self.original(hidden_states, *args, **kwargs)
        b, t, d = hidden_states.shape
        x = hidden_states.reshape(b * t, d)  # (M, d)
        h = self._norm(self.norm1, x)
        q, k, v = self._qkv(h, b, t)  # (B, H, T, D) each
        q, k, v = self._rope_cache(q, k, v, kwargs["position_embeddings"], kwargs.get("cache",
                                                                                   kwargs.get("past_key_values")))
        a = self._attend(q, k, v, kwargs.get("attention_mask"))  # (M, Hq*D)
        if self.post_attn is None:
            x, h, _ = lora_add_rms_norm_fwd(x, self.o(a), None, None, 0.0, self.norm2.weight, norm_eps(self.norm2),
                                            self.spec.norm_offset, blocks=_row_blocks(d))
        else:  # x + post-norm(o) and the MLP's pre-norm of it in one pass (Gemma 3; EXAONE 4: h is that sum)
            x, h = self._post_norm_add(x, self.o(a), self.post_attn, self.norm2)
        y = self.down(self.glu(self.gate_up(h)))  # (M, 2I) -> (M, I) -> (M, d)
        out = x + y if self.post_mlp is None else self._post_norm_add(x, y, self.post_mlp, None)[0]
        return out.view(b, t, d)

    def _norm(self, norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return x if norm is None else rms_norm_fwd(x, norm.weight, norm_eps(norm), self.spec.norm_offset)[0]

    def _post_norm_add(self, x, y, post: nn.Module, pre: nn.Module | None):
        """(x + RMSNorm(y) with post's weight, pre's RMSNorm of that sum or the sum itself): rms_norm_add.py."""
        nxt = None if pre is None else (pre.weight, norm_eps(pre))
        x, h, _, _ = rms_norm_add_fwd(x, y, post.weight, norm_eps(post), self.spec.norm_offset, nxt)
        return x, (x if h is None else h)

    def _qkv(self, h: torch.Tensor, b: int, t: int):
        """h (M, d) -> q (B, Hq, T, D), k, v (B, Hk, T, D): views of one (M, (Hq + 2 Hk) D) output."""
        qkv = self.qkv(h)  # (M, (Hq + 2 Hk) D)
        sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
        q, k, v = (z.view(b, t, -1, self.head_dim) for z in qkv.split(sizes, dim=-1))  # (B, T, H, D)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _rope_cache(self, q, k, v, cos_sin, cache):
        """RoPE and the cache's update -> (rotated q, the cache's k, v (B, Hk, L, D)). A new token on a static cache
        layer HF has set up: rope writes k and v into their slot itself (rope_into_cache: 1 launch and the length's
        add instead of rope's k launch and the layer's arange, two adds and two index_copy_); otherwise rope, then
        the cache's own update."""
        if not self.rope:  # EXAONE 4's global layers: the q/k norms alone
            if self.q_norm is not None:
                q, k = (rms_norm_fwd(z, n.weight, norm_eps(n), self.spec.norm_offset)[0]
                        for z, n in ((q, self.q_norm), (k, self.k_norm)))
            return (q, *cache.update(k, v, self.layer_idx))
        layer = cache.layers[self.layer_idx] if q.shape[2] == 1 and hasattr(cache, "layers") else None
        norms = None if self.q_norm is None else (  # Qwen3's per-head norms, inside rope's launches
            (self.q_norm.weight, norm_eps(self.q_norm)), (self.k_norm.weight, norm_eps(self.k_norm)),
            self.spec.norm_offset)
        if type(layer) is StaticLayer and layer.is_initialized:
            q = rope_into_cache(q, k, v, *cos_sin, layer.keys, layer.values, layer.cumulative_length, norms)
            layer.cumulative_length.add_(1)
            return q, layer.keys, layer.values
        q, k = rope_fwd(q, k, *cos_sin, qk_norms=norms)
        return (q, *cache.update(k, v, self.layer_idx))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """q (B, Hq, T, D), the cache's k, v (B, Hk, L, D), mask (B, 1, T, L') (bool, additive or None, L' >= L)
        -> (B*T, Hq*D). One new token a row: decode_attention (the cache split across the SMs, query heads read
        against their kv head, no repeated copy of the cache as HF makes whenever a mask is passed); otherwise
        (the prompt) SDPA as HF's path calls it, or with a softcap, `_softcapped_attention`."""
        b, hq, t, dim = q.shape
        if t == 1:
            valid = None if mask is None else _seen(mask[:, 0, 0, :k.shape[2]])  # (B, L), as HF slices it for SDPA
            return decode_attention(q.reshape(b, hq, dim), k, v, valid, self.scale, softcap=self.softcap)
        if self.softcap:
            return _softcapped_attention(q, k, v, mask, self.scale, self.softcap).reshape(b * t, hq * dim)
        o, _ = sdpa_attention_forward(self.layer.self_attn, q, k, v, mask, dropout=0.0, scaling=self.scale)
        return o.reshape(b * t, hq * dim)  # HF returns (B, T, Hq, D)


def _seen(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask, or HF's additive one for eager attention (0 where a key is seen, the dtype's least value
    where not), as the bool mask of the keys each row sees."""
    return mask if mask.dtype == torch.bool else mask == 0


# Query rows a step of the prompt's softcapped attention: its (B, Hq, rows, L) scores stay ~0.5 GiB for a row of
# 16 heads (Gemma-2-9B) at 16k keys in bf16, where HF's eager path holds the whole (B, Hq, T, L) at once.
PROMPT_ROWS = 1024


def _softcapped_attention(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    """Gemma 2's attention of a prompt as HF's eager path computes it (models/attention.py's eager_attention), in
    steps of PROMPT_ROWS queries. q (B, Hq, T, D), k, v (B, Hk, L, D), mask (B, 1, T, L') bool, additive or None
    (causal: the T queries are the last of the L keys) -> (B, T, Hq, D) in q's dtype."""
    t, n_keys = q.shape[2], k.shape[2]
    if mask is None:
        pos = torch.arange(t, device=q.device)[:, None] + (n_keys - t)
        mask = (torch.arange(n_keys, device=q.device)[None, :] <= pos)[None, None]  # (1, 1, T, L)
    k, v = (z.repeat_interleave(q.shape[1] // z.shape[1], dim=1) for z in (k, v))  # once, not per step
    return torch.cat([eager_attention(q[:, :, r0:r0 + PROMPT_ROWS], k, v, mask[:, :, r0:r0 + PROMPT_ROWS, :n_keys],
                                      scale, None, softcap) for r0 in range(0, t, PROMPT_ROWS)], dim=1)


def decode_problem(model) -> str | None:
    """Why the decode layers cannot run `model`, or None."""
    if not is_triton_available():
        return "triton is not installed"
    param = next(model.parameters(), None)
    if param is None or (param.device.type != "cuda" and not interpreting()):
        return "the model is not on CUDA"
    try:
        layers = list(backbone_of(model).layers)
    except AttributeError:
        return f"{type(causal_lm(model)).__name__} has no decoder stack with .layers"
    config = causal_lm(model).config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return f"attention implementation {getattr(config, '_attn_implementation', None)!r} (they take sdpa or eager)"
    return next((why for i, layer in enumerate(layers) if (why := _layer_problem(layer, config, i))), None)


def swapped_in(model) -> bool:
    """Every layer runs a decode layer's forward (inside decode_layers)."""
    try:
        layers = list(backbone_of(model).layers)
    except AttributeError:
        return False
    return bool(layers) and all(isinstance(getattr(layer.__dict__.get("forward"), "__self__", None), DecodeLayer)
                                for layer in layers)


def _layer_problem(layer: nn.Module, config, index: int) -> str | None:
    spec, where = family_for_layer(layer), f"layer {index}"
    if spec is None:
        return f"no decode layer for {type(layer).__name__}"
    if (why := spec.problem(config)) is not None:
        return f"{spec.name}: {why}"
    if activation(spec, config) is None:
        return f"{spec.name}: no fused GLU for its activation"
    if "forward" in layer.__dict__:
        return f"{where} already has an instance forward (hooks or the training fast path)"
    groups = [[getattr(layer.self_attn, n, None) for n in spec.qkv], [getattr(layer.self_attn, spec.o, None)],
              [getattr(layer.mlp, n, None) for n in spec.mlp[:-1]], [getattr(layer.mlp, spec.mlp[-1], None)]]
    names = [spec.qkv, (spec.o,), spec.mlp[:-1], spec.mlp[-1:]]
    for mods, group_names in zip(groups, names):
        for name, module in zip(group_names, mods):
            if (why := proj_problem(module)) is not None:
                return f"{where}.{name}: {why}"
        if (why := ProjGroup.problem(mods)) is not None:
            return f"{where} {'/'.join(group_names)}: {why}"
    return None


@contextlib.contextmanager
def decode_layers(model, enabled: bool = True, log: Callable[[str], None] = _log.info) -> Iterator[bool]:
    """Swap in the decode layers for the block when they can run `model` (yields whether they did); the layers'
    own forwards and the weights' own storage come back at the end, whatever happens inside."""
    why = decode_problem(model) if enabled else "off"
    if why is not None:
        if enabled:
            log(f"decoding through the model's own layers: {why}")
        yield False
        return
    config = causal_lm(model).config
    dtype = causal_lm(model).get_input_embeddings().weight.dtype  # the activations' dtype
    swapped = []
    try:
        with torch.inference_mode(False):  # the stacked blocks are the parameters' storage: no inference tensors
            for layer in backbone_of(model).layers:
                swapped.append(DecodeLayer(layer, family_for_layer(layer), config, dtype))
                swapped[-1].stack()
                layer.forward = swapped[-1].forward
        first = swapped[0]
        bases = ("4-bit bases through nf4_linear" if first.qkv.four_bit else "one q/k/v GEMM, one gate/up GEMM")
        groups = (first.qkv, first.o, first.gate_up, first.down)
        lora = ", LoRA unmerged" if any(g.a_stack is not None for g in groups) else ""
        log(f"decoding with ppalli's decode layers ({len(swapped)} layers, {first.spec.name}: rms_norm, {bases}"
            f"{lora}, rope, add + rms_norm, fused GLU)")
        yield True
    finally:
        with torch.inference_mode(False):
            for d in swapped:
                d.layer.__dict__.pop("forward", None)
                d.unstack()

