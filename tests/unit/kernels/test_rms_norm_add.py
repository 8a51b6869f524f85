"""The post-norm + residual add (+ next norm) kernel against the ops one by one: forward and both gradients,
with and without the next norm, with either gradient missing (fp32 on the CPU under the Triton interpreter;
bf16 too on a GPU)."""

import pytest
import torch
from reference import assert_close, rms_norm_ref

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels.rms_norm_add import rms_norm_add  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + [torch.bfloat16] * torch.cuda.is_available()


def _ref(r, y, w, eps, offset, next_norm):
    x = r + rms_norm_ref(y, w, eps, offset).to(y.dtype)
    return (x, rms_norm_ref(x, next_norm[0], next_norm[1], offset).to(y.dtype)) if next_norm else x


def _run(fn, r, y, w, offset, next_norm, dx, dh):
    """Forward, then backward from dx (x's gradient) and dh (h's): -> (x, h, dr, dy)."""
    r, y = (t.detach().requires_grad_() for t in (r, y))
    out = fn(r, y, w, 1e-6, offset, next_norm)
    x, h = out if next_norm else (out, None)
    pairs = [(t, g) for t, g in ((x, dx), (h, dh)) if t is not None and g is not None]
    torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return x, h, r.grad, y.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 64), (7, 123), (2, 3, 40)], ids=["aligned", "odd", "3d"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["exaone", "gemma"])
@pytest.mark.parametrize("grads", ["both", "dx", "dh"])
@pytest.mark.parametrize("with_next", [True, False], ids=["next", "alone"])
def test_matches_ops(dtype, shape, offset, grads, with_next):
    if grads == "dh" and not with_next:
        pytest.skip("no h without the next norm")
    torch.manual_seed(0)
    r, y = (torch.randn(shape, device=DEVICE, dtype=dtype) * 2 for _ in range(2))
    w, w2 = (torch.randn(shape[-1], device=DEVICE, dtype=dtype) for _ in range(2))
    next_norm = (w2, 1e-5) if with_next else None
    dx = torch.randn(shape, device=DEVICE, dtype=dtype) if grads != "dh" else None
    dh = torch.randn(shape, device=DEVICE, dtype=dtype) if grads != "dx" and with_next else None
    got = _run(rms_norm_add, r, y, w, offset, next_norm, dx, dh)
    want = _run(_ref, r, y, w, offset, next_norm, dx, dh)
    for name, a, b in zip(("x", "h", "dr", "dy"), got, want):
        if b is None:
            assert a is None, name
        else:
            assert_close(name, a, b, dtype)


def test_one_percent_error_in_the_backward_fails():
    """The comparison above can fail: dy off by 1% from the reference is caught."""
    torch.manual_seed(0)
    r, y = (torch.randn(5, 96, device=DEVICE) for _ in range(2))
    w, w2 = torch.randn(96, device=DEVICE), torch.randn(96, device=DEVICE)
    dx, dh = torch.randn(5, 96, device=DEVICE), torch.randn(5, 96, device=DEVICE)
    got = _run(rms_norm_add, r, y, w, 1.0, (w2, 1e-6), dx, dh)
    want = _run(_ref, r, y, w, 1.0, (w2, 1e-6), dx, dh)
    with pytest.raises(AssertionError):
        assert_close("dy", got[3] * 1.01, want[3], torch.float32)


def test_saves_rows_not_copies():
    """Saved for the backward: y and x as they are (no fp32 copies, no normed y) and one fp32 rstd a row each."""
    r, y = (torch.randn(6, 80, device=DEVICE, requires_grad=True) for _ in range(2))
    w, w2 = torch.ones(80, device=DEVICE), torch.ones(80, device=DEVICE)
    x, h = rms_norm_add(r, y, w, 1e-6, 0.0, (w2, 1e-6))
    saved = h.grad_fn.saved_tensors
    sizes = sorted(t.numel() for t in saved if t is not None and t.numel() not in (80,))
    assert sizes == [6, 6, 6 * 80, 6 * 80]
    assert any(t.data_ptr() == x.data_ptr() for t in saved if t is not None)
    assert any(t.data_ptr() == y.data_ptr() for t in saved if t is not None)


def test_refuses_trained_weights_and_bad_shapes():
    r, y = torch.randn(3, 16, device=DEVICE), torch.randn(3, 16, device=DEVICE)
    with pytest.raises(PpalliError, match="one by one"):
        rms_norm_add(r, y, torch.ones(16, device=DEVICE, requires_grad=True), 1e-6)
    with pytest.raises(PpalliError, match="shape \\(16,\\)"):
        rms_norm_add(r, y, torch.ones(15, device=DEVICE), 1e-6)
    with pytest.raises(PpalliError, match="one shape"):
        rms_norm_add(r[:2], y, torch.ones(16, device=DEVICE), 1e-6)
