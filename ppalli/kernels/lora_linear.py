"""LoRA linear layers with a hand-written backward, and the pieces the fused LoRA blocks share.

A PEFT LoRA Linear computes y = x W^T + b + s (x A^T) B^T with W (out, in) and b frozen, A (r, in),
B (out, r) trained and s = alpha / r (or alpha / sqrt(r)). Autograd through PEFT's modules keeps x once per
consumer, runs the base GEMM and the two LoRA GEMMs as separate outputs and adds them in a fourth pass.
Here the base GEMM writes y, the B-product is added into the same buffer by `addmm_` (no extra pass over
y), and the backward keeps only x and the small x A^T (N, r):

    dB = s dy^T (x A^T)        (out, r)
    dA = (s dy B)^T x          (r, in)
    dx = dy W + (s dy B) A     (N, in)

The matmuls are cuBLAS (torch.mm / addmm); Unsloth's fast_lora does the same algebra. The base weight is
read through `base_weight`, so a bitsandbytes 4-bit base layer is dequantized on the fly in the forward and
again in the backward instead of keeping a 16-bit copy alive in between (QLoRA memory stays 4-bit).

The LoRA factors are used in the activations' dtype: PEFT keeps adapters in fp32 beside a bf16 model
(autocast_adapter_dtype) and computes the LoRA branch in fp32; here A and B are cast to bf16 for the
GEMMs (r x in values, negligible copies) and their gradients are returned in the adapters' own dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ppalli.errors import PpalliError
from ppalli.kernels._utils import interpreting, is_triton_available
from ppalli.kernels.factor_cache import factor_cast, factor_stack
from ppalli.kernels.fp8 import (
    Fp8Weights,
    fp8_input_grad,
    fp8_linear,
    fp8_pays,
    fp8_rows,
    fp8_shapes_ok,
    fp8_weights,
)
from ppalli.kernels.lora_b_bwd import lora_b_bwd


class LoRAParts(NamedTuple):
    """What a fused block reads from one PEFT LoRA Linear (or a plain Linear, then a and b are None)."""

    base: nn.Module  # the frozen base layer: nn.Linear, or bitsandbytes Linear4bit
    a: torch.Tensor | None  # (r, in) lora_A weight
    b: torch.Tensor | None  # (out, r) lora_B weight
    scaling: float


def _is_4bit(base: nn.Module) -> bool:
    return getattr(getattr(base, "weight", None), "quant_state", None) is not None or type(base).__name__ in (
        "Linear4bit", "LinearNF4", "LinearFP4")


def base_weight(module: nn.Module | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out, in) base weight of a Linear, a bitsandbytes Linear4bit (dequantized) or a PEFT layer around one,
    or an (out, in) weight given as it is (lora_qkv's stacked [Wq; Wk; Wv]), in `dtype` when given (a copy
    only when the dtype differs)."""
    if isinstance(module, torch.Tensor):
        w = module
        return w if dtype is None or w.dtype == dtype else w.to(dtype)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if _is_4bit(base):
        from ppalli.kernels.nf4 import dequantize_weight  # bitsandbytes layouts only matter for QLoRA

        return dequantize_weight(base, dtype)
    w = base.weight
    return w if dtype is None or w.dtype == dtype else w.to(dtype)


