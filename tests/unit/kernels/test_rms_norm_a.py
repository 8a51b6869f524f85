"""rms_norm_a: an RMSNorm that also makes n A^T for the LoRA adapters reading n, and adds their dxa A into its
backward (lora_add_rms_norm.py: rms_norm_a alone, lora_add_rms_norm with a_next after the residual add). Against
autograd through the plain ops (the norm, then n @ A^T): outputs, the input's gradient with the residual's
added, and lora_add_rms_norm's other gradients; rows not a multiple of the 16-row program, widths not a power of
2, stacked ranks of 16 to 48, both norm offsets, row walks of one step and of 64-column steps."""

import pytest
import torch
from reference import assert_close, rms_norm_ref

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels.lora_add_rms_norm import lora_add_rms_norm, rms_norm_a, rms_norm_a_fwd  # noqa: E402
from ppalli.kernels.rms_norm import rms_norm_a_bwd, rms_norm_bwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32
SHAPES = [(16, 256, 32), (37, 300, 48), (5, 123, 16)]  # (M, d, R): R the stacked rank of the next adapters


def _rnd(g, *shape, scale=1.0, dtype=DTYPE):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("m,d,rank", SHAPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_a_matches_the_norm_then_the_gemm(m, d, rank, offset):
    g = torch.Generator().manual_seed(0)
    x, w, a = _rnd(g, m, d).requires_grad_(), _rnd(g, d), _rnd(g, rank, d, scale=0.1)
    x_ref = x.detach().clone().requires_grad_()
    res, n, xa = rms_norm_a(x, w, 1e-6, offset, a)
    n_ref = rms_norm_ref(x_ref, w, 1e-6, offset)
    assert_close("n", n, n_ref, DTYPE)
    assert_close("xa", xa, n_ref @ a.t(), DTYPE)
    g_res, g_n, g_xa = _rnd(g, m, d), _rnd(g, m, d), _rnd(g, m, rank)
    ((res * g_res).sum() + (n * g_n).sum() + (xa * g_xa).sum()).backward()
    ((x_ref * g_res).sum() + (n_ref * g_n).sum() + ((n_ref @ a.t()) * g_xa).sum()).backward()
    assert_close("dx", x.grad, x_ref.grad, DTYPE)


@pytest.mark.parametrize("m,d,rank", SHAPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_lora_add_rms_norm_with_the_next_adapters(m, d, rank, offset):
    g = torch.Generator().manual_seed(1)
    leaves = dict(h=_rnd(g, m, d), y0=_rnd(g, m, d), xa=_rnd(g, m, 8), b=_rnd(g, d, 8, scale=0.3))
    w, a = _rnd(g, d), _rnd(g, rank, d, scale=0.1)
    ours = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    ref = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    x, n, xn = lora_add_rms_norm(ours["h"], ours["y0"], ours["xa"], ours["b"], 0.5, w, 1e-6, offset, a_next=a)
    x_ref = ref["h"] + ref["y0"] + 0.5 * ref["xa"] @ ref["b"].t()
    n_ref = rms_norm_ref(x_ref, w, 1e-6, offset)
    for name, got, want in (("x", x, x_ref), ("n", n, n_ref), ("xn", xn, n_ref @ a.t())):
        assert_close(name, got, want, DTYPE)
    gx, gn, gxn = _rnd(g, m, d), _rnd(g, m, d), _rnd(g, m, rank)
    ((x * gx).sum() + (n * gn).sum() + (xn * gxn).sum()).backward()
    ((x_ref * gx).sum() + (n_ref * gn).sum() + ((n_ref @ a.t()) * gxn).sum()).backward()
    for name in leaves:
        assert_close(f"d{name}", ours[name].grad, ref[name].grad, DTYPE)


@pytest.mark.parametrize("blocks", [(16, 64, 4), (16, 512, 8)], ids=["64-column-steps", "one-step"])
def test_column_steps_agree(blocks):
    """Both passes of the backward and the forward's product walking a row in 64-column steps and in one step."""
    g = torch.Generator().manual_seed(2)
    m, d, rank = 37, 300, 48
    x, w, a = _rnd(g, m, d), _rnd(g, d), _rnd(g, rank, d, scale=0.1)
    n, rstd, xa = rms_norm_a_fwd(x, w, 1e-6, 1.0, a, blocks=blocks)
    n_ref = rms_norm_ref(x, w, 1e-6, 1.0)
    assert_close("n", n, n_ref, DTYPE)
    assert_close("xa", xa, n_ref @ a.t(), DTYPE)
    dn, dres, dxa = _rnd(g, m, d), _rnd(g, m, d), _rnd(g, m, rank)
    dx = rms_norm_a_bwd(dn, x, w, rstd, 1.0, dres, dxa, a, blocks=blocks)
    plain, _ = rms_norm_bwd(dn + dxa @ a, x, w, rstd, 1.0, compute_dw=False, dres=dres)
    assert_close("dx", dx, plain, DTYPE)


def test_without_the_rank_term_it_is_rms_norm_bwd():
    g = torch.Generator().manual_seed(3)
    x, w, dn, dres = _rnd(g, 37, 300), _rnd(g, 300), _rnd(g, 37, 300), _rnd(g, 37, 300)
    rstd = x.pow(2).mean(-1).add(1e-6).rsqrt()
    plain, _ = rms_norm_bwd(dn, x, w, rstd, 0.0, compute_dw=False, dres=dres)
    assert_close("dx", rms_norm_a_bwd(dn, x, w, rstd, 0.0, dres), plain, DTYPE)
    assert_close("dx, dn only", rms_norm_a_bwd(dn, x, w, rstd), rms_norm_bwd(dn, x, w, rstd, 0.0, False)[0], DTYPE)


def test_bf16_matches_fp32_within_rounding():
    g = torch.Generator().manual_seed(4)
    m, d, rank = 37, 300, 48
    x, w, a = _rnd(g, m, d), _rnd(g, d), _rnd(g, rank, d, scale=0.1)
    dn, dxa = _rnd(g, m, d), _rnd(g, m, rank)
    n32, rstd, xa32 = rms_norm_a_fwd(x, w, 1e-6, 0.0, a)
    dx32 = rms_norm_a_bwd(dn, x, w, rstd, 0.0, None, dxa, a)
    b = {k: v.bfloat16() for k, v in dict(x=x, w=w, a=a, dn=dn, dxa=dxa).items()}
    n16, rstd16, xa16 = rms_norm_a_fwd(b["x"], b["w"], 1e-6, 0.0, b["a"])
    dx16 = rms_norm_a_bwd(b["dn"], b["x"], b["w"], rstd16, 0.0, None, b["dxa"], b["a"])
    for name, ref, got in (("n", n32, n16), ("xa", xa32, xa16), ("dx", dx32, dx16)):
        err = (got.float() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, f"{name}: {err:.2e}"  # inputs rounded to bf16 once, as in lora_add_rms_norm's test


def test_bad_inputs_are_refused():
    g = torch.Generator().manual_seed(5)
    x, w, a = _rnd(g, 8, 64), _rnd(g, 64), _rnd(g, 32, 64)
    with pytest.raises(PpalliError, match="weight"):
        rms_norm_a(x, w.clone().requires_grad_(), 1e-6, 0.0, a)
    with pytest.raises(PpalliError, match="stacked A must be"):
        rms_norm_a(x, w, 1e-6, 0.0, a[:, :32])
    with pytest.raises(PpalliError, match="dxa"):
        rms_norm_a_bwd(x, x, w, torch.ones(8, device=DEVICE), 0.0, None, _rnd(g, 8, 16), a)
