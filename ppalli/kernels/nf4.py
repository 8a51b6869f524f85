"""Dequantize bitsandbytes 4-bit weights (NF4 or FP4, with or without double quantization), bit for bit.

bitsandbytes' storage, read from its source (bitsandbytes/functional.py quantize_4bit / dequantize_4bit,
backends/default/ops.py, csrc/kernels.cu kDequantizeBlockwise):
- the weight (out, in) is flattened row-major and cut into blocks of `blocksize` values (64 by default);
  blocks run over the flat array, so a block may span two rows and the last one may be short;
- two 4-bit codes per byte, the even element in the high nibble: byte j holds elements 2j and 2j+1;
- value = table[code] * absmax[block] in fp32, then one rounding to the output dtype;
- double quantization (`compress_statistics`): the fp32 absmax minus its mean (`offset`) is stored as
  uint8 codes into bnb's 256-entry dynamic map with its own fp32 absmax per 256 blocks:
  absmax[b] = (dynamic_map[q[b]] * absmax2[b // 256]) + offset, a product and a sum each rounded to fp32
  (bnb runs them as two kernels, so there is no fused multiply-add: launches here pass
  enable_fp_fusion=False for the same rounding).

Bitwise equality needs the same code table as the bnb backend of the same device. CUDA's table
(kernels.cu fp4_dequantization_lut) returns `lut[code & 7] * sign`, so FP4 code 0b1000 gives -0.0; the CPU
and torch backends index a table whose entry 8 is +0.0. `code_table` follows the device.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ppalli.errors import ModelError
from ppalli.kernels._utils import cdiv, interpreting, is_triton_available, jit, tl

# NF4: the 16 quantiles of N(0, 1) scaled to [-1, 1] from the QLoRA paper (arXiv 2305.14314, appendix E);
# the same fp32 values as bnb's get_4bit_type("nf4") and the CUDA nf4_dequantization_lut.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bits, bias 2) magnitudes of codes 0b000..0b111, divided by the
# largest (12) in fp32; these equal the CUDA literals 0.005208333333f, 0.66666667f, ... bit for bit.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
QUANT_TYPES = ("nf4", "fp4")
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# 1024 packed bytes (2048 outputs) a program, 4 warps: 8 bytes in and 32 bytes out per thread, a
# bandwidth-bound elementwise shape; benchmarks/bench_nf4.py sweeps it on the H100.
BLOCK_BYTES = 1024


def table_values(quant_type: str, cuda: bool) -> torch.Tensor:
    """The 16 fp32 values that 4-bit codes stand for (CPU tensor), as bnb's CUDA (`cuda`) or CPU backend has them."""
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type != "fp4":
        raise ModelError(f"4-bit quant_type {quant_type!r} is not one of {QUANT_TYPES}")
    pos = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32) / 12.0
    neg = -pos  # -0.0 for code 8, as CUDA's lut * sign gives
    if not cuda:
        neg[0] = 0.0  # bnb's CPU and torch tables hold +0.0 there
    return torch.cat([pos, neg])


@functools.lru_cache(maxsize=16)
def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """`table_values` for the bnb backend of `device`, on `device`."""
    return table_values(quant_type, torch.device(device).type == "cuda").to(device)


class _State(NamedTuple):
    """A QuantState checked against its packed bytes; absmax is fp32, or uint8 codes when nested."""

    packed: torch.Tensor  # (ceil(n / 2),) uint8
    absmax: torch.Tensor  # (n_blocks,) fp32, or uint8 when nested
    blocksize: int
    quant_type: str
    shape: torch.Size
    dtype: torch.dtype
    nested_code: torch.Tensor | None  # (256,) fp32
    nested_absmax: torch.Tensor | None  # (ceil(n_blocks / nested_blocksize),) fp32
    nested_blocksize: int
    offset: torch.Tensor | None  # () fp32


def _check_blocksize(blocksize: int, what: str) -> None:
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ModelError(f"{what} {blocksize} is not a power of two; bitsandbytes uses 32 to 4096 (default 64)")


