"""Attention for the fast decoder layers: one entry point, `attend`, with the backend chosen at run time.

Backends (the names `resolve_backend` returns and `attend` takes):
- "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math": torch SDPA with that kernel first, the others
  after it as fallbacks (`sdpa_kernel(..., set_priority=True)`), so a case the first refuses still runs.
  On an H100, causal GQA forward+backward (4x32 heads x 2048 x 128, 8 kv heads) took 1.41 ms on cuDNN and
  2.29 ms on flash, and the memory-efficient kernel refused GQA (BENCHMARKS.md, 2026-11-23): an explicit
  choice is worth 1.6x on attention over letting torch pick.
- "sdpa": torch's own dispatch (CPU, MPS, or when the planner has no better choice).
- "flash_attention_2" / "flash_attention_3" / "flash_attention_4": the flash-attn packages (`flash_attn`,
  `flash_attn_interface`, and flash-attn-4's CuTe DSL kernels `flash_attn.cute`, compiled at their first call).
- "eager": explicit scores.
Gemma-2's attention logit softcap (SDPA has none) runs in flash-attn when installed, else in torch's
flex_attention (compiled; CUDA, capability 8.0+), else in the eager path, which holds (B, H, T, T) scores.

Packed batches (cu_seqlens from the collator) never attend across samples: samples all of one length are
rows of a dense batch (plain causal attention, cuDNN's kernel on Hopper), else flash-attn's varlen kernel
when installed, else torch's `varlen_attn` (torch >= 2.11, CUDA, compute capability >= 8.0), else SDPA
with a block-diagonal causal mask (CPU, older GPUs; O(T^2) mask memory, correct everywhere).

Masks follow HF's sliding-window rule: key j is visible from query i when 0 <= i - j < window.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch
import torch.nn.functional as F

from ppalli.errors import PpalliError

BACKENDS = ("sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math",
            "flash_attention_2", "flash_attention_3", "flash_attention_4", "eager")
_FLASH_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface",
                  "flash_attention_4": "flash_attn.cute"}
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- choosing a backend


@functools.lru_cache(maxsize=4)
def _import_flash(backend: str) -> tuple:
    """(module, "") for "flash_attention_2" / "_3" / "_4", else (None, why). flash-attn 4 loads CUTLASS's DSL
    libraries at import: a broken install fails there with an OSError or RuntimeError, said as such."""
    name = _FLASH_MODULES[backend]
    try:
        module = importlib.import_module(name)
        if not hasattr(module, "flash_attn_func"):  # flash-attn 4 alone makes `flash_attn` a bare namespace
            return None, f"{name} has no flash_attn_func (is only flash-attn 4's namespace installed?)"
        return module, ""
    except ImportError:
        return None, f"{name} is not installed"
    except (OSError, RuntimeError) as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        return None, f"{name} is installed but failed to import ({type(exc).__name__}: {first})"


def flash_attn_module(backend: str):
    """The installed flash-attn module for "flash_attention_2" / "_3" / "_4", else None."""
    return _import_flash(backend)[0]


def resolve_backend(requested: str, device: torch.device | str) -> tuple[str, str]:
    """The planner's attention choice (config plan.attention, or a backend name) -> (backend, reason). Under
    torch.use_deterministic_algorithms(True) a GPU of compute capability 8.0+ gets SDPA's flash kernel."""
    device = torch.device(device)
    if requested in BACKENDS and requested not in _FLASH_MODULES and requested != "sdpa":
        return requested, "pinned"
    if device.type != "cuda":
        return "sdpa", f"{device.type}: torch SDPA's own kernels"
    if requested in _FLASH_MODULES:
        if flash_attn_module(requested) is not None:
            return requested, "pinned; flash-attn installed"
        why = f"{requested} asked but {_import_flash(requested)[1]}; "
    else:
        why = "" if requested in ("auto", "sdpa") else f"{requested} has no fused-path kernel; "
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8 and torch.are_deterministic_algorithms_enabled():
        return "sdpa_flash", why + ("deterministic algorithms on: SDPA flash, whose backward is bit-repeatable "
                                    "then (cuDNN's is not; ppalli/train/determinism.py)")
    if major >= 9 and torch.backends.cudnn.is_available():
        return "sdpa_cudnn", why + "cuDNN SDPA: 1.6x flash on H100 GQA forward+backward (BENCHMARKS.md)"
    if major >= 8:
        return "sdpa_flash", why + "SDPA flash kernel (compute capability 8.x)"
    return "sdpa_efficient", why + "SDPA memory-efficient kernel (no flash kernel below compute capability 8.0)"


