"""4-bit dequantize: ppalli's Triton kernel (interpreted on the CPU) against bitsandbytes and a numpy reference."""

import math

import numpy as np
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

from ppalli.errors import ModelError  # noqa: E402
from ppalli.kernels import nf4  # noqa: E402
from ppalli.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference, dequantize_weight  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Shapes whose rows are whole 64-blocks, or odd (bnb 0.50's AVX-512 CPU dequantize is exact on these; on
# even rows that end inside a block it mis-scales, so those are held to the numpy reference only).
BNB_CPU_EXACT = ((48, 128), (5, 64), (3, 33))
ODD = ((5, 123), (64, 32), (1, 1))  # odd count, blocks across rows, a short last block; short rows; one


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    # bnb's torch-path dequantize is torch.compile'd (backends/default/ops.py); compiling it costs seconds
    # per test session and changes no value, so it runs eagerly here.
    with torch.compiler.set_stance("force_eager"):
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 vs +0.0 and every last ulp count."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = (got.float() - want.float()).abs()
    assert torch.equal(bits(got), bits(want)), (
        f"{int((bits(got) != bits(want)).sum())} of {got.numel()} differ; max {diff.max():.3g} mean {diff.mean():.3g}")


def assert_bitwise_to_bnb_cpu(got: torch.Tensor, want: torch.Tensor) -> None:
    """assert_bitwise against bitsandbytes' CPU dequantize, whose two paths disagree on FP4's signed zero
    (code 0b1000): the AVX-512 one reads +0.0 from bnb's table, as ppalli's CPU path does; the other one
    writes -0.0 (bnb 0.50.2 on an AMD EPYC without AVX-512, 2026-12-02: 20 of 6144 elements differ, all
    zeros). The sign of a zero changes no product, so both zeros count as one; every other bit must match.
    ppalli's CUDA path is held to bnb's CUDA kernel bit for bit, signed zero included (tests/gpu)."""
    def unsigned_zeros(t):
        return torch.where(t == 0, torch.zeros_like(t), t)

    assert_bitwise(unsigned_zeros(got), unsigned_zeros(want))


def numpy_reference(packed: torch.Tensor, qs, out_dtype=None) -> torch.Tensor:
    """Element by element from bnb's own table and its public nested-absmax dequantize, fp32 numpy math."""
    n = math.prod(qs.shape)
    b = packed.contiguous().view(torch.uint8).reshape(-1).numpy().astype(np.int64)
    codes = np.empty(2 * b.size, np.int64)
    codes[0::2], codes[1::2] = b >> 4, b & 15  # element 2j in the high nibble of byte j
    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    table = F.get_4bit_type(qs.quant_type, device="cpu").numpy()
    vals = table[codes[:n]] * absmax.numpy()[np.arange(n) // qs.blocksize]  # float32 * float32, rounded once
    return torch.from_numpy(vals).to(out_dtype or qs.dtype).reshape(qs.shape)


def quantized(shape, quant_type, double_quant, dtype, blocksize=64, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 2).to(dtype)
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant, **kw)
    return w, packed, qs


def largest_half_gap(quant_type: str) -> float:
    codes = sorted(F.get_4bit_type(quant_type, device="cpu").tolist())
    return max(b - a for a, b in zip(codes, codes[1:])) / 2


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_within_the_code_grid_bound(quant_type, double_quant):
    # bnb scales each block by its absmax a into [-1, 1] and stores the nearest code, so
    #   |w - code * a| = a * |w / a - code| <= a * g,   g = the largest half-gap between adjacent codes:
    # NF4 g = (-0.6961928 - -1) / 2 = 0.1519 (its widest gap is the lowest); FP4 g = (1 - 2/3) / 2 = 0.1667.
    # Double quantization dequantizes with a' instead of a: |w - code * a'| <= a * g + |a - a'| (|code| <= 1).
    # The 1e-6 relative slack covers the fp32 rounding of w * (1 / a) next to a midpoint.
    g = {"nf4": 0.15190, "fp4": 0.16667}[quant_type]
    assert largest_half_gap(quant_type) == pytest.approx(g, abs=1e-5)
    w, packed, qs = quantized((37, 192), quant_type, double_quant, torch.float32)
    got = dequantize_nf4(packed, qs).reshape(-1, 64)
    a = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    a_used = (F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if double_quant else qs.absmax)[:, None]
    bound = a * g * (1 + 1e-6) + (a - a_used).abs()
    err = (w.reshape(-1, 64) - got).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"
    assert err.max() > 0.5 * (a * g).max()  # the bound is tight, not vacuous: some weight lands near a midpoint


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", BNB_CPU_EXACT + ODD, ids=str)
def test_kernel_and_torch_path_equal_the_reference_bitwise(shape, quant_type, double_quant, dtype):
    _, packed, qs = quantized(shape, quant_type, double_quant, dtype)
    want = numpy_reference(packed, qs)
    assert_bitwise(dequantize_nf4(packed, qs), want)
    assert_bitwise(dequantize_nf4_reference(packed, qs), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", BNB_CPU_EXACT, ids=str)
def test_kernel_equals_bitsandbytes_cpu_bitwise(shape, quant_type, double_quant, dtype):
    _, packed, qs = quantized(shape, quant_type, double_quant, dtype)
    assert_bitwise_to_bnb_cpu(dequantize_nf4(packed, qs), F.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_out_dtype_overrides_the_stored_dtype(out_dtype):
    _, packed, qs = quantized((5, 64), "nf4", True, torch.float16)
    assert_bitwise(dequantize_nf4(packed, qs, out_dtype), numpy_reference(packed, qs, out_dtype))


def _state(absmax, shape, quant_type, dtype=torch.bfloat16):
    return F.QuantState(absmax=absmax, shape=torch.Size(shape), code=F.get_4bit_type(quant_type, device="cpu"),
                        blocksize=64, quant_type=quant_type, dtype=dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_byte(quant_type):
    # All 256 bytes = every (high, low) code pair, FP4's code 0b1000 (a signed zero) among them.
    packed = torch.arange(256, dtype=torch.uint8).reshape(-1, 1)
    qs = _state(torch.tensor([1.5, 3.0, 0.37, 1e-3, 7.5, 2.0**-20, 65000.0, 1.0]), (4, 128), quant_type)
    got = dequantize_nf4(packed, qs)
    assert_bitwise(got, numpy_reference(packed, qs))
    assert_bitwise_to_bnb_cpu(got, F.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bf16_rounding_ties_go_to_even(quant_type):
    # Code 1.0 times absmax 1 + 3 * 2**-8 (or 1 + 2**-8) lies exactly halfway between two bf16 values:
    # round-to-nearest-even goes up to 1 + 2**-6 (down to 1.0); truncation, the Triton interpreter's own
    # cast, would give 1 + 2**-7 for the first.
    one = {"nf4": 15, "fp4": 3}[quant_type]  # the code of +1.0
    packed = torch.full((64, 1), one << 4 | one, dtype=torch.uint8)
    qs = _state(torch.tensor([1 + 3 * 2**-8, 1 + 2**-8]), (1, 128), quant_type)
    got = dequantize_nf4(packed, qs)
    assert got[0, :64].eq(1 + 2**-6).all() and got[0, 64:].eq(1.0).all()
    assert_bitwise(got, F.dequantize_4bit(packed, qs))


def test_fp4_zero_sign_follows_the_backend():
    # CUDA's kernel returns lut[code & 7] * sign, so code 0b1000 is -0.0 there; bnb's CPU table has +0.0.
    cpu, cuda = nf4.table_values("fp4", cuda=False), nf4.table_values("fp4", cuda=True)
    assert torch.equal(cpu, F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(cuda, cpu) and torch.signbit(cuda[8]) and not torch.signbit(cpu[8])
    literals = np.array([0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25], np.float32)
    assert np.array_equal(cuda[:8].numpy(), literals)  # csrc/kernels.cu fp4_dequantization_lut
    assert torch.equal(nf4.table_values("nf4", cuda=True), F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("blocksize,double_quant", [(32, False), (128, True), (256, True), (4096, False)])
def test_other_block_sizes(blocksize, double_quant):
    _, packed, qs = quantized((3, 4096 + 64), "nf4", double_quant, torch.bfloat16, blocksize=blocksize)
    assert_bitwise(dequantize_nf4(packed, qs), numpy_reference(packed, qs))


def test_nested_absmax_spanning_several_nested_blocks():
    # 600 blocks of 64 -> 3 nested blocks of 256, the last one short.
    _, packed, qs = quantized((300, 128), "nf4", True, torch.float16)
    assert qs.state2.absmax.numel() == 3
    assert_bitwise(dequantize_nf4(packed, qs), numpy_reference(packed, qs))


def test_packed_storage_in_another_dtype():
    # FSDP-QLoRA stores the packed bytes as bf16 (quant_storage); the bytes are the same.
    _, packed, qs = quantized((8, 128), "nf4", True, torch.bfloat16, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert_bitwise(dequantize_nf4(packed, qs), numpy_reference(packed, qs))


def _linear4bit(quant_type="nf4", double_quant=True, out_features=48, in_features=128):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type=quant_type)
    return layer.to("cpu")  # Params4bit quantizes on its first move to a device


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_weight_of_a_linear4bit(quant_type):
    layer = _linear4bit(quant_type)
    w = dequantize_weight(layer)
    assert w.shape == (48, 128) and w.dtype == torch.float32
    assert_bitwise_to_bnb_cpu(w, F.dequantize_4bit(layer.weight, layer.weight.quant_state))


def test_dequantize_weight_through_a_peft_layer():
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential()
    model.add_module("proj", _linear4bit())
    want = dequantize_weight(model.proj)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["proj"]))
    assert_bitwise(dequantize_weight(model.base_model.model.proj), want)


def test_cpu_without_interpreter_takes_the_torch_path(monkeypatch):
    _, packed, qs = quantized((5, 123), "fp4", True, torch.bfloat16)
    monkeypatch.setattr(nf4, "interpreting", lambda: False)
    monkeypatch.setattr(nf4, "_launch", lambda *a, **k: pytest.fail("a Triton launch on a CPU tensor"))
    assert_bitwise(dequantize_nf4(packed, qs), numpy_reference(packed, qs))


def test_errors_name_the_problem_and_the_fix():
    _, packed, qs = quantized((4, 64), "nf4", False, torch.float32)
    with pytest.raises(ModelError, match="holds 256 bytes but .* needs 128"):
        dequantize_nf4(torch.cat([packed, packed]), qs)
    with pytest.raises(ModelError, match="absmax has 3 scales"):
        dequantize_nf4(packed, F.QuantState(qs.absmax[:3], qs.shape, qs.code, 64, "nf4", torch.float32))
    with pytest.raises(ModelError, match="not one of"):
        dequantize_nf4(packed, F.QuantState(qs.absmax, qs.shape, qs.code, 64, "int4", torch.float32))
    with pytest.raises(ModelError, match="not a power of two"):
        dequantize_nf4(packed, F.QuantState(qs.absmax, qs.shape, qs.code, 48, "nf4", torch.float32))
    with pytest.raises(ModelError, match="bf16, fp16 or fp32"):
        dequantize_nf4(packed, qs, torch.int8)
    with pytest.raises(ModelError, match="move the Linear4bit to its device"):
        dequantize_nf4(packed, None)


def test_unquantized_and_repacked_layers_are_refused():
    fresh = bnb.nn.Linear4bit(64, 64, quant_type="nf4")  # never moved to a device: not quantized yet
    with pytest.raises(ModelError, match="no 4-bit weight"):
        dequantize_weight(fresh)
    with pytest.raises(ModelError, match="no 4-bit weight"):
        dequantize_weight(torch.nn.Linear(64, 64))
    layer = _linear4bit()
    layer.weight.quant_state.packing_format_for_cpu = True  # what bnb's AVX512-BF16 inference path sets
    with pytest.raises(ModelError, match="repacked by bitsandbytes for CPU inference.*keep_standard_layout"):
        dequantize_weight(layer)