def _check_quant_state(qs, out_dtype: torch.dtype | None) -> torch.dtype:
    """Refuse states this dequantize cannot read; return the output dtype."""
    if qs is None or getattr(qs, "shape", None) is None:
        raise ModelError("no 4-bit quant_state with a shape: move the Linear4bit to its device (.to('cuda')) "
                         "so bitsandbytes quantizes it, or load it with a BitsAndBytesConfig")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ModelError("this 4-bit weight was repacked by bitsandbytes for CPU inference (bf16 absmax); "
                         "restore it with ppalli.models.quant.keep_standard_layout(model) first")
    if qs.quant_type not in QUANT_TYPES:
        raise ModelError(f"4-bit quant_type {qs.quant_type!r} is not one of {QUANT_TYPES}")
    _check_blocksize(qs.blocksize, "4-bit blocksize")
    dtype = out_dtype or qs.dtype
    if dtype not in OUT_DTYPES:
        raise ModelError(f"4-bit weights dequantize to bf16, fp16 or fp32, not {dtype}")
    return dtype


def _packed_bytes(packed: torch.Tensor, qs) -> torch.Tensor:
    """The packed codes as flat uint8 (bnb may store them as another dtype: quant_storage), size-checked."""
    flat = packed.contiguous().view(torch.uint8).reshape(-1)
    n = math.prod(qs.shape)
    if flat.numel() != cdiv(n, 2):
        raise ModelError(f"packed 4-bit weight holds {flat.numel()} bytes but its quant_state shape "
                         f"{tuple(qs.shape)} needs {cdiv(n, 2)}: the quant_state belongs to another weight")
    if qs.absmax.numel() != cdiv(n, qs.blocksize):
        raise ModelError(f"4-bit absmax has {qs.absmax.numel()} scales but shape {tuple(qs.shape)} in blocks of "
                         f"{qs.blocksize} needs {cdiv(n, qs.blocksize)}: the quant_state is inconsistent")
    return flat


def _read_state(packed: torch.Tensor, qs, out_dtype: torch.dtype | None) -> _State:
    dtype = _check_quant_state(qs, out_dtype)
    flat = _packed_bytes(packed, qs)
    absmax = qs.absmax.reshape(-1).contiguous()
    if not qs.nested:
        return _State(flat, absmax.float(), qs.blocksize, qs.quant_type, torch.Size(qs.shape), dtype,
                      None, None, 1, None)
    s2 = qs.state2
    _check_blocksize(s2.blocksize, "nested absmax blocksize")
    if s2.absmax.numel() != cdiv(absmax.numel(), s2.blocksize) or s2.code.numel() != 256:
        raise ModelError("the nested (double-quantized) absmax does not match its quant_state: "
                         "reload the weight with its saved quant_state")
    return _State(flat, absmax, qs.blocksize, qs.quant_type, torch.Size(qs.shape), dtype,
                  s2.code.float().contiguous(), s2.absmax.float().contiguous(), s2.blocksize,
                  qs.offset.float().reshape(()).to(absmax.device))