# --------------------------------------------------------------------------- masks


# Sliding-window layers shorter than the sequence (Mistral, Gemma-2/3's local layers, EXAONE-4): "varlen" runs
# each row as one sample of torch's varlen flash kernel with its window_size, "flex" compiled flex_attention
# with the window in its block mask; both skip the key blocks outside the window, where SDPA with a dense
# (T, T) mask computes them all. H200, 2026-12-03 (results/2026-12-03-h200-window-attention.txt, forward +
# backward): Gemma-3-4B's local layer (8 x 256, window 1024) at 1 x 8192: SDPA + mask 9.22 ms, varlen 1.27,
# flex 1.68; at 2 x 4096: 4.56, 1.57, 1.61; Mistral-7B's (32 x 128, window 4096) at 1 x 8192: 12.73, 5.44,
# flex 3.89. varlen: faster at head dim 256, no compile per sequence length.
WINDOW_KERNEL = "varlen"


def _window_skips(q: torch.Tensor, backend: str, window: int | None, softcap: float | None) -> bool:
    """Whether a dense batch's sliding window runs in a kernel that skips the blocks outside it (_windowed)."""
    if window is None or q.shape[2] <= window or softcap is not None or backend in ("eager", "sdpa_math"):
        return False
    if torch.are_deterministic_algorithms_enabled():  # plan.deterministic keeps its measured kernels
        return False
    return _can_torch_varlen(q) if WINDOW_KERNEL == "varlen" else _can_flex(q)


def _windowed(q, k, v, scale, window):
    """Causal sliding-window attention of a dense batch, q (B, Hq, T, D) -> (B, T, Hq, D), outside blocks skipped."""
    if WINDOW_KERNEL == "flex":
        return _flex(q, k, v, scale, window, None)
    b, _, t, _ = q.shape
    cu = torch.arange(0, (b + 1) * t, t, device=q.device, dtype=torch.int32)  # each row one sample
    return _varlen_torch(q, k, v, scale, window, cu, t)


def packed_mask(cu_seqlens: torch.Tensor, total: int, window: int | None = None) -> torch.Tensor:
    """(1, 1, total, total) bool, True = may attend: causal inside each packed sample, nothing across samples."""
    idx = torch.arange(total, device=cu_seqlens.device)
    doc = _doc_ids(cu_seqlens, total)  # (total,) sample of each token
    mask = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
    if window is not None:
        mask &= (idx[:, None] - idx[None, :]) < window
    return mask[None, None]


def causal_mask(t: int, device, window: int | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B or 1, 1, t, t) bool causal mask, with a sliding window and key padding (key_valid (B, t)) when given.

    Every query keeps its own key, so a padding query never has an empty row (its softmax would be NaN and
    its zero loss weight would not stop the NaN reaching the gradients).
    """
    i = torch.arange(t, device=device)
    mask = i[None, :] <= i[:, None]
    if window is not None:
        mask &= (i[:, None] - i[None, :]) < window
    mask = mask[None, None]
    if key_valid is not None:
        mask = (mask & key_valid.bool()[:, None, None, :]) | torch.eye(t, dtype=torch.bool, device=device)
    return mask


# --------------------------------------------------------------------------- kernels


_SDPA_ORDER = {
    "sdpa_cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "sdpa_flash": ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "sdpa_efficient": ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", "MATH"),
    "sdpa_math": ("MATH",),
}


@functools.lru_cache(maxsize=1)
def _has_set_priority() -> bool:
    from torch.nn.attention import sdpa_kernel

    return "set_priority" in inspect.signature(sdpa_kernel).parameters


def _sdpa_backends(backend: str):
    """sdpa_kernel with the backend's kernel first and the others as fallbacks, in that priority order
    (set_priority, torch >= 2.6; without it torch's own order among the enabled kernels applies)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, name) for name in _SDPA_ORDER[backend]]
    if _has_set_priority():
        return sdpa_kernel(order, set_priority=True)
    return sdpa_kernel(order[:1] + [SDPBackend.MATH])


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, n_q_heads: int):
    """k, v (B, Hk, T, D) -> (B, Hq, T, D) copies, for kernels without grouped-query support."""
    groups = n_q_heads // k.shape[1]
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _sdpa(q, k, v, mask, scale, window, backend):
    """q (B, Hq, T, D), k/v (B, Hk, T, D) -> (B, T, Hq, D)."""
    if window is not None and mask is None and q.shape[2] > window:
        mask = causal_mask(q.shape[2], q.device, window)
    gqa = q.shape[1] != k.shape[1]
    if gqa and backend == "sdpa_efficient":  # that kernel refuses enable_gqa (BENCHMARKS.md): expand instead
        (k, v), gqa = _repeat_kv(k, v, q.shape[1]), False
    kwargs = dict(attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa)
    if q.is_cuda and backend in _SDPA_ORDER:
        with _sdpa_backends(backend):
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    else:
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return out.transpose(1, 2)


