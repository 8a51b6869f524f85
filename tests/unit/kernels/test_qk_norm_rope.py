"""qk_norm_rope: the per-head RMSNorm (Qwen3's / Gemma 3's q_norm, k_norm) of a projection's base output plus its
LoRA term, then HF's rotation, against the same ops one by one in fp32: the forward, and the gradient of the
norm's input through the backward kernel (with dv copied into a column block beside it)."""

import pytest
import torch
from reference import assert_close, hf_cos_sin, rope_ref

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels.qk_norm_rope import qk_norm_rope_bwd, qk_norm_rope_fwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def _inputs(b, h, t, d, r, seed=0, lora=True):
    g = torch.Generator().manual_seed(seed)
    n = b * t
    y = torch.randn(n, h * d, generator=g).to(DEVICE)
    xa = torch.randn(n, 3 * r, generator=g).to(DEVICE)[:, r:2 * r] if lora else None  # a stacked product's block
    lora_b = (torch.randn(h * d, r, generator=g) * 0.3).to(DEVICE) if lora else None
    w = (torch.randn(d, generator=g) * 0.5 + 1.0).to(DEVICE)
    cos, sin = torch.randn(b, t, d, generator=g).to(DEVICE), torch.randn(b, t, d, generator=g).to(DEVICE)
    return y, xa, lora_b, w, cos, sin


def _reference(y, xa, lora_b, s, w, offset, cos, sin, b, d):
    """(N, H*D) -> the rotated normed heads (B, H, T, D), op by op in fp32 (autograd through it)."""
    x = y + s * xa @ lora_b.t() if xa is not None else y
    heads = x.view(b, -1, x.shape[1] // d, d)  # (B, T, H, D)
    normed = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + EPS) * (offset + w)
    q = normed.transpose(1, 2)
    return rope_ref(q, q, cos, sin)[0]


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["qwen3", "gemma3_offset"])
@pytest.mark.parametrize(
    "b, h, t, d, r, lora",
    [(2, 3, 7, 16, 8, True), (1, 2, 5, 128, 16, True), (3, 2, 4, 6, 4, True), (2, 2, 6, 16, 4, False)],
    ids=["odd", "head_dim_128", "tiny_head_dim", "no_lora"],
)
def test_forward_and_input_gradient_match_the_ops_one_by_one(b, h, t, d, r, lora, offset):
    y, xa, lora_b, w, cos, sin = _inputs(b, h, t, d, r, lora=lora)
    got = qk_norm_rope_fwd(y, xa, lora_b, 0.5, w, EPS, offset, cos, sin, b, d)
    leaf = y.clone().requires_grad_()
    want = _reference(leaf, xa, lora_b, 0.5, w, offset, cos, sin, b, d)
    assert got.shape == (b, h, t, d) and got.transpose(1, 2).is_contiguous()
    assert_close("forward", got, want, torch.float32)
    d_out = torch.randn(b, t, h, d, device=DEVICE).transpose(1, 2)  # the layout attention hands back
    want.backward(d_out)
    dx = qk_norm_rope_bwd(d_out, y, xa, lora_b, 0.5, w, EPS, offset, cos, sin, b, d)
    assert_close("input gradient", dx, leaf.grad, torch.float32)


def test_backward_writes_a_column_block_and_copies_v_beside_it():
    """k's launch in lora_qkv: dk into its block of an (N, Hq*D + 2 Hk*D) buffer, dv into the next, from
    gradients in (B, H, T, D) memory (not the projections' layout) and packed positions."""
    b, h, t, d, r = 2, 2, 9, 16, 4
    y, xa, lora_b, w, _, _ = _inputs(b, h, t, d, r, seed=3)
    cos, sin = hf_cos_sin(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0]], device=DEVICE), d)  # (1, T, D): broadcast
    d_out, dv = torch.randn(b, h, t, d, device=DEVICE), torch.randn(b, h, t, d, device=DEVICE)
    buf = torch.full((b * t, 3 * h * d), 7.0, device=DEVICE)
    dk_block, dv_block = buf[:, h * d:2 * h * d], buf[:, 2 * h * d:]
    qk_norm_rope_bwd(d_out, y, xa, lora_b, 2.0, w, EPS, 0.0, cos, sin, b, d, out=dk_block, v=(dv, dv_block))
    leaf = y.clone().requires_grad_()
    _reference(leaf, xa, lora_b, 2.0, w, 0.0, cos, sin, b, d).backward(d_out)
    assert_close("dk block", dk_block, leaf.grad, torch.float32)
    assert_close("dv block", dv_block, dv.transpose(1, 2).reshape(b * t, h * d), torch.float32)
    assert (buf[:, :h * d] == 7).all()


def test_bf16_rounds_once_at_the_output():
    """bf16 in and out, fp32 inside: within bf16's rounding of the fp32 result."""
    b, h, t, d, r = 2, 4, 5, 32, 8
    y, xa, lora_b, w, cos, sin = (None if z is None else z.to(torch.bfloat16) for z in _inputs(b, h, t, d, r, 4))
    got = qk_norm_rope_fwd(y, xa, lora_b, 0.5, w, EPS, 0.0, cos, sin, b, d)
    assert got.dtype == torch.bfloat16
    want = _reference(*(z.float() for z in (y, xa, lora_b)), 0.5, w.float(), 0.0, cos.float(), sin.float(), b, d)
    assert_close("bf16 forward", got.float(), want, torch.bfloat16)


def test_what_it_refuses_is_named():
    y, xa, lora_b, w, cos, sin = _inputs(1, 2, 4, 16, 4)
    with pytest.raises(PpalliError, match="even D"):
        qk_norm_rope_fwd(y, xa, lora_b, 1.0, w, EPS, 0.0, cos, sin, 1, 12)  # 32 columns are not whole heads of 12
    with pytest.raises(PpalliError, match="trains"):
        qk_norm_rope_fwd(y, xa, lora_b, 1.0, w.clone().requires_grad_(), EPS, 0.0, cos, sin, 1, 16)