def out_features(module: nn.Module) -> int:
    """Rows of the (out, in) base weight, read without dequantizing a 4-bit layer."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.out_features


def _base_bias(base: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    bias = getattr(base, "bias", None)
    return None if bias is None else bias.to(dtype)


def lora_problem(module: nn.Module, *, training_only_dropout: bool = True) -> str | None:
    """Why this module cannot run in a fused LoRA block right now, or None when it can.

    Checked per forward (a few attribute reads), since adapters can be disabled or merged at any time.
    Dropout only acts in training mode; training_only_dropout=False counts any p > 0 (the planner's check,
    made while the model may still be in eval mode).
    """
    if not hasattr(module, "lora_A"):
        if isinstance(module, nn.Linear) or _is_4bit(module):
            return None if module.bias is None or not module.bias.requires_grad else "trainable bias"
        return f"{type(module).__name__} is not a Linear"
    if module.merged:
        return "adapter merged into the base weight"
    base = module.get_base_layer()
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "base layer trains (the fused blocks return no base-weight gradient)"
    if module.disable_adapters:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) > 1:
        return f"{len(active)} active adapters"
    if not active:
        return None
    name = active[0]
    if module.use_dora.get(name, False):
        return "DoRA"
    drop = module.lora_dropout[name]
    if isinstance(drop, nn.Dropout) and drop.p > 0 and (drop.training or not training_only_dropout):
        return f"lora dropout {drop.p}"
    if getattr(module.lora_B[name], "bias", None) is not None:
        return "LoRA bias"
    return None


def lora_parts(module: nn.Module | LoRAParts, *, checked: bool = False) -> LoRAParts:
    """The base layer, A, B and scaling of the one active adapter; a and b are None when no adapter applies.
    A LoRAParts passes through (a fused layer reads its modules once a forward); checked=True skips the
    lora_problem check the caller has just made (it costs ~8 us a module on the host)."""
    if isinstance(module, LoRAParts):
        return module
    problem = None if checked else lora_problem(module)
    if problem is not None:
        raise PpalliError(f"fused LoRA cannot run {type(module).__name__}: {problem}")
    if not hasattr(module, "lora_A"):
        return LoRAParts(module, None, None, 0.0)
    base = module.get_base_layer()
    active = [a for a in module.active_adapters if a in module.lora_A]
    if module.disable_adapters or not active:
        return LoRAParts(base, None, None, 0.0)
    name = active[0]
    return LoRAParts(base, module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]))


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _fp8_for(base, w: torch.Tensor, rows: int, fp8: Fp8Weights | None = None) -> Fp8Weights | None:
    """The fp8 copies to use for w's GEMM over `rows` tokens (plan.fp8 put them on the base layer; `fp8` given
    for a stacked weight), or None for bf16: fp8 off, too few rows to pay (fp8_pays), or a weight cuBLAS does
    not take in fp8 (a side not a multiple of 16). bf16 too while torch.compile traces (plan.compile): the copies
    are found by data pointer, which a trace does not have."""
    if torch.compiler.is_compiling():
        return None
    cache = fp8 if fp8 is not None else fp8_weights(base)
    return cache if cache is not None and fp8_pays(rows) and fp8_shapes_ok(w) else None


def quantized_input(x: torch.Tensor, *bases) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x's fp8 (q, scale) when any of the base layers that read x runs in fp8, else None: quantized once for
    the GEMMs that share x (q, k, v; gate, up)."""
    use = (not torch.compiler.is_compiling() and fp8_pays(x.shape[0])
           and any(fp8_weights(b) is not None for b in bases))
    return fp8_rows(x) if use else None


def base_mm(x, base, xq=None):
    """x (N, in) -> x W^T + bias (N, out), the frozen base layer's output; in fp8 when plan.fp8 put fp8 copies
    on the layer (xq: x's quantized (q, scale) when the caller made it for several layers)."""
    w = base_weight(base, x.dtype)  # (out, in)
    bias = _base_bias(base, x.dtype)
    fp8 = _fp8_for(base, w, x.shape[0])
    if fp8 is not None:
        y = fp8_linear(x, w, fp8, xq)
        return y.add_(bias) if bias is not None else y
    return torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())


def lora_a(x, a):
    """x (N, in) -> x A^T (N, r), or None without an adapter."""
    return None if a is None else torch.mm(x, factor_cast(a, x.dtype).t())


def stacked_lora_a(x, factors):
    """x (N, in) times the A factors of several adapters over one input, in one GEMM: [A_1; A_2; ...] is
    (sum r, in), so x is read once instead of once per adapter (each rank-16 GEMM is bound by reading x).
    -> (a list of (N, r_i) column views of the (N, sum r) product, None where an adapter is absent;
    the stacked (sum r, in) factor in x's dtype, which the backward reuses, or None)."""
    present = [a for a in factors if a is not None]
    if not present:
        return [None] * len(factors), None
    a_stack = factor_stack(present, x.dtype)  # (sum r, in): the fast path's cached copy, else cat and cast
    xa = torch.mm(x, a_stack.t())  # (N, sum r)
    views, col = [], 0
    for a in factors:
        views.append(None if a is None else xa[:, col:col + a.shape[0]])
        col += 0 if a is None else a.shape[0]
    return views, a_stack