def eager_attention(q, k, v, mask, scale, window, softcap):
    """Explicit scores in the input dtype, softcap c*tanh(s/c), softmax in fp32 (HF's eager order) -> (B, T, Hq, D).
    q (B, Hq, T, D), k, v (B, Hk or Hq, L, D); mask (B or 1, 1, T, L) bool or HF's additive one, None: causal (T = L).
    A bool mask fills with the dtype's least value, not -inf: a query that sees no key (a padding row of a
    decoder's prompt) gets even weights, as HF's additive mask gives, not NaN."""
    if q.shape[1] != k.shape[1]:
        k, v = _repeat_kv(k, v, q.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = causal_mask(q.shape[2], q.device, window)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask  # HF's additive float mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2)


def _flash_kwargs(scale, window, softcap) -> dict:
    kwargs = dict(softmax_scale=scale, causal=True, window_size=(window - 1, 0) if window else (-1, -1))
    if softcap is not None:
        kwargs["softcap"] = softcap
    if torch.are_deterministic_algorithms_enabled():  # flash-attn 2, 3 and 4 all take it; their backward's dq
        kwargs["deterministic"] = True  # otherwise sums by atomic adds
    return kwargs


def _flash(q, k, v, backend, scale, window, softcap, cu_seqlens, max_seqlen):
    """flash-attn 2/3/4, padded or varlen; q (B, Hq, T, D) -> (B, T, Hq, D). All take (B, T, H, D) and native
    GQA, and name the varlen arguments alike; flash-attn 4's fourth positional one is qv, so they go by name."""
    fa = flash_attn_module(backend)
    b, _, t, d = q.shape
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, T, H, D)
    kwargs = _flash_kwargs(scale, window, softcap)
    if cu_seqlens is None:
        out = fa.flash_attn_func(q, k, v, **kwargs)
    else:
        q, k, v = (x.reshape(b * t, x.shape[2], d) for x in (q, k, v))  # (total, H, D)
        out = fa.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, **kwargs)
    out = out[0] if isinstance(out, tuple) else out  # flash-attn 3/4 versions differ: out or (out, lse)
    return out.reshape(b, t, -1, d)


@functools.lru_cache(maxsize=1)
def _torch_varlen():
    """(varlen_attn, takes enable_gqa) when torch has the window_size form (2.11+), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return (varlen_attn, "enable_gqa" in params) if "window_size" in params else None


def _can_torch_varlen(q: torch.Tensor) -> bool:
    """torch's varlen kernel is flash attention: fp16/bf16 on compute capability 8.0+."""
    return (q.is_cuda and q.dtype in _HALF and _torch_varlen() is not None
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def _can_flash_attn(q: torch.Tensor, backend: str) -> bool:
    return backend in _FLASH_MODULES and q.is_cuda and q.dtype in _HALF and flash_attn_module(backend) is not None


def _varlen_torch(q, k, v, scale, window, cu_seqlens, max_seqlen):
    """torch.nn.attention.varlen.varlen_attn over packed tokens; q (B, Hq, T, D) -> (B, T, Hq, D)."""
    varlen_attn, has_gqa = _torch_varlen()
    b, hq, t, d = q.shape
    gqa = {}
    if k.shape[1] != hq:
        if has_gqa:
            gqa = {"enable_gqa": True}
        else:  # torch 2.11 documents no enable_gqa: expand k, v to the query heads
            k, v = _repeat_kv(k, v, hq)
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v))  # (total, H, D)
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale,
                      window_size=(window - 1 if window else -1, 0), **gqa)  # (-1, 0) = causal
    return out.reshape(b, t, hq, d)


