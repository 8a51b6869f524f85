"""decode_attention (ppalli/kernels/decode_attention.py) against SDPA with the cache's kv heads repeated: one new
token a row, GQA, masked slots (left padding, unused static-cache slots), head dims that are not powers of two, the
cache cut into 1 to several splits, fp32 and bf16; strided (B, Hk, L, D) views as a StaticCache hands them over;
Gemma 2's logit softcapping against HF's eager arithmetic."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels.decode_attention import decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(q, k, v, valid, scale):
    b, hq, d = q.shape
    g = hq // k.shape[1]
    kk, vv = (t.float().repeat_interleave(g, dim=1) for t in (k, v))  # (B, Hq, L, D): head h reads kv head h // g
    mask = None if valid is None else valid[:, None, None, :]
    o = F.scaled_dot_product_attention(q.float()[:, :, None], kk, vv, attn_mask=mask, scale=scale)
    return o.reshape(b, hq * d)


def _inputs(b, hq, hk, slots, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    cache = torch.randn(2, b, hk, slots + 7, d, generator=gen).to(dtype)[:, :, :, 3:3 + slots]  # strided views
    valid = torch.rand(b, slots, generator=gen) < 0.7
    valid[:, 0] = True
    valid[0, slots // 2:] = False  # unused static-cache slots
    return q.to(DEVICE), cache[0].to(DEVICE), cache[1].to(DEVICE), valid.to(DEVICE)


@pytest.mark.parametrize("b, hq, hk, slots, d, splits", [(2, 4, 2, 40, 16, None), (3, 8, 2, 130, 24, 3),
                                                          (1, 6, 6, 200, 32, 2), (2, 4, 1, 64, 64, 1),
                                                          (1, 4, 2, 2600, 16, 40), (1, 4, 2, 700, 16, 500)])
def test_matches_sdpa_with_repeated_kv_heads(b, hq, hk, slots, d, splits):
    q, k, v, valid = _inputs(b, hq, hk, slots, d, torch.float32)
    got = decode_attention(q, k, v, valid, scale=0.3, splits=splits)
    torch.testing.assert_close(got, _reference(q, k, v, valid, 0.3), rtol=1e-5, atol=1e-5)


def test_no_mask_attends_to_every_slot_and_bf16_within_rounding():
    q, k, v, _ = _inputs(2, 8, 2, 96, 32, torch.bfloat16, seed=1)
    got = decode_attention(q, k, v, None, splits=2)
    want = _reference(q, k, v, None, 32 ** -0.5)
    assert got.dtype == torch.bfloat16
    # bf16 q, k, v and the probabilities rounded to bf16 for the p @ v tensor-core product (as flash kernels do),
    # against fp32 softmax on the same bf16 inputs: a few bf16 ulps (2^-8 relative each)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_a_split_with_no_kept_slot_adds_nothing():
    q, k, v, valid = _inputs(1, 4, 2, 192, 16, torch.float32, seed=2)
    valid[:, 64:] = False  # the second and third of three splits keep nothing
    got = decode_attention(q, k, v, valid, splits=3)
    torch.testing.assert_close(got, _reference(q, k, v, valid, 16 ** -0.5), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()


def test_softcap_matches_eager_attention_with_tanh_capped_scores():
    """Gemma 2's eager attention: scores * scale, / softcap, tanh, * softcap, then the mask and softmax. Scores
    large against the cap (scale 2, cap 3) so that capping changes the result."""
    q, k, v, valid = _inputs(2, 8, 2, 150, 16, torch.float32, seed=3)
    g = 4
    kk, vv = (t.repeat_interleave(g, dim=1) for t in (k, v))  # (B, Hq, L, D)
    scores = torch.einsum("bhd,bhld->bhl", q, kk) * 2.0
    scores = 3.0 * torch.tanh(scores / 3.0)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    want = torch.einsum("bhl,bhld->bhd", scores.softmax(-1), vv).reshape(2, -1)
    got = decode_attention(q, k, v, valid, scale=2.0, splits=3, softcap=3.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - decode_attention(q, k, v, valid, scale=2.0, splits=3)).abs().max() > 1e-2


def test_bad_shapes_are_named():
    q, k, v, valid = _inputs(2, 4, 2, 40, 16, torch.float32)
    with pytest.raises(PpalliError, match="Hk dividing Hq"):
        decode_attention(q[:, :3], k, v)
    with pytest.raises(PpalliError, match="valid must be"):
        decode_attention(q, k, v, valid[:, :10])