def stacked_lora_a_grads(dxas, x, a_stack, ranks, needs, dtypes):
    """dA_i = dxa_i^T x for adapters over one input x (N, in), in one GEMM; dxas (N, r_i) or None where
    ranks[i] is None; a_stack (sum r, in) from stacked_lora_a.
    -> (list of dA_i in dtypes[i] or None, the (N, sum r) stacked dxa or None)."""
    idx = [i for i, r in enumerate(ranks) if r is not None]
    if not idx:
        return [None] * len(ranks), None
    dxa = torch.cat([dxas[i] for i in idx], dim=1)  # (N, sum r)
    grads = [None] * len(ranks)
    if any(needs[i] for i in idx):
        wide = {dtypes[i] for i in idx if needs[i]}
        da = grad_mm(dxa.t(), x, wide.pop() if len(wide) == 1 else x.dtype)  # (sum r, in)
        row = 0
        for i in idx:
            grads[i] = cast(da[row:row + ranks[i]], dtypes[i]) if needs[i] else None
            row += ranks[i]
    return grads, dxa


# --------------------------------------------------------------------------- several base weights as one


def _weights(bases) -> list[torch.Tensor] | None:
    """The bases' (out, in) floating-point weights when all share dtype, device and in, else None (a 4-bit
    weight is packed uint8: None)."""
    ws = [getattr(b, "weight", None) for b in bases]
    if any(w is None or w.dim() != 2 or not w.is_floating_point() for w in ws):
        return None
    first = ws[0]
    if any(w.dtype != first.dtype or w.device != first.device or w.shape[1] != first.shape[1] for w in ws):
        return None
    return ws


def stacked_base_weight(bases, dtype: torch.dtype) -> torch.Tensor | None:
    """The (sum out, in) tensor whose row blocks are the base layers' weights, in order, when they lie one
    after another in one storage in `dtype` (stack_base_weights), else None. Checked at each use: a .to(),
    a merge or a load may have moved any of them since."""
    if torch.compiler.is_compiling():  # no data pointers to compare while tracing: the per-weight GEMMs
        return None
    ws = _weights(bases)
    if ws is None or ws[0].dtype != dtype:
        return None
    first, ptr = ws[0].detach(), ws[0].data_ptr()
    base = first.untyped_storage().data_ptr()
    for w in ws:
        if not w.is_contiguous() or w.data_ptr() != ptr or w.untyped_storage().data_ptr() != base:
            return None
        ptr += w.numel() * w.element_size()
    return first.as_strided((sum(w.shape[0] for w in ws), first.shape[1]), (first.shape[1], 1))


@torch.no_grad()
def stack_base_weights(bases) -> bool:
    """Lay the frozen base weights out as row blocks of one new tensor (each parameter keeps its identity and
    values, its .data becomes a view), so stacked_base_weight finds them. False when they cannot be (4-bit,
    mixed dtypes or shapes); unstack_base_weights undoes it."""
    ws = _weights(bases)
    if ws is None:
        return False
    if stacked_base_weight(bases, ws[0].dtype) is None:
        stack, row = torch.cat([w.detach() for w in ws]), 0  # (sum out, in)
        for w in ws:
            w.data = stack[row:row + w.shape[0]]
            row += w.shape[0]
    return True


@torch.no_grad()
def unstack_base_weights(bases) -> None:
    """Give each base weight its own storage again (a copy each; the shared block is freed with the last)."""
    ws = _weights(bases)
    if ws is not None and stacked_base_weight(bases, ws[0].dtype) is not None:
        for w in ws:
            w.data = w.data.clone()


def lora_fwd(x, base, a, b, s):
    """x (N, in) -> (y (N, out), xa (N, r) or None): y = x W^T + bias, then y += s xa B^T in place."""
    y = base_mm(x, base)
    xa = lora_a(x, a)  # (N, r)
    if xa is not None:
        y.addmm_(xa, factor_cast(b, x.dtype).t(), alpha=s)
    return y, xa


def scaled_mm(m1: torch.Tensor, m2: torch.Tensor, s: float) -> torch.Tensor:
    """s (m1 @ m2) in one GEMM: the scale rides in cuBLAS's alpha, applied in fp32 before the product is
    rounded, instead of a second launch over the product (addmm with beta = 0 reads no input: an
    uninitialized 0-dim one stands in). Seven LoRA layers a decoder layer made 14 such launches a backward."""
    if s == 1.0:
        return torch.mm(m1, m2)
    return torch.addmm(m1.new_empty(()), m1, m2, beta=0, alpha=s)