@functools.lru_cache(maxsize=1)
def _flex_attention():
    """torch's flex_attention (torch >= 2.5), or None."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return flex_attention


@functools.lru_cache(maxsize=1)
def _flex_compiled():
    """flex_attention through torch.compile: its fused Triton kernels (uncompiled it writes out the scores). One
    compile per shape and softcap, as HF's flex integration does."""
    return torch.compile(_flex_attention(), dynamic=False)


def _can_flex(q: torch.Tensor) -> bool:
    """Flex's compiled kernels: CUDA, compute capability 8.0+, fp16/bf16, and torch not asked for deterministic
    algorithms (flex's backward was not measured for bit-repeatability; the eager path is repeatable)."""
    return (q.is_cuda and q.dtype in _HALF and _flex_attention() is not None
            and not torch.are_deterministic_algorithms_enabled()
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def _causal_mod(window: int | None, doc: torch.Tensor | None):
    """flex's mask_mod: causal, within a sliding window, and within one sample when doc (t,) gives each token's."""
    def mask_mod(b, h, qi, kj):
        ok = (qi >= kj) & ((qi - kj < window) if window is not None else True)
        return ok & (doc[qi] == doc[kj]) if doc is not None else ok
    return mask_mod


def _softcap_in_flex(q: torch.Tensor, backend: str, softcap: float | None) -> bool:
    """Whether attend runs Gemma-2's softcap in flex (flash-attn, when installed, is tried before)."""
    return softcap is not None and backend != "eager" and _can_flex(q)


def _flex_mask(t: int, window: int | None, doc: torch.Tensor | None, device: torch.device):
    """flex's BlockMask over a (t, t) causal grid (_causal_mod). Blocks wholly masked are skipped, not computed.
    Without doc the mask is the same for every layer and step of one length: cached."""
    if doc is None:
        return _flex_causal_mask(t, window, str(device))
    from torch.nn.attention.flex_attention import create_block_mask

    # compiled, the mask is built block by block; eager it evaluates all t x t pairs (the CPU tests' sizes).
    # torch.compile of the function, as torch 2.11 advises in place of its deprecated `_compile=True`
    build = _block_mask_compiled() if device.type == "cuda" else create_block_mask
    return build(_causal_mod(window, doc), None, None, t, t, device=device)


@functools.lru_cache(maxsize=1)
def _block_mask_compiled():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


@functools.lru_cache(maxsize=8)
def _flex_causal_mask(t: int, window: int | None, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal_mod(window, None), None, None, t, t, device=device)


# Compiled flex specializes on the sequence length, and packed rows (and padded batches) change length from
# batch to batch: lengths are padded up to a multiple of this, so a run compiles a few shapes rather than one
# per step (torch stops compiling after its recompile limit, 8, and then runs flex unfused, scores and all).
FLEX_BUCKET = 1024


def _flex(q, k, v, scale, window, softcap, doc=None, compiled: bool = True):
    """Causal attention through flex_attention, with Gemma-2's logit softcap c tanh(s / c) as its score_mod when
    softcap is given (after the scale, as HF's eager path applies it) and a sliding window in its block mask.
    q (B, Hq, T, D), k/v (B, Hk, T, D) -> (B, T, Hq, D); doc (T,) the sample of each token of a packed row
    (B = 1). compiled=False runs flex's unfused reference (CPU tests).
    Against the eager path it replaces it never holds the (B, H, T, T) scores (nor saves their softmax).
    Compiled, T is padded to a multiple of FLEX_BUCKET: the padding comes after every real key (causal masks it
    out) and, in a packed row, forms a sample of its own; its outputs are dropped (and so get no gradient)."""
    def score_mod(score, b, h, qi, kj):
        return softcap * torch.tanh(score / softcap)

    t = q.shape[2]
    pad = (-t) % FLEX_BUCKET if compiled else 0
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))  # (B, H, T + pad, D)
        if doc is not None:
            doc = torch.cat([doc, doc.new_full((pad,), -1)])
    fn = _flex_compiled() if compiled else _flex_attention()
    out = fn(q, k, v, score_mod=score_mod if softcap is not None else None,
             block_mask=_flex_mask(t + pad, window, doc, q.device), scale=scale,
             enable_gqa=q.shape[1] != k.shape[1])
    return out[:, :, :t].transpose(1, 2)


