"""Fused RMSNorm against the PyTorch reference: forward, dx and dW on aligned and odd shapes (fp32, CPU
under the Triton interpreter when there is no CUDA)."""

import pytest
import torch
from reference import assert_close, rms_norm_ref

pytest.importorskip("triton")
from ppalli.kernels.rms_norm import rms_norm, rms_norm_bwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32


def _run(fn, x, weight, dy, eps, offset):
    """Forward and backward of fn on fresh leaves sharing the data -> (y, dx, dW or None)."""
    x = x.detach().requires_grad_()  # detach keeps the strides (clone would compact a row slice)
    weight = weight.detach().requires_grad_(weight.requires_grad)
    y = fn(x, weight, eps, offset)
    y.backward(dy)
    return y, x.grad, weight.grad


@pytest.mark.parametrize("shape", [(4, 64), (5, 123), (2, 3, 37)], ids=["aligned", "odd", "3d"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("train_weight", [True, False], ids=["dw", "frozen"])
def test_matches_reference(shape, offset, train_weight):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE) * 3
    weight = torch.randn(shape[-1], device=DEVICE, dtype=DTYPE).requires_grad_(train_weight)
    dy = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    y, dx, dw = _run(rms_norm, x, weight, dy, 1e-6, offset)
    y_ref, dx_ref, dw_ref = _run(rms_norm_ref, x, weight, dy, 1e-6, offset)
    assert_close("y", y, y_ref, DTYPE)
    assert_close("dx", dx, dx_ref, DTYPE)
    if train_weight:
        assert_close("dW", dw, dw_ref, DTYPE)
    else:
        assert dw is None


@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_non_contiguous_input(layout):
    torch.manual_seed(0)
    if layout == "row_slice":  # (6, 33) rows 40 apart: the kernel reads them in place
        x = torch.randn(6, 40, device=DEVICE, dtype=DTYPE)[:, :33]
    else:  # (6, 33) with stride 6 along the row: the launcher copies
        x = torch.randn(33, 6, device=DEVICE, dtype=DTYPE).t()
    weight = torch.randn(33, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(6, 33, device=DEVICE, dtype=DTYPE)
    y, dx, dw = _run(rms_norm, x, weight, dy, 1e-5, 0.0)
    y_ref, dx_ref, dw_ref = _run(rms_norm_ref, x, weight, dy, 1e-5, 0.0)
    for name, got, want in (("y", y, y_ref), ("dx", dx, dx_ref), ("dW", dw, dw_ref)):
        assert_close(name, got, want, DTYPE)


def test_saves_input_without_copy():
    """The backward keeps x itself (no fp32 copy, no y) and one rstd per row."""
    x = torch.randn(5, 123, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = torch.ones(123, device=DEVICE, dtype=DTYPE)
    y = rms_norm(x, weight, 1e-6)  # held: torch 2.11 frees saved tensors with the output (GPU run, 2026-11-25)
    saved = y.grad_fn.saved_tensors
    assert saved[0].data_ptr() == x.data_ptr()
    assert saved[2].shape == (5,) and saved[2].dtype == torch.float32


def test_frozen_weight_skips_weight_gradient():
    x = torch.randn(5, 123, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(123, device=DEVICE, dtype=DTYPE)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
    _, dw = rms_norm_bwd(torch.randn_like(x), x, weight, rstd, compute_dw=False)
    assert dw is None


def test_residual_view_adds_the_residual_gradient_in_the_norm_backward():
    """rms_norm_residual returns (a view of x, RMSNorm(x)); x's gradient is the residual path's plus the norm's."""
    from ppalli.kernels.rms_norm import rms_norm_residual

    x = torch.randn(7, 96, device=DEVICE, dtype=DTYPE, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    weight = torch.randn(96, device=DEVICE, dtype=DTYPE)
    res, y = rms_norm_residual(x, weight, 1e-6, 1.0)
    assert res.data_ptr() == x.data_ptr()
    y_ref = rms_norm_ref(x_ref, weight, 1e-6, 1.0)
    assert_close("y", y, y_ref, DTYPE)
    g_res, g_y = torch.randn_like(res), torch.randn_like(y)
    (res * g_res + y * g_y).sum().backward()
    (x_ref * g_res + y_ref * g_y).sum().backward()
    assert_close("dx", x.grad, x_ref.grad, DTYPE)
    x.grad = None
    rms_norm_residual(x, weight, 1e-6)[1].sum().backward()  # the view unused: the norm's gradient alone
    x_ref.grad = None
    rms_norm_ref(x_ref, weight, 1e-6).sum().backward()
    assert_close("dx, no residual gradient", x.grad, x_ref.grad, DTYPE)
