"""Fused RoPE against HF's apply_rotary_pos_emb: forward and the gradients of q and k, with GQA, a batch
broadcast cos/sin, packed positions and the (B, T, H, D) memory layout the projections produce."""

import pytest
import torch
from reference import assert_close, hf_cos_sin, rope_ref

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels.rope import apply_rope  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32


def _run(fn, q, k, cos, sin, dq_out, dk_out):
    """Forward and backward of fn on fresh leaves sharing the data -> (q_out, k_out, dq, dk)."""
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_out, k_out = fn(q, k, cos, sin)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    return q_out, k_out, q.grad, k.grad


def _check(q, k, cos, sin):
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    got = _run(apply_rope, q, k, cos, sin, dq_out, dk_out)
    want = _run(rope_ref, q, k, cos, sin, dq_out, dk_out)
    for name, a, b in zip(("q_out", "k_out", "dq", "dk"), got, want):
        assert_close(name, a, b, DTYPE)


def _qk(b, hq, hk, t, d, projected_layout=True):
    """q (B, Hq, T, D), k (B, Hk, T, D); projected_layout gives them (B, T, H, D) memory, as HF's view+transpose."""
    if projected_layout:
        q = torch.randn(b, t, hq, d, device=DEVICE, dtype=DTYPE).transpose(1, 2)
        k = torch.randn(b, t, hk, d, device=DEVICE, dtype=DTYPE).transpose(1, 2)
        return q, k
    return (torch.randn(b, hq, t, d, device=DEVICE, dtype=DTYPE), torch.randn(b, hk, t, d, device=DEVICE, dtype=DTYPE))


@pytest.mark.parametrize(
    "b, hq, hk, t, d, projected_layout",
    [(2, 3, 1, 7, 16, True), (2, 4, 4, 8, 32, False), (1, 5, 5, 3, 6, True)],
    ids=["odd_gqa", "aligned_mha", "tiny_head_dim"],
)
def test_matches_reference(b, hq, hk, t, d, projected_layout):
    torch.manual_seed(0)
    q, k = _qk(b, hq, hk, t, d, projected_layout)
    # Random cos/sin whose halves differ: the backward must be the exact transpose, not just rope(-sin).
    cos, sin = torch.randn(b, t, d, device=DEVICE), torch.randn(b, t, d, device=DEVICE)
    _check(q, k, cos, sin)


def test_packed_positions_and_broadcast_batch():
    """HF cos/sin from position_ids (1, T) restarting per packed sample, broadcast over a batch of 2."""
    torch.manual_seed(0)
    q, k = _qk(2, 4, 2, 9, 16)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]], device=DEVICE)
    cos, sin = hf_cos_sin(position_ids, 16)  # (1, 9, 16)
    _check(q, k, cos, sin)


def test_rejects_odd_head_dim():
    q, k = _qk(1, 2, 2, 3, 5)
    with pytest.raises(PpalliError, match="even head dim"):
        apply_rope(q, k, torch.ones(1, 3, 5, device=DEVICE), torch.ones(1, 3, 5, device=DEVICE))
