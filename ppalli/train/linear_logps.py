"""Log-probabilities of target tokens through the lm_head, chunk by chunk: no (N, V) logits at once.

The preference objectives (ORPO, DPO) need each trained token's log p(target), summed per sequence, and
differentiate a function of those sums (a sigmoid of the margin). Each token's log p depends on its own
hidden row only, so d logp / d h is one row per token whatever the loss does with it: the forward makes it
chunk by chunk, as the fused cross entropy makes its gradient (kernels/linear_cross_entropy.py), and the
backward scales each row by its upstream weight:

    forward:   z = h W^T (softcapped), logp[t] = z[t] - lse(z),  dh0 = (onehot(t) - softmax(z)) W   per chunk
    backward:  dh = g * dh0

Plain autograd through `logits.float().log_softmax(-1)` holds the logits, their fp32 copy and the log-softmax
(2 + 4 + 4 bytes a logit: 21 GB for 16,384 tokens of Llama 3's V = 128,256) and its backward adds fp32
gradients. A trained head's gradient sums rows with weights known only in the backward, so then the forward
keeps each row's log-sum-exp and the backward makes each chunk's logits again (one more GEMM).

On CUDA a frozen head's chunks go through the fused cross entropy's Triton kernel (one pass over the chunk's
logits in the matmul dtype: its row losses are -log p and its gradient -d logp / d h); elsewhere torch's ops
(cuBLAS or CPU GEMMs, fp32 softmax per chunk), so the reference path uses it too, on any device.
"""

from __future__ import annotations

import torch

# Rows per chunk: 1024 x V fp32 is 0.5 GB for Llama 3's vocabulary; a chunk holds about three such buffers.
CHUNK_ROWS = 1024


def _logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """(rows, V) fp32 logits of h (rows, d), softcapped as HF applies it (in the matmul dtype, then fp32)."""
    z = h @ weight.t()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z.float()


def _dlogp(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, g: torch.Tensor, softcap: float | None):
    """g * d logp[target] / d x for a chunk, (rows, V) fp32: z its softcapped fp32 logits, lse (rows,) their
    log-sum-exp, g (rows, 1) the weight of each row; x the logits before the softcap."""
    dz = (z - lse[:, None]).exp_().mul_(-g)  # -g softmax(z)
    dz.scatter_add_(1, targets[:, None], g)  # + g at the target
    if softcap:  # z = c tanh(x / c): dz/dx = 1 - (z / c)^2
        dz.mul_(1 - (z / softcap).square_())
    return dz


def _use_kernel(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused cross entropy's Triton kernel (one pass over each chunk's logits in the matmul dtype)
    takes a frozen head's chunks: CUDA tensors of one dtype with triton installed. Elsewhere torch's ops."""
    from ppalli.kernels._utils import is_triton_available

    return hidden.is_cuda and hidden.dtype == weight.dtype and is_triton_available()


class LinearLogpsFunction(torch.autograd.Function):
    """With a frozen weight, a row's gradient is linear in that row's own upstream weight, so the forward makes
    d logp / d h for every row (one more GEMM, as the fused cross entropy does) and the backward only scales
    it: the lm_head runs twice in all, as in the plain path. A trained weight's gradient sums rows with their
    weights, known only in the backward, which then makes each chunk's logits again.

    benchmarks/bench_linear_logps.py on an H200 (2026-12-04, 4096 tokens, V 128256, bf16), forward + backward
    (results/2026-12-04-h200-linear-logps-2.txt): 1B head 6.96 ms through the Triton kernel (+0.26 GiB), 15.4
    by torch's ops (+1.48), 27.1 with the recompute (+2.22), 12.2 from full logits (+5.87); 8B head 15.1 /
    21.2 / 42.9 / 18.0 ms. log p within 1e-6 of the full logits'; d logp / d h is rounded to bf16 before its
    scale (as the fused cross entropy's): 0.33% from the full-logits gradient, itself rounded once."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, rows, need_dh, need_dw):
        ctx.softcap, ctx.rows = softcap, rows
        if not need_dw and _use_kernel(hidden, weight):
            from ppalli.kernels.linear_cross_entropy import linear_cross_entropy_rows

            # the fused cross entropy's row losses are -log p, its hidden gradient -d logp / d h, row by row
            loss, dh, _ = linear_cross_entropy_rows(hidden, weight, targets, softcap=softcap, need_grad_hidden=need_dh)
            ctx.made = True
            ctx.save_for_backward(dh.neg_() if dh is not None else None)
            return loss.neg_()
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        logp = torch.empty_like(lse)
        dh = torch.empty_like(hidden) if need_dh and not need_dw else None  # d logp / d h per row
        ones = torch.ones(min(rows, hidden.shape[0]), 1, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            end = min(start + rows, hidden.shape[0])
            z = _logits(hidden[start:end], weight, softcap)  # (rows, V)
            lse[start:end] = torch.logsumexp(z, dim=-1)
            logp[start:end] = z.gather(1, targets[start:end, None]).squeeze(1) - lse[start:end]
            if dh is not None:
                dz = _dlogp(z, lse[start:end], targets[start:end], ones[:end - start], softcap)
                del z  # before the GEMM's bf16 copy: two (rows, V) fp32 buffers at a time, not three
                torch.mm(dz.to(hidden.dtype), weight, out=dh[start:end])  # (rows, V) @ (V, d)
            else:
                del z
        if dh is not None:
            ctx.save_for_backward(dh)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.made = dh is not None
        return logp

    @staticmethod
    def backward(ctx, grad):
        grad = grad.float()[:, None]  # (N, 1)
        if ctx.made:
            (dh,) = ctx.saved_tensors
            return (dh.float() * grad).to(dh.dtype), None, None, None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h = ctx.needs_input_grad[0]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.rows):
            end = min(start + ctx.rows, hidden.shape[0])
            h = hidden[start:end]  # (rows, d)
            dz = _dlogp(_logits(h, weight, ctx.softcap), lse[start:end], targets[start:end], grad[start:end],
                        ctx.softcap).to(hidden.dtype)
            if need_h:
                torch.mm(dz, weight, out=dh[start:end])  # (rows, V) @ (V, d)
            dw += dz.t() @ h
        return dh, dw.to(weight.dtype), None, None, None, None, None


def linear_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None,
                 rows: int = CHUNK_ROWS) -> torch.Tensor:
    """log softmax(hidden @ weight^T)[target] per row, fp32 (N,): hidden (N, d), weight (V, d), targets (N,) in
    [0, V) (select the trained rows first: every row here costs its share of the GEMMs). softcap: Gemma 2/3's
    final logit softcap."""
    grad = torch.is_grad_enabled()
    return LinearLogpsFunction.apply(hidden, weight, targets, softcap or None, rows, grad and hidden.requires_grad,
                                     grad and weight.requires_grad)
