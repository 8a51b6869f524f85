"""Fused lm_head + cross entropy that never builds the (N, V) logits at once (Liger's FusedLinearCrossEntropy idea).

Per chunk of rows: logits = hidden_chunk @ W^T in the input dtype (one GEMM), then a Triton kernel runs an
online softmax over the vocab in fp32, writes the row loss and overwrites the logits with their gradient,
then grad_hidden_chunk = dlogits @ W (and grad_weight += dlogits^T @ hidden_chunk when W trains). The
gradients are computed in the forward, for the sum of the row losses; the backward only scales them by
grad_output (and 1 / count for "mean"), so no logits survive to the backward at all.

Optional Gemma-2 final-logit softcapping z = c * tanh(x / c) is applied in fp32 inside the kernel, with
its derivative 1 - (z / c)^2 folded into the logit gradient. Labels are already shifted by the caller and
must lie in [0, V) or equal ignore_index (not checked: a check would cost a device sync per call).
"""

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import (
    ELEMENTWISE_BLOCK,
    cdiv,
    check_tensors,
    exp,
    fast_math,
    jit,
    next_power_of_2,
    num_warps_for,
    tanh,
    tl,
)

# A chunk's logits (rows x V in the input dtype) is the one large temporary, its gradient overwrites it in
# place. 256 MiB gives 1024 rows for Llama-3's V=128256 in bf16: each chunk's GEMM (1024 x 4096 x 128256,
# ~1 TFLOP) runs for milliseconds, so the per-chunk launches are noise, while the whole logits of an 8x2048
# batch (2 GiB in bf16, 4 GiB more once upcast by the plain path) never exist.
LOGITS_CHUNK_BYTES = 256 * 2**20
# The vocab block one program walks per step: 32768 fp32 with 32 warps, Liger's setting for its CE kernel.
MAX_BLOCK_V = 32768


@jit
def _softcapped_logits(ptrs, mask, softcap, SOFTCAP: tl.constexpr):
    """Load a block of logits in fp32, softcapped when asked; lanes past the vocab read -inf."""
    z = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    if SOFTCAP:
        z = tl.where(mask, softcap * tanh(z / softcap), float("-inf"))
    return z