# Whether cuBLAS writes a 16-bit product straight in fp32 here (torch's mm/addmm `out_dtype`, CUDA only), per
# device index, probed on first use.
_WIDE_OUT: dict[int, bool] = {}


def _wide_out(t: torch.Tensor) -> bool:
    if t.device.type != "cuda":
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _WIDE_OUT:
        probe = torch.ones(2, 2, dtype=torch.bfloat16, device=t.device)
        try:
            ok = torch.addmm(probe.new_empty((), dtype=torch.float32), probe, probe, beta=0, alpha=0.5,
                             out_dtype=torch.float32)
            _WIDE_OUT[index] = ok.dtype == torch.float32 and bool((ok == 1.0).all())
        except (RuntimeError, TypeError, NotImplementedError):  # an older torch, or a build without it
            _WIDE_OUT[index] = False
    return _WIDE_OUT[index]


def grad_mm(m1: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype, s: float = 1.0) -> torch.Tensor:
    """s (m1 @ m2) in dtype, for a LoRA factor's gradient in the factor's own dtype. On CUDA a bf16/fp16 product
    is written in fp32 by the GEMM itself (out_dtype): no launch to widen it after, and no rounding to 16 bits
    in between (the rank-16 A and B gradients of 7 projections: 14 launches a decoder layer's backward)."""
    if dtype == m1.dtype:
        return scaled_mm(m1, m2, s)
    if dtype == torch.float32 and m1.dtype in (torch.bfloat16, torch.float16) and _wide_out(m1):
        return torch.addmm(m1.new_empty((), dtype=dtype), m1, m2, beta=0, alpha=s, out_dtype=dtype)
    return scaled_mm(m1, m2, s).to(dtype)


def lora_bwd(dy, x, xa, a, b, s, need_a: bool, need_b: bool, grad_dtypes=(None, None)):
    """dy (N, out), x (N, in), xa (N, r) -> (s dy B (N, r), dA (r, in) | None, dB (out, r) | None); dA and dB
    in grad_dtypes (the adapters' own dtypes, see grad_mm), dy's dtype where None. s dy B and dB come from one
    pass over dy (lora_b_bwd) where its kernel can run, else from two GEMMs."""
    b = cast(b, dy.dtype)
    if need_b and _one_pass_b(dy, xa):
        dxa, db = lora_b_bwd(dy, xa, b, s, grad_dtypes[1] or dy.dtype)
    else:
        dxa = scaled_mm(dy, b, s)  # (N, r)
        db = grad_mm(dy.t(), xa, grad_dtypes[1] or dy.dtype, s) if need_b else None  # (out, r)
    da = grad_mm(dxa.t(), x, grad_dtypes[0] or dy.dtype) if need_a else None  # (r, in)
    return dxa, da, db


def _one_pass_b(dy: torch.Tensor, xa: torch.Tensor) -> bool:
    """Whether lora_b_bwd can take dy and xa: triton, CUDA (or the CPU interpreter), unit-stride rows, one dtype,
    and torch not asked for deterministic algorithms (its dB sums by atomic adds, in no fixed order)."""
    return (is_triton_available() and (dy.is_cuda or (interpreting() and dy.device.type == "cpu"))
            and dy.dim() == 2 and dy.stride(1) == 1 and xa.stride(1) == 1 and xa.dtype == dy.dtype
            and not torch.are_deterministic_algorithms_enabled())


