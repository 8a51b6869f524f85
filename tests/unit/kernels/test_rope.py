"""Fused RoPE against HF's apply_rotary_pos_emb: forward and the gradients of q and k, with GQA, a batch
broadcast cos/sin, packed positions and the (B, T, H, D) memory layout the projections produce; and RoPE of
a projection's base output plus its LoRA term (rope_lora_fwd) against the sum then HF's rotation."""

import pytest
import torch
from reference import assert_close, hf_cos_sin, rms_norm_ref, rope_ref

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels.rope import apply_rope, rope_fwd, rope_into_cache, rope_lora_fwd  # noqa: E402

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


def test_v_rides_along_unrotated_into_a_column_block():
    """rope_fwd(..., v=(dv, v_out)) as lora_qkv's backward calls it: dq, dk rotated back and dv copied into the
    column blocks of one (N, Hq*D + 2 Hk*D) buffer, dv read from (B, H, T, D) memory (not the buffer's)."""
    torch.manual_seed(0)
    b, hq, hk, t, d = 2, 4, 2, 5, 8
    dq, dk = _qk(b, hq, hk, t, d)
    dv = torch.randn(b, hk, t, d, device=DEVICE, dtype=DTYPE)
    cos, sin = torch.randn(b, t, d, device=DEVICE), torch.randn(b, t, d, device=DEVICE)
    buf = torch.full((b * t, (hq + 2 * hk) * d), float("nan"), device=DEVICE, dtype=DTYPE)
    heads = [c.view(b, t, -1, d).transpose(1, 2) for c in buf.split([hq * d, hk * d, hk * d], dim=1)]
    rope_fwd(dq, dk, cos, sin, backward=True, out=tuple(heads[:2]), v=(dv, heads[2]))
    want_q, want_k = rope_fwd(dq, dk, cos, sin, backward=True)
    assert torch.equal(heads[0], want_q) and torch.equal(heads[1], want_k)
    assert torch.equal(heads[2], dv)
    with pytest.raises(PpalliError, match="out must be"):
        rope_fwd(dq, dk, cos, sin, backward=True, v=(dv[:, :1], heads[2]))


def test_rejects_odd_head_dim():
    q, k = _qk(1, 2, 2, 3, 5)
    with pytest.raises(PpalliError, match="even head dim"):
        apply_rope(q, k, torch.ones(1, 3, 5, device=DEVICE), torch.ones(1, 3, 5, device=DEVICE))


@pytest.mark.parametrize(
    "b, h, t, d, r, dtype",
    [(2, 3, 7, 16, 8, torch.float32), (1, 5, 20, 64, 16, torch.float32), (3, 2, 9, 6, 4, torch.float32),
     (2, 4, 17, 32, 16, torch.bfloat16), (1, 3, 5, 128, 16, torch.float32)],
    ids=["odd", "llama_1b_head", "tiny_head_dim", "bf16", "head_dim_128"],
)
def test_rope_lora_matches_the_sum_then_rope(b, h, t, d, r, dtype):
    """y + s xa B^T, then HF's rotation, where xa is a column block of a stacked (N, 3r) product as lora_qkv
    hands it. The kernel rotates the fp32 sum, the reference rounds it to the dtype first: bf16 compares at
    its tolerance."""
    g = torch.Generator().manual_seed(0)
    n = b * t
    y = torch.randn(n, h * d, generator=g).to(DEVICE, dtype)
    xa = torch.randn(n, 3 * r, generator=g).to(DEVICE, dtype)[:, r:2 * r]
    lora_b = (torch.randn(h * d, r, generator=g) * 0.3).to(DEVICE, dtype)
    cos, sin = torch.randn(b, t, d, generator=g).to(DEVICE), torch.randn(b, t, d, generator=g).to(DEVICE)
    got = rope_lora_fwd(y, xa, lora_b, 0.5, cos, sin, b, d)
    summed = (y.float() + 0.5 * xa.float() @ lora_b.float().t()).to(dtype)
    heads = summed.view(b, t, h, d).transpose(1, 2)
    want, _ = rope_ref(heads, heads, cos.to(dtype), sin.to(dtype))
    assert got.shape == (b, h, t, d) and got.transpose(1, 2).is_contiguous()
    assert_close("rope(y + s xa B^T)", got, want, dtype)


def test_rope_lora_with_packed_positions_broadcast_over_the_batch():
    g = torch.Generator().manual_seed(1)
    y, xa, lora_b = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((18, 32), (18, 4), (32, 4)))
    cos, sin = hf_cos_sin(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0]], device=DEVICE), 16)  # (1, 9, 16)
    got = rope_lora_fwd(y, xa, lora_b, 2.0, cos, sin, 2, 16)
    heads = (y + 2.0 * xa @ lora_b.t()).view(2, 9, 2, 16).transpose(1, 2)
    assert_close("packed", got, rope_ref(heads, heads, cos, sin)[0], DTYPE)


def test_rope_lora_rejects_a_width_that_is_not_whole_heads():
    y, xa, lora_b = torch.ones(4, 24, device=DEVICE), torch.ones(4, 2, device=DEVICE), torch.ones(24, 2, device=DEVICE)
    cos = torch.ones(1, 4, 16, device=DEVICE)
    with pytest.raises(PpalliError, match="rope_lora_fwd needs"):
        rope_lora_fwd(y, xa, lora_b, 1.0, cos, cos, 1, 16)


