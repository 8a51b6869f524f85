"""nf4_linear: decode rows through a bitsandbytes 4-bit weight (Triton, interpreted on the CPU) against the
weight dequantized bit for bit (kernels/nf4.py) and one F.linear, with bias and a LoRA branch; the prompt path
(more rows than a launch takes) and the weights it refuses. On a CUDA machine the same checks run on the GPU."""

import pytest
import torch
import torch.nn.functional as F

bnb = pytest.importorskip("bitsandbytes")

from ppalli.errors import ModelError  # noqa: E402
from ppalli.kernels.nf4 import dequantize_nf4_reference  # noqa: E402
from ppalli.kernels.nf4_linear import MAX_ROWS, nf4_linear, nf4_linear_fwd, nf4_linear_problem  # noqa: E402

# Triton launches only on CUDA tensors there (no interpreter: tests/conftest.py sets it only without CUDA).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weight(n, k, dtype, double_quant=True, quant_type="nf4", blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(DEVICE)
    return bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant)


def _inputs(m, k, n, r, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    xa = torch.randn(m, r, generator=g).to(dtype)
    b = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return tuple(t.to(DEVICE) for t in (x, xa, b, bias))


def _want(x, packed, qs, bias=None, xa=None, b=None):
    w = dequantize_nf4_reference(packed, qs, torch.float32)  # the 4-bit weight, exact in fp32
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y if xa is None else y + xa.float() @ b.float().t()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_rows_equal_the_dequantized_product_fp32(m, quant_type, double_quant):
    packed, qs = _weight(80, 384, torch.float32, double_quant, quant_type)  # 80 outputs: a partial column tile
    x, xa, b, bias = _inputs(m, 384, 80, 16, torch.float32)
    torch.testing.assert_close(nf4_linear_fwd(x, packed, qs), _want(x, packed, qs), rtol=1e-5, atol=1e-5)
    got = nf4_linear_fwd(x, packed, qs, bias, xa, b)
    torch.testing.assert_close(got, _want(x, packed, qs, bias, xa, b), rtol=1e-5, atol=1e-5)


def test_bf16_weights_round_as_bitsandbytes_dequantizes_them():
    # In bf16 each weight is rounded once to bf16 (as dequantize_4bit writes it) before the product: the result
    # is the bf16 weight's fp32 product within the output's rounding, not the fp32 weight's.
    packed, qs = _weight(48, 256, torch.bfloat16, blocksize=128)
    x, xa, b, _ = _inputs(3, 256, 48, 8, torch.bfloat16)
    w16 = dequantize_nf4_reference(packed, qs, torch.bfloat16)
    want = x.float() @ w16.float().t() + xa.float() @ b.float().t()
    got = nf4_linear_fwd(x, packed, qs, None, xa, b)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=8e-3)


def test_out_writes_a_column_slice_of_a_wider_buffer():
    packed, qs = _weight(32, 128, torch.float32)
    x, *_ = _inputs(2, 128, 32, 4, torch.float32)
    buf = torch.full((2, 96), 7.0, device=DEVICE)
    nf4_linear_fwd(x, packed, qs, out=buf[:, 32:64])
    torch.testing.assert_close(buf[:, 32:64], _want(x, packed, qs), rtol=1e-5, atol=1e-5)
    assert (buf[:, :32] == 7).all() and (buf[:, 64:] == 7).all()


def test_more_rows_than_a_launch_dequantize_once():
    packed, qs = _weight(32, 128, torch.float32)
    x, xa, b, bias = _inputs(MAX_ROWS + 3, 128, 32, 4, torch.float32)
    torch.testing.assert_close(nf4_linear(x, packed, qs, bias, xa, b), _want(x, packed, qs, bias, xa, b),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="at most"):
        nf4_linear_fwd(x, packed, qs)


def test_weights_it_cannot_read_are_named():
    packed, qs = _weight(8, 96, torch.float32)  # 96 features: the second block crosses into the next row
    assert "whole number" in nf4_linear_problem(packed, qs)
    with pytest.raises(ModelError, match="whole number"):
        nf4_linear_fwd(torch.randn(1, 96, device=DEVICE), packed, qs)
