"""Pure-PyTorch references for the fused kernels, written as HF writes the ops, and the comparison helpers.

Every reference upcasts to fp32, computes, and casts back once, so on fp32 inputs a kernel may differ only
by summation order. The GPU tests and benchmarks/bench_kernels.py import this file too.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# (atol, rtol) for elementwise comparisons of a kernel against its reference on the same inputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),  # both compute in fp32: only the order of sums differs
    # Loose: each side rounds its fp32 result to bf16 once (eps 2**-7 = 7.8e-3), so the two can sit one
    # rounding step apart on each side, about 2 ulps = 1.6e-2 relative; atol covers values near zero.
    torch.bfloat16: (1e-2, 2e-2),
    # Loose for the same reason: fp16 eps 2**-10 = 9.8e-4, two roundings apart.
    torch.float16: (1e-3, 2e-3),
}

# Relative error of the loss of the fused CE against an fp32 reference. Loose for bf16: the kernel's
# logits are rounded to bf16 (about 2e-3 absolute at logit std 2), which moves the mean token loss by
# ~1e-4 relative; 1e-3 leaves margin and still catches a wrong softcap or normalization.
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}

# Relative error of norms ||a - b|| / ||b|| for the matmul-fed cross-entropy gradients against an fp32
# reference: elementwise tolerances fail on sums of 128k terms that cancel to near zero.
NORM_TOLERANCES = {
    torch.float32: 1e-5,  # the same fp32 GEMMs; summation order only
    # Loose: the kernel holds the chunk's logits and their gradient in bf16 (as HF's plain path holds
    # the logits), each about 4e-3 relative off the fp32 reference; 2.5x margin.
    torch.bfloat16: 1e-2,
}


def _diff_message(name: str, actual: torch.Tensor, expected: torch.Tensor, bound: str) -> str:
    diff = (actual.float() - expected.float()).abs()
    return f"{name}: max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e} ({bound})"


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Elementwise |a - e| <= atol + rtol * |e| with the dtype's tolerances; prints max and mean diff if not."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = TOLERANCES[dtype]
    ok = torch.allclose(actual.float(), expected.float(), atol=atol, rtol=rtol)
    assert ok, _diff_message(name, actual, expected, f"atol {atol}, rtol {rtol}, {dtype}")


def assert_close_norm(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """||a - e|| / ||e|| within the dtype's norm tolerance; prints max and mean diff if not."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = NORM_TOLERANCES[dtype]
    rel = (actual.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-30)
    assert rel.item() <= tol, _diff_message(name, actual, expected, f"relative norm error {rel.item():.3e} > {tol}")


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x (..., N), weight (N,): HF's Gemma-style RMSNorm, fp32 throughout, one cast at the end."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + weight.float())).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(q, k, cos, sin):
    """q (B, Hq, T, D), k (B, Hk, T, D), cos/sin (B, T, D): HF's apply_rotary_pos_emb (unsqueeze_dim=1)."""
    cos, sin = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    q_out = q.float() * cos + rotate_half(q.float()) * sin
    k_out = k.float() * cos + rotate_half(k.float()) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def hf_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float = 10000.0, dtype=torch.float32):
    """position_ids (B, T) -> cos, sin (B, T, D) as HF's default rotary embedding builds them."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
    freqs = position_ids.float()[..., None] * inv_freq.to(position_ids.device)  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def geglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.gelu(gate.float(), approximate="tanh") * up.float()).to(gate.dtype)


def _chunk_loss(hidden, weight, labels, ignore_index, softcap, hf_logits):
    if hf_logits:  # HF's plain path: the lm_head GEMM in the input dtype, then the upcast
        logits = (hidden @ weight.t()).float()  # (n, V)
    else:
        logits = hidden.float() @ weight.float().t()  # (n, V) fp32
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def linear_cross_entropy_ref(hidden, weight, labels, ignore_index=-100, softcap=None, reduction="sum",
                             chunk_rows=None, hf_logits=False):
    """hidden (N, d), weight (V, d), labels (N,) -> fp32 loss. chunk_rows recomputes each chunk's
    logits in the backward (activation checkpointing) so the reference fits beside a 128k vocab; "mean"
    divides by the count of kept labels, at least 1 (as the kernel does). hf_logits computes the logits in
    the input dtype and upcasts them, as HF's plain path does, instead of an fp32 GEMM."""
    rows = chunk_rows or hidden.shape[0]
    loss = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start:start + rows], labels[start:start + rows]
        if chunk_rows is None:
            loss = loss + _chunk_loss(h, weight, y, ignore_index, softcap, hf_logits)
        else:
            loss = loss + checkpoint(_chunk_loss, h, weight, y, ignore_index, softcap, hf_logits, use_reentrant=False)
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum().clamp(min=1)
    return loss
