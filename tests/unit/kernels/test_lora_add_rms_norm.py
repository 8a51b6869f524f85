"""lora_add_rms_norm: x = h + y0 + s xa B^T, n = RMSNorm(x) * (offset + w) in one kernel, against autograd
through the plain ops; the backward adds the residual gradient inside rms_norm's backward. Row counts not a
multiple of the 16-row program, widths not a power of 2 (5 x 123), and no LoRA term. At these widths the default
setting takes a row in one step; test_column_steps_agree also walks rows in steps of 64 columns."""

import pytest
import torch
from reference import assert_close, rms_norm_ref

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels.lora_add_rms_norm import lora_add_fwd, lora_add_rms_norm, lora_add_rms_norm_fwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32


def _leaves(m, d, r, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, DTYPE).requires_grad_()

    return dict(h=rnd(m, d), y0=rnd(m, d), xa=rnd(m, r), b=rnd(d, r, scale=0.3), w=rnd(d))


@pytest.mark.parametrize("m,d,r", [(16, 256, 16), (37, 300, 8), (5, 123, 16)])
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_matches_autograd_of_the_plain_ops(m, d, r, lora, offset):
    ours, ref = _leaves(m, d, r), _leaves(m, d, r)
    s, eps = 0.5, 1e-6
    xa, b = (ours["xa"], ours["b"]) if lora else (None, None)
    x, n = lora_add_rms_norm(ours["h"], ours["y0"], xa, b, s, ours["w"], eps, offset)
    x_ref = ref["h"] + ref["y0"] + (s * ref["xa"] @ ref["b"].t() if lora else 0)
    n_ref = rms_norm_ref(x_ref, ref["w"], eps, offset)
    assert_close("x", x, x_ref, DTYPE)
    assert_close("n", n, n_ref, DTYPE)
    gx, gn = torch.randn_like(x), torch.randn_like(n)
    (x * gx + n * gn).sum().backward()
    (x_ref * gx + n_ref * gn).sum().backward()
    for name in ("h", "y0", "w") + (("xa", "b") if lora else ()):
        assert_close(f"d{name}", ours[name].grad, ref[name].grad, DTYPE)


@pytest.mark.parametrize("m,d,r", [(37, 300, 8), (5, 123, 16)])
@pytest.mark.parametrize("lora", [True, False])
def test_lora_add_alone_writes_over_y0(m, d, r, lora):
    """Without the norm (a down projection's residual add): x = h + y0 + s xa B^T, written into y0 in place."""
    t = {k: v.detach() for k, v in _leaves(m, d, r).items()}
    xa, b = (t["xa"], t["b"]) if lora else (None, None)
    x_ref = t["h"] + t["y0"] + (0.5 * t["xa"] @ t["b"].t() if lora else 0)
    assert_close("x", lora_add_fwd(t["h"], t["y0"], xa, b, 0.5), x_ref, DTYPE)
    y0 = t["y0"].clone()
    x = lora_add_fwd(t["h"], y0, xa, b, 0.5, out=y0)
    assert x.data_ptr() == y0.data_ptr()
    assert_close("x in place", x, x_ref, DTYPE)


@pytest.mark.parametrize("blocks", [(16, 64, 4), (16, 512, 8)], ids=["64-column-steps", "one-step"])
@pytest.mark.parametrize("lora", [True, False])
def test_column_steps_agree(blocks, lora):
    """The forward walking a row in 64-column steps and in one step (x read back for the norm either way)."""
    t = {k: v.detach() for k, v in _leaves(37, 300, 8).items()}
    xa, b = (t["xa"], t["b"]) if lora else (None, None)
    x, n, rstd = lora_add_rms_norm_fwd(t["h"], t["y0"], xa, b, 0.5, t["w"], 1e-6, 1.0, blocks=blocks)
    x_ref = t["h"] + t["y0"] + (0.5 * t["xa"] @ t["b"].t() if lora else 0)
    assert_close("x", x, x_ref, DTYPE)
    assert_close("n", n, rms_norm_ref(x_ref, t["w"], 1e-6, 1.0), DTYPE)
    assert_close("rstd", rstd, x_ref.pow(2).mean(-1).add(1e-6).rsqrt(), DTYPE)


def test_bad_shapes_are_refused():
    t = _leaves(8, 64, 4)
    with pytest.raises(PpalliError, match="lora_B must be"):
        lora_add_rms_norm(t["h"], t["y0"], t["xa"], t["b"][:32], 1.0, t["w"], 1e-6)
    with pytest.raises(PpalliError, match="h and y0"):
        lora_add_rms_norm(t["h"], t["y0"][:, :32], None, None, 1.0, t["w"], 1e-6)


def test_bf16_matches_fp32_within_rounding():
    t = {k: v.detach() for k, v in _leaves(37, 300, 16).items()}
    x32, n32 = lora_add_rms_norm(t["h"], t["y0"], t["xa"], t["b"], 0.5, t["w"], 1e-6)
    c = {k: v.bfloat16() for k, v in t.items()}
    x16, n16 = lora_add_rms_norm(c["h"], c["y0"], c["xa"], c["b"], 0.5, c["w"], 1e-6)
    for name, ref, got in (("x", x32, x16), ("n", n32, n16)):
        err = (got.float() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, f"{name}: {err:.2e}"  # inputs rounded to bf16 once, as in the lora_glu test