def add_input_grad(dx, dy, base, dxa, a, fp8: Fp8Weights | None = None):
    """dx (N, in) += dy W + dxa A, allocating dx when it is None; returns dx. base: what base_weight takes;
    fp8: the copies of a stacked weight given as base (a module's own are found on it).

    A new dx takes the rank-r term first: that skinny GEMM then only writes dx, and the base GEMM accumulates
    into it (beta = 1, dx read in its epilogue) instead of the skinny GEMM reading and writing dx after it, a
    memory-bound pass. bench_gemm.py `order:` rows on the H200: o 0.435 -> 0.411 ms (8B shape), 0.253 -> 0.222
    (1B) (results/2026-12-03-h200-gemm-cublas.txt); q/k/v's whole sum 0.701 -> 0.643, 0.408 -> 0.366
    (results/2026-12-02-h200-gemm-order.txt). The MLP's sum measured mixed that way (1.434 -> 1.535 and 2.393 ->
    2.680 ms there, 2.820 -> 2.760 at 8B on 2026-12-03): lora_mlp.py adds its rank-r term last itself.
    """
    w = base_weight(base, dy.dtype)  # (out, in), dequantized again for 4-bit rather than kept from the forward
    cache = _fp8_for(base, w, dy.shape[0], fp8)
    if cache is not None:  # cuBLAS's fp8 GEMM has no beta: the product is its own buffer, added after
        g = fp8_input_grad(dy, w, cache)  # (N, in)
        dx = g if dx is None else dx.add_(g)
        return dx if dxa is None else dx.addmm_(dxa, cast(a, dy.dtype))
    if dx is None and dxa is not None:
        dx, dxa = torch.mm(dxa, cast(a, dy.dtype)), None  # (N, in)
    if dx is None:
        dx = torch.mm(dy, w)
    else:
        dx.addmm_(dy, w)
    if dxa is not None:
        dx.addmm_(dxa, cast(a, dy.dtype))
    return dx


def factor_dtypes(*factors) -> tuple:
    """The adapters' own dtypes (PEFT keeps them fp32 beside a bf16 model), for the weight gradients."""
    return tuple(None if f is None else f.dtype for f in factors)


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + bias + s (x A^T) B^T; saves x, x A^T and A, B in x's dtype (cast once a forward: the
    backward reuses them rather than casting each fp32 factor again)."""

    @staticmethod
    def forward(ctx, x, base, a, b, s):
        ctx.dtypes = factor_dtypes(a, b)
        a, b = factor_cast(a, x.dtype), factor_cast(b, x.dtype)
        y, xa = lora_fwd(x, base, a, b, s)  # (N, out), (N, r)
        ctx.save_for_backward(x, xa, a, b)
        ctx.base, ctx.s = base, s
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, a, b = ctx.saved_tensors
        need_x, _, need_a, need_b, _ = ctx.needs_input_grad
        dxa = da = db = None
        if a is not None:
            dxa, da, db = lora_bwd(dy, x, xa, a, b, ctx.s, need_a, need_b, ctx.dtypes)
        dx = add_input_grad(None, dy, ctx.base, dxa, a) if need_x else None
        return dx, None, da, db, None


class LoRASplitFunction(torch.autograd.Function):
    """(y0, xa) = (x W^T + bias, x A^T): a LoRA Linear whose consumer adds s xa B^T itself (and so owns dB and
    the rank-r input gradient dxa = s dy B, which it hands back as xa's gradient). Saves x and A."""

    @staticmethod
    def forward(ctx, x, base, a):
        ctx.a_dtype = a.dtype
        a = factor_cast(a, x.dtype)
        ctx.save_for_backward(x, a)
        ctx.base = base
        return base_mm(x, base), lora_a(x, a)  # (N, out), (N, r)

    @staticmethod
    def backward(ctx, dy0, dxa):
        x, a = ctx.saved_tensors
        need_x, _, need_a = ctx.needs_input_grad
        da = grad_mm(dxa.t(), x, ctx.a_dtype) if need_a and dxa is not None else None  # (r, in)
        dx = None
        if need_x and dy0 is not None:
            dx = add_input_grad(None, dy0, ctx.base, dxa, a)  # (N, in); add_input_grad skips a None dxa
        elif need_x and dxa is not None:
            dx = torch.mm(dxa, a)
        return dx, None, da


def lora_linear_split(x: torch.Tensor, parts: LoRAParts) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., in) through the base layer and lora_A of `parts` (an adapter must be present) ->
    (y0 (N, out) = x W^T + bias, xa (N, r) = x A^T) over the flattened rows; the caller adds s xa B^T."""
    if parts.a is None:
        raise PpalliError("lora_linear_split needs an active adapter; use lora_linear without one")
    return LoRASplitFunction.apply(x.reshape(-1, x.shape[-1]), parts.base, parts.a)


def lora_linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """x (..., in) through a PEFT LoRA Linear (or a plain Linear) -> (..., out), with the manual backward."""
    p = lora_parts(module)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    y = LoRALinearFunction.apply(x2, p.base, p.a, p.b, p.scaling)
    return y.view(*x.shape[:-1], y.shape[-1])