def _doc_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) the packed sample of each token."""
    idx = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(idx.dtype), idx, right=True)


# --------------------------------------------------------------------------- entry point


def _packed(q, k, v, backend, scale, window, softcap, cu_seqlens, max_seqlen):
    """Packed tokens: the B*T tokens of q form the samples cu_seqlens delimits -> (B, T, Hq, D)."""
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one device sync; collators pass it
    b, hq, t, d = q.shape
    n = cu_seqlens.numel() - 1
    if n * max_seqlen == b * t:
        # Every sample is max_seqlen long (n of them, none longer, and cu_seqlens covers all B*T tokens, as
        # attend's contract and every caller here have it; the check reads no device value): they are rows
        # of a dense batch, and dense causal attention runs cuDNN's kernel instead of varlen's. On an H100,
        # 4 x 2048-token samples of Llama-3.1-8B's attention took 1.19 ms forward + backward dense against
        # 2.57 through torch's varlen_attn (benchmarks/results/2026-11-25-h100-attention.txt; 1B: 1.48
        # against 2.80).
        def rows(x):  # (B, H, T, D) -> (n, H, L, D); a view when x is a transposed (B, T, H, D) tensor
            return x.transpose(1, 2).reshape(n, max_seqlen, x.shape[1], d).transpose(1, 2)

        out = attend(rows(q), rows(k), rows(v), backend=backend, scale=scale, window=window, softcap=softcap)
        return out.reshape(b, t, hq, d)
    if _can_flash_attn(q, backend):
        return _flash(q, k, v, backend, scale, window, softcap, cu_seqlens, max_seqlen)
    if softcap is None and backend != "eager" and _can_torch_varlen(q):
        return _varlen_torch(q, k, v, scale, window, cu_seqlens, max_seqlen)
    q, k, v = (x.transpose(0, 1).reshape(1, x.shape[1], b * t, d) if b > 1 else x for x in (q, k, v))
    if _softcap_in_flex(q, backend, softcap):
        return _flex(q, k, v, scale, window, softcap, _doc_ids(cu_seqlens, b * t)).reshape(b, t, -1, d)
    mask = packed_mask(cu_seqlens, b * t, window)
    if softcap is not None or backend == "eager":
        out = eager_attention(q, k, v, mask, scale, window, softcap)
    else:
        out = _sdpa(q, k, v, mask, scale, window, backend)
    return out.reshape(b, t, -1, d)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of q (B, Hq, T, D) over k, v (B, Hk, T, D) -> (B, T, Hq, D).

    cu_seqlens (n+1,) int: packed samples over the B*T tokens (no attention across them); max_seqlen their
    longest length. attention_mask: a (B, 1, T, T) mask as HF builds it (bool, True = attend, or additive
    float), or a (B, T) key-padding mask; ignored when cu_seqlens is given. scale defaults to D^-0.5;
    window is a sliding window (keys i - window < j <= i); softcap Gemma-2's attention logit softcapping.
    """
    if backend not in BACKENDS:
        raise PpalliError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if cu_seqlens is not None:
        return _packed(q, k, v, backend, scale, window, softcap, cu_seqlens, max_seqlen)
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = causal_mask(q.shape[2], q.device, window, key_valid=attention_mask)
    if attention_mask is None and _can_flash_attn(q, backend):
        return _flash(q, k, v, backend, scale, window, softcap, None, None)
    if attention_mask is None and _softcap_in_flex(q, backend, softcap):
        return _flex(q, k, v, scale, window, softcap)
    if attention_mask is None and _window_skips(q, backend, window, softcap):
        return _windowed(q, k, v, scale, window)
    if softcap is not None or backend == "eager":
        return eager_attention(q, k, v, attention_mask, scale, window, softcap)
    return _sdpa(q, k, v, attention_mask, scale, window, backend)