@jit
def _bf16_rtne(x):
    """fp32 -> bf16 rounded to nearest even by integer arithmetic. Compiled Triton's cast already does this
    (cvt.rn.bf16.f32, as CUDA's __float2bfloat16); the interpreter's cast truncates (triton 3.9
    runtime/interpreter.py cast_impl passes no rounding mode), so interpreted launches round here."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@jit
def _nf4_dequant_kernel(
    OUT, PACKED, CODE, ABSMAX, CODE2, ABSMAX2, OFFSET,  # OUT (n,); PACKED (n_bytes,) uint8; CODE (16,) fp32
    n_out, n_bytes,
    HALF: tl.constexpr, ROWS: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    ROUND_BF16_BY_BITS: tl.constexpr,
):
    # One tile row is one quantization block: HALF = blocksize / 2 packed bytes sharing one absmax.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) block indices
    byte = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF)
    q = tl.load(PACKED + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    row_ok = rows * HALF < n_bytes
    if NESTED:
        qa = tl.load(ABSMAX + rows, mask=row_ok, other=0).to(tl.int32)
        scale = tl.load(CODE2 + qa) * tl.load(ABSMAX2 + rows // NESTED_BLOCKSIZE, mask=row_ok, other=0.0)
        scale = scale + tl.load(OFFSET)  # a separate fp32 rounding: launched with enable_fp_fusion=False
    else:
        scale = tl.load(ABSMAX + rows, mask=row_ok, other=0.0)
    hi = tl.load(CODE + (q >> 4)) * scale[:, None]  # even elements
    lo = tl.load(CODE + (q & 15)) * scale[:, None]  # odd elements
    vals = tl.interleave(hi, lo)  # (ROWS, 2 * HALF): element 2j from the high nibble of byte j
    if ROUND_BF16_BY_BITS:
        vals = _bf16_rtne(vals)
    idx = rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    tl.store(OUT + idx, vals.to(OUT.dtype.element_ty), mask=idx < n_out)


def _triton_runs_on(t: torch.Tensor) -> bool:
    return is_triton_available() and (t.is_cuda or (t.device.type == "cpu" and interpreting()))


def _launch(st: _State, block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    n = math.prod(st.shape)
    out = torch.empty(n, dtype=st.dtype, device=st.packed.device)
    if n == 0:
        return out.view(st.shape)
    half = st.blocksize // 2
    rows = max(1, block_bytes // half)
    grid = (cdiv(cdiv(n, st.blocksize), rows),)
    nested = st.nested_code is not None
    dummy = st.absmax  # pointer slots the non-nested kernel never reads
    _nf4_dequant_kernel[grid](
        out, st.packed, code_table(st.quant_type, st.packed.device), st.absmax,
        st.nested_code if nested else dummy, st.nested_absmax if nested else dummy,
        st.offset if nested else dummy, n, st.packed.numel(),
        HALF=half, ROWS=rows, NESTED_BLOCKSIZE=st.nested_blocksize, NESTED=nested,
        ROUND_BF16_BY_BITS=st.dtype == torch.bfloat16 and not st.packed.is_cuda,
        num_warps=4, enable_fp_fusion=False,
    )
    return out.view(st.shape)


def dequantize_nf4(packed: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """bnb 4-bit `packed` bytes + its QuantState -> the (out_features, in_features) weight, equal bit for bit
    to bitsandbytes.functional.dequantize_4bit on the same device. NF4 and FP4 alike; `out_dtype` defaults to
    the dtype the weight had before quantization. Triton on CUDA (and on CPU under TRITON_INTERPRET=1);
    elsewhere the pure-torch `dequantize_nf4_reference`."""
    st = _read_state(packed, quant_state, out_dtype)
    if not _triton_runs_on(st.packed):
        return _dequantize_torch(st)
    return _launch(st)


def _absmax_torch(st: _State) -> torch.Tensor:
    if st.nested_code is None:
        return st.absmax
    scale2 = st.nested_absmax.repeat_interleave(st.nested_blocksize)[: st.absmax.numel()]
    return st.nested_code[st.absmax.long()] * scale2 + st.offset  # two ops, two fp32 roundings


def _dequantize_torch(st: _State) -> torch.Tensor:
    n = math.prod(st.shape)
    blocks = cdiv(n, st.blocksize)
    q = st.packed.long()
    codes = torch.stack((q >> 4, q & 15), dim=1).reshape(-1)  # (2 * n_bytes,) even element first
    codes = torch.nn.functional.pad(codes, (0, blocks * st.blocksize - codes.numel()))
    vals = code_table(st.quant_type, q.device)[codes].view(blocks, st.blocksize) * _absmax_torch(st)[:, None]
    return vals.reshape(-1)[:n].to(st.dtype).view(st.shape)


def dequantize_nf4_reference(packed: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The pure-torch dequantize (any device, no triton): the kernel's reference and its fallback."""
    return _dequantize_torch(_read_state(packed, quant_state, out_dtype))


def dequantize_weight(module: torch.nn.Module, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense (out_features, in_features) weight of a bitsandbytes Linear4bit (or a PEFT layer around one)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    weight = getattr(base, "weight", None)
    qs = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
    if weight is None or qs is None:
        raise ModelError(f"{type(base).__name__} has no 4-bit weight (no quant_state): dequantize_weight takes "
                         "a bitsandbytes Linear4bit that has been moved to its device")
    return dequantize_nf4(weight.data, qs, out_dtype)
