"""4-bit dequantize on CUDA: ppalli's Triton kernel bit for bit against bitsandbytes' CUDA kernels."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

from ppalli.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference, dequantize_weight  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Llama-3-8B's MLP (up/gate and down), a square attention projection, and odd ones: blocks across rows, a
# short last block, rows shorter than a block.
SHAPES = ((4096, 14336), (14336, 4096), (4096, 4096), (129, 4100), (5, 123), (64, 32), (1, 1))


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bitwise(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    same = bits(got) == bits(want)
    diff = (got.float() - want.float()).abs()
    assert same.all(), f"{int((~same).sum())} of {got.numel()} differ; max {diff.max():.3g} mean {diff.mean():.3g}"


def quantized(shape, quant_type, double_quant, dtype, blocksize=64):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(shape, generator=g, device="cuda").to(dtype)
    return F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_equals_bitsandbytes_cuda_bitwise(shape, quant_type, double_quant, dtype):
    packed, qs = quantized(shape, quant_type, double_quant, dtype)
    want = F.dequantize_4bit(packed, qs)
    assert_bitwise(dequantize_nf4(packed, qs), want)
    assert_bitwise(dequantize_nf4_reference(packed, qs), want)  # the torch fallback, on CUDA


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_every_block_size(blocksize):
    packed, qs = quantized((1000, 4096), "nf4", True, torch.bfloat16, blocksize)
    assert_bitwise(dequantize_nf4(packed, qs), F.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_byte_and_signed_zero(quant_type, dtype):
    # Every (high, low) code pair; CUDA turns FP4 code 0b1000 into -0.0 (lut[0] * -1), so must we.
    packed = torch.arange(256, dtype=torch.uint8, device="cuda").reshape(-1, 1)
    absmax = torch.tensor([1 + 3 * 2**-8, 1 + 2**-8, 3.0, 0.37, 1e-3, 7.5, 2.0**-20, 65000.0], device="cuda")
    qs = F.QuantState(absmax=absmax, shape=torch.Size([4, 128]), code=F.get_4bit_type(quant_type, device="cuda"),
                      blocksize=64, quant_type=quant_type, dtype=dtype)
    got = dequantize_nf4(packed, qs)
    assert_bitwise(got, F.dequantize_4bit(packed, qs))
    if quant_type == "fp4":
        assert torch.signbit(got.reshape(-1)[0x88 * 2])


def test_linear4bit_module():
    layer = bnb.nn.Linear4bit(4096, 1024, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer = layer.cuda()  # quantizes
    assert_bitwise(dequantize_weight(layer), F.dequantize_4bit(layer.weight, layer.weight.quant_state))


def test_packed_storage_in_bf16():
    w = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
    assert_bitwise(dequantize_nf4(packed, qs), F.dequantize_4bit(packed, qs))
