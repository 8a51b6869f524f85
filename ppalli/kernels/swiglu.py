"""Fused SwiGLU: h = silu(gate) * up, the Llama MLP's activation, fp32 inside.

The backward recomputes silu from the saved gate rather than saving it:
    dup = dh * silu(gate),   dgate = dh * up * s * (1 + gate * (1 - s)),   s = sigmoid(gate).
The launchers serve the LoRA MLP block's hand-written backward; `inplace=True` writes dgate over gate and
dup over up, which that block no longer needs, so its backward allocates nothing here (Unsloth's trick).
"""

import torch

from ppalli.kernels._utils import glu_bwd, glu_fwd, glu_stacked, jit, sigmoid, tl


@jit
def _swiglu_fwd_kernel(H, GATE, UP, n, cols, in_stride, BLOCK: tl.constexpr, FAST: tl.constexpr):
    # H flat (n,); GATE, UP rows of `cols` at a row stride in_stride (flat when cols == in_stride == n)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    src = (offs // cols) * in_stride + offs % cols
    g = tl.load(GATE + src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + src, mask=mask, other=0.0).to(tl.float32)
    h = g * sigmoid(g, FAST) * u
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@jit
def _swiglu_bwd_kernel(DGATE, DUP, DH, GATE, UP, n, BLOCK: tl.constexpr, FAST: tl.constexpr):  # all flat (n,)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    s = sigmoid(g, FAST)
    silu = g * s
    dgate = dh * u * s * (1.0 + g * (1.0 - s))
    tl.store(DUP + offs, (dh * silu).to(DUP.dtype.element_ty), mask=mask)
    tl.store(DGATE + offs, dgate.to(DGATE.dtype.element_ty), mask=mask)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) -> h = silu(gate) * up (..., I) in gate's dtype."""
    return glu_fwd(_swiglu_fwd_kernel, gate, up)


def swiglu_fwd_stacked(gu: torch.Tensor) -> torch.Tensor:
    """gu (..., 2I) = [gate | up] from one GEMM over the stacked weights -> silu(gate) * up (..., I)."""
    return glu_stacked(_swiglu_fwd_kernel, gu)


def swiglu_bwd(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, inplace: bool = False):
    """dh, gate, up (..., I) -> (dgate, dup) (..., I); inplace=True overwrites gate and up (must be contiguous)."""
    return glu_bwd(_swiglu_bwd_kernel, "swiglu_bwd", dh, gate, up, inplace)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dh, gate, up)  # not in place: autograd may still hold gate and up elsewhere


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with a fused backward; gate, up (..., I)."""
    return SwiGLUFunction.apply(gate, up)
