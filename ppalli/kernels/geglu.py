"""Fused GeGLU: h = gelu_tanh(gate) * up, the Gemma MLP's activation (hidden_activation gelu_pytorch_tanh).

gelu_tanh(g) = 0.5 * g * (1 + t),  t = tanh(k * (g + 0.044715 * g^3)),  k = sqrt(2 / pi); its derivative
    0.5 * (1 + t) + 0.5 * g * (1 - t^2) * k * (1 + 3 * 0.044715 * g^2).
fp32 inside; the backward recomputes t from the saved gate. `inplace=True` on the backward launcher
writes dgate over gate and dup over up, as in swiglu.py, for the LoRA MLP block's hand-written backward.
"""

import torch

from ppalli.kernels._utils import glu_bwd, glu_fwd, glu_stacked, jit, tanh_fast, tl

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_COEF = tl.constexpr(0.044715)


@jit
def _geglu_fwd_kernel(H, GATE, UP, n, cols, in_stride, BLOCK: tl.constexpr, FAST: tl.constexpr):
    # H flat (n,); GATE, UP rows of `cols` at a row stride in_stride (flat when cols == in_stride == n)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    src = (offs // cols) * in_stride + offs % cols
    g = tl.load(GATE + src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + src, mask=mask, other=0.0).to(tl.float32)
    t = tanh_fast(SQRT_2_OVER_PI * (g + GELU_COEF * g * g * g), FAST)
    tl.store(H + offs, (0.5 * g * (1.0 + t) * u).to(H.dtype.element_ty), mask=mask)


@jit
def _geglu_bwd_kernel(DGATE, DUP, DH, GATE, UP, n, BLOCK: tl.constexpr, FAST: tl.constexpr):  # all flat (n,)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    t = tanh_fast(SQRT_2_OVER_PI * (g + GELU_COEF * g * g * g), FAST)
    gelu = 0.5 * g * (1.0 + t)
    dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_COEF * g * g)
    tl.store(DUP + offs, (dh * gelu).to(DUP.dtype.element_ty), mask=mask)
    tl.store(DGATE + offs, (dh * u * dgelu).to(DGATE.dtype.element_ty), mask=mask)


def geglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) -> h = gelu_tanh(gate) * up (..., I) in gate's dtype."""
    return glu_fwd(_geglu_fwd_kernel, gate, up)


def geglu_fwd_stacked(gu: torch.Tensor) -> torch.Tensor:
    """gu (..., 2I) = [gate | up] from one GEMM over the stacked weights -> gelu_tanh(gate) * up (..., I)."""
    return glu_stacked(_geglu_fwd_kernel, gu)


def geglu_bwd(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, inplace: bool = False):
    """dh, gate, up (..., I) -> (dgate, dup) (..., I); inplace=True overwrites gate and up (must be contiguous)."""
    return glu_bwd(_geglu_bwd_kernel, "geglu_bwd", dh, gate, up, inplace)


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return geglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        return geglu_bwd(dh, gate, up)  # not in place: autograd may still hold gate and up elsewhere


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up with a fused backward; gate, up (..., I)."""
    return GeGLUFunction.apply(gate, up)