@pytest.mark.parametrize("blocks", [(16, 1, 4), (32, 4, 8)])
def test_rope_lora_settings_agree(blocks):
    """Other (tokens, heads a step, warps) settings than the default: a head step past the last head (3 heads
    in steps of 4) and token blocks past N are masked."""
    g = torch.Generator().manual_seed(2)
    y, xa, lora_b = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((40, 48), (40, 8), (48, 8)))
    cos, sin = torch.randn(2, 20, 16, generator=g).to(DEVICE), torch.randn(2, 20, 16, generator=g).to(DEVICE)
    want = rope_lora_fwd(y, xa, lora_b, 0.5, cos, sin, 2, 16)
    assert_close("settings", rope_lora_fwd(y, xa, lora_b, 0.5, cos, sin, 2, 16, blocks=blocks), want, DTYPE)


@pytest.mark.parametrize("slot", [0, 5, 7])
def test_rope_into_cache_writes_k_and_v_at_the_device_slot(slot):
    """A decode step on a static cache (ppalli/infer/decode_layers.py): q rotated as rope_fwd rotates it, k rotated
    and v copied into slot `slot` of (B, Hk, L, D) caches read from a device scalar; nothing else written."""
    torch.manual_seed(0)
    b, hq, hk, d, slots = 2, 4, 2, 16, 8
    q, k, v = (torch.randn(b, h, 1, d, device=DEVICE) for h in (hq, hk, hk))
    cos, sin = hf_cos_sin(torch.full((b, 1), 11, device=DEVICE), d)
    keys, values = torch.zeros(b, hk, slots, d, device=DEVICE), torch.zeros(b, hk, slots, d, device=DEVICE)
    q_out = rope_into_cache(q, k, v, cos, sin, keys, values, torch.tensor(slot, device=DEVICE))
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    assert_close("q", q_out, q_ref, torch.float32)
    assert_close("k", keys[:, :, slot:slot + 1], k_ref, torch.float32)
    torch.testing.assert_close(values[:, :, slot:slot + 1], v, rtol=0, atol=0)
    others = [i for i in range(slots) if i != slot]
    assert not keys[:, :, others].any() and not values[:, :, others].any()


def test_rope_into_a_full_cache_writes_nothing():
    d = 16
    q, k, v = (torch.randn(1, 2, 1, d, device=DEVICE) for _ in range(3))
    cos, sin = hf_cos_sin(torch.zeros((1, 1), dtype=torch.long, device=DEVICE), d)
    keys, values = torch.zeros(1, 2, 4, d, device=DEVICE), torch.zeros(1, 2, 4, d, device=DEVICE)
    rope_into_cache(q, k, v, cos, sin, keys, values, torch.tensor(4, device=DEVICE))
    assert not keys.any() and not values.any()


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["qwen3", "offset_one"])
def test_rope_with_qk_norms_is_the_norm_then_rope(offset):
    """Decoding Qwen3 (qk_norms): each head of q and k RMSNormed over D with its own weight, then rotated."""
    torch.manual_seed(0)
    q, k = _qk(2, 4, 2, 3, 16)
    cos, sin = torch.randn(2, 3, 16, device=DEVICE), torch.randn(2, 3, 16, device=DEVICE)
    wq, wk = torch.randn(16, device=DEVICE), torch.randn(16, device=DEVICE)
    q_out, k_out = rope_fwd(q * 3, k, cos, sin, qk_norms=((wq, 1e-6), (wk, 1e-5), offset))
    q_ref, k_ref = rope_ref(rms_norm_ref(q * 3, wq, 1e-6, offset), rms_norm_ref(k, wk, 1e-5, offset), cos, sin)
    assert_close("q", q_out, q_ref, DTYPE)
    assert_close("k", k_out, k_ref, DTYPE)
    with pytest.raises(PpalliError, match="forward only"):
        rope_fwd(q, k, cos, sin, backward=True, qk_norms=((wq, 1e-6), (wk, 1e-5), offset))


def test_rope_into_cache_with_qk_norms():
    torch.manual_seed(0)
    b, hq, hk, d = 2, 4, 2, 16
    q, k, v = (torch.randn(b, h, 1, d, device=DEVICE) for h in (hq, hk, hk))
    cos, sin = hf_cos_sin(torch.full((b, 1), 5, device=DEVICE), d)
    wq, wk = torch.randn(d, device=DEVICE), torch.randn(d, device=DEVICE)
    keys, values = torch.zeros(b, hk, 4, d, device=DEVICE), torch.zeros(b, hk, 4, d, device=DEVICE)
    q_out = rope_into_cache(q, k, v, cos, sin, keys, values, torch.tensor(2, device=DEVICE),
                            ((wq, 1e-6), (wk, 1e-6), 0.0))
    q_ref, k_ref = rope_ref(rms_norm_ref(q, wq, 1e-6, 0.0), rms_norm_ref(k, wk, 1e-6, 0.0), cos, sin)
    assert_close("q", q_out, q_ref, torch.float32)
    assert_close("k", keys[:, :, 2:3], k_ref, torch.float32)
    torch.testing.assert_close(values[:, :, 2:3], v, rtol=0, atol=0)