@jit
def _cross_entropy_fwd_kernel(
    LOGITS,  # (n, V) in the matmul dtype, overwritten with d(row loss)/d(logits)
    LABELS,  # (n,) integer
    LOSS,  # (n,) fp32 row losses, 0 on ignored rows
    stride, n_cols, ignore_index, softcap,
    BLOCK: tl.constexpr, SOFTCAP: tl.constexpr, FAST: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    LOGITS += row * stride
    label = tl.load(LABELS + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if label == ignore_index:  # no loss, zero gradient: the buffer still holds logits, so write the zeros
        for start in range(0, n_cols, BLOCK):
            tl.store(LOGITS + start + cols, 0.0, mask=start + cols < n_cols)
        tl.store(LOSS + row, 0.0)
        return
    # Pass 1: online max and sum of exp over the vocab blocks (Milakov & Gimelshein 2018).
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        z = _softcapped_logits(LOGITS + start + cols, start + cols < n_cols, softcap, SOFTCAP)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * exp(m - m_new, FAST) + tl.sum(exp(z - m_new, FAST), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_label = tl.load(LOGITS + label).to(tl.float32)
    if SOFTCAP:
        z_label = softcap * tanh(z_label / softcap)
    tl.store(LOSS + row, lse - z_label)
    # Pass 2: dloss/dz = softmax(z) - onehot(label), times dz/dx = 1 - (z / c)^2 under the softcap.
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        z = _softcapped_logits(LOGITS + start + cols, mask, softcap, SOFTCAP)
        grad = exp(z - lse, FAST) - tl.where(start + cols == label, 1.0, 0.0)
        if SOFTCAP:
            t = tl.where(mask, z / softcap, 0.0)  # tanh of the raw logit; 0 past the vocab, where z is -inf
            grad = grad * (1.0 - t * t)
        tl.store(LOGITS + start + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


@jit
def _scale_kernel(OUT, X, SCALE, n, BLOCK: tl.constexpr):  # OUT, X: flat (n,); SCALE: (1,) fp32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(SCALE)  # read on the device: no host sync to learn grad_output or the label count
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (x * scale).to(OUT.dtype.element_ty), mask=mask)


def _scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * scale computed in fp32 and rounded once, on every device path (a bf16 tensor times an fp32 0-dim
    tensor may see the factor rounded to bf16 first, which would shift the whole gradient by up to 0.4%)."""
    out = torch.empty_like(x)
    grid = (cdiv(x.numel(), ELEMENTWISE_BLOCK),)
    _scale_kernel[grid](out, x, scale.reshape(1), x.numel(), BLOCK=ELEMENTWISE_BLOCK, num_warps=4)
    return out


def _chunk_rows(n_rows: int, vocab: int, elem_size: int) -> int:
    """Rows per chunk: the largest power of two whose logits fit LOGITS_CHUNK_BYTES (a GEMM-friendly M)."""
    rows = max(1, LOGITS_CHUNK_BYTES // (vocab * elem_size))
    return max(1, min(1 << (rows.bit_length() - 1), n_rows))  # 1 for no rows: an empty range, not a 0 step


def _cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, ignore_index, softcap):
    """logits (n, V) -> row losses into loss (n,) fp32; logits overwritten with their gradient."""
    block = min(next_power_of_2(logits.shape[1]), MAX_BLOCK_V)
    _cross_entropy_fwd_kernel[(logits.shape[0],)](
        logits, labels, loss, logits.stride(0), logits.shape[1], ignore_index, softcap or 1.0,
        BLOCK=block, SOFTCAP=softcap is not None, FAST=fast_math(), num_warps=num_warps_for(block),
    )


def linear_cross_entropy_fwd(hidden, weight, labels, ignore_index=-100, softcap=None, chunk_size=None,
                             need_grad_hidden=True, need_grad_weight=False):
    """hidden (N, d), weight (V, d), labels (N,) -> (loss sum fp32 (), grad_hidden (N, d) | None,
    grad_weight (V, d) | None), the gradients being those of the summed loss."""
    loss_rows, grad_hidden, grad_weight = linear_cross_entropy_rows(hidden, weight, labels, ignore_index, softcap,
                                                                    chunk_size, need_grad_hidden, need_grad_weight)
    return loss_rows.sum(), grad_hidden, grad_weight


def linear_cross_entropy_rows(hidden, weight, labels, ignore_index=-100, softcap=None, chunk_size=None,
                              need_grad_hidden=True, need_grad_weight=False):
    """linear_cross_entropy_fwd with the row losses kept: (loss (N,) fp32, 0 on ignored rows, grad_hidden,
    grad_weight). A row's loss depends on its own hidden row only, so grad_hidden's row r is d loss_r / d h_r
    (train/linear_logps.py scales each by its own weight)."""
    check_tensors(hidden, weight, labels)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    hidden, labels = hidden.contiguous(), labels.contiguous()
    rows = chunk_size or _chunk_rows(n_rows, vocab, hidden.element_size())
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    # fp32 sum over chunks: rounding bf16 once per chunk would lose the small per-chunk contributions.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad_weight else None
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        h = hidden[start:end]  # (n_c, d)
        logits = h @ weight.t()  # (n_c, V) in the input dtype, becomes dlogits below
        _cross_entropy_rows(logits, labels[start:end], loss_rows[start:end], ignore_index, softcap)
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])  # (n_c, V) @ (V, d)
        if grad_weight is not None:
            grad_weight += logits.t() @ h  # (V, n_c) @ (n_c, d), added into fp32 without an fp32 copy
        del logits  # free this chunk's logits before the next GEMM allocates its own: one chunk alive, not two
    grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
    return loss_rows, grad_hidden, grad_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap, reduction, chunk_size, need_dh, need_dw):
        loss, grad_hidden, grad_weight = linear_cross_entropy_fwd(
            hidden, weight, labels, ignore_index, softcap, chunk_size, need_dh, need_dw
        )
        scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        if reduction == "mean":
            # A micro-batch with no trained token gives loss 0 and zero gradients rather than torch's NaN.
            scale = 1.0 / (labels != ignore_index).sum().clamp(min=1).float()
        ctx.save_for_backward(grad_hidden, grad_weight, scale)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        g = (grad_output.float() * scale).contiguous()  # () fp32
        dh = _scaled(grad_hidden, g) if grad_hidden is not None else None
        dw = _scaled(grad_weight, g) if grad_weight is not None else None
        return dh, dw, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "sum",
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross entropy of hidden (N, d) @ weight (V, d)^T against labels (N,), already shifted; fp32 scalar.

    reduction "sum" adds the token losses, "mean" divides by the count of labels != ignore_index.
    softcap c applies Gemma-2's c * tanh(logits / c). chunk_size overrides the rows per chunk (tests).
    """
    if reduction not in ("sum", "mean"):
        raise PpalliError(f"linear_cross_entropy reduction must be 'sum' or 'mean', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
        raise PpalliError(
            "linear_cross_entropy needs hidden (N, d), weight (V, d), labels (N,), got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    grad = torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(
        hidden, weight, labels, ignore_index, softcap or None, reduction, chunk_size,  # softcap 0 or None: off
        grad and hidden.requires_grad, grad and weight.requires_grad,
    )
