"""A few rows through a bitsandbytes 4-bit Linear without a 16-bit weight: y = x W^T (+ bias) (+ xa B^T).

Decoding reads every weight once per token, so after QLoRA a step is bound by reading the 4-bit bytes.
bitsandbytes' path through HF's layers and PEFT's branch took 12.4 ms a Llama-3.1-8B step from a CUDA graph
on an H200 (80.9 tokens/s, results/2026-12-04-h200-s21-generate-nf4-*.json) for ~3.7 GB of 4-bit weights,
~1 ms at the card's bandwidth: most of the step was launches. This kernel dequantizes each (BLOCK_N, UNROLL
blocks) tile of codes in registers (the same fp32 products and one rounding to x's dtype as kernels/nf4.py, so
each weight equals bnb's dequantize_4bit bit for bit), multiplies it into fp32 sums on the CUDA cores, and adds
the LoRA branch's rank-r product in the same program, so an unmerged adapter costs no launch of its own:

    y[m, n] = sum_k x[m, k] w[n, k] + bias[n] + sum_j xa[m, j] b[n, j]      xa = s x A^T, made by the caller

Weights (out, in) are flat row-major in blocks of `blocksize` codes (bnb's layout, see kernels/nf4.py); here
in % blocksize == 0, so no block spans two rows and a tile's scales are one (BLOCK_N, UNROLL) load. The
double-quantized absmax is decoded in the tile (code2[q] * absmax2 + offset, two fp32 roundings, launched
without FMA fusion as bnb runs it). For decode rows (M <= MAX_ROWS); more rows dequantize once and run one GEMM
(`nf4_linear`). Through the decode layers, H200 (results/2026-12-04-h200-s24-generate-nf4-*): Llama-3.2-1B
186.7 -> 251.6 tokens/s from the graph, 16 rows 1,882 -> 3,772; Llama-3.1-8B one row 80.9 -> 78.7, since on its
large matrices this kernel (46-48 us a row) is behind bnb's gemv (33-38 us).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ppalli.errors import ModelError
from ppalli.kernels._utils import cdiv, interpreting, jit, next_power_of_2, tl
from ppalli.kernels.nf4 import _bf16_rtne, _read_state, code_table, dequantize_nf4

MAX_ROWS = 4  # rows one launch takes (each row its own pass of CUDA-core products over the dequantized tile);
# more rows (16 batched answers, a prompt) dequantize the weight once and run one GEMM


@jit(rows=("M",))
def _nf4_linear_fwd_kernel(
    Y, X, PACKED, CODE, ABSMAX, CODE2, ABSMAX2, OFFSET, BIAS, XA, B,
    M, N, K, R, stride_y, stride_x, stride_xa, stride_b,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, ROUND_BY_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Products on the CUDA cores, row by row: a first version fed tl.dot from the (BN, NB, HB) tiles reshaped
    # to 2-D and ran at ~40 GB/s (H200, 1B gate 218 us against bnb's gemv 15.9); this form 430-650 GB/s
    # (results/2026-12-04-h200-s24-nf4-gemv-variants.txt).
    HB: tl.constexpr = BLOCKSIZE // 2  # packed bytes a block
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output features
    n_ok = n < N
    u = tl.arange(0, UNROLL)
    j = tl.arange(0, HB)
    rows = tl.arange(0, BLOCK_M)
    row_blocks = K // BLOCKSIZE
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, row_blocks, UNROLL):
        kb = b0 + u  # (U,) blocks along the row
        blk = n.to(tl.int64)[:, None] * row_blocks + kb[None, :]  # (BN, U) block indices
        ok = n_ok[:, None] & (kb[None, :] < row_blocks)
        if NESTED:
            qa = tl.load(ABSMAX + blk, mask=ok, other=0).to(tl.int32)
            scale = tl.load(CODE2 + qa) * tl.load(ABSMAX2 + blk // NESTED_BLOCKSIZE, mask=ok, other=0.0)
            scale = scale + tl.load(OFFSET)  # rounded apart from the product: launched with enable_fp_fusion=False
        else:
            scale = tl.load(ABSMAX + blk, mask=ok, other=0.0)
        q = tl.load(PACKED + blk[:, :, None] * HB + j[None, None, :], mask=ok[:, :, None], other=0).to(tl.int32)
        hi = tl.load(CODE + (q >> 4)) * scale[:, :, None]  # (BN, U, HB): elements 2j of each block
        lo = tl.load(CODE + (q & 15)) * scale[:, :, None]  # elements 2j + 1
        if ROUND_BY_BITS:  # the interpreter's bf16 cast truncates; bnb's weights are rounded to nearest even
            hi, lo = _bf16_rtne(hi), _bf16_rtne(lo)
        hi = hi.to(X.dtype.element_ty).to(tl.float32)  # the weight as dequantize_4bit writes it
        lo = lo.to(X.dtype.element_ty).to(tl.float32)
        kk = kb[:, None] * BLOCKSIZE + 2 * j[None, :]  # (U, HB) even columns
        k_ok = kb[:, None] < row_blocks
        for m in tl.static_range(BLOCK_M):
            if m < M:
                xe = tl.load(X + m * stride_x + kk, mask=k_ok, other=0.0).to(tl.float32)
                xo = tl.load(X + m * stride_x + kk + 1, mask=k_ok, other=0.0).to(tl.float32)
                part = tl.sum(tl.sum(hi * xe[None, :, :] + lo * xo[None, :, :], axis=2), axis=1)  # (BN,)
                acc = tl.where(rows[:, None] == m, acc + part[None, :], acc)
    if HAS_LORA:  # the adapter's branch: xa (M, R) already carries the scaling
        r = tl.arange(0, BLOCK_R)
        b = tl.load(B + n[:, None] * stride_b + r[None, :], mask=n_ok[:, None] & (r[None, :] < R), other=0.0)
        for m in tl.static_range(BLOCK_M):
            if m < M:
                xa = tl.load(XA + m * stride_xa + r, mask=r < R, other=0.0).to(tl.float32)
                part = tl.sum(b.to(tl.float32) * xa[None, :], axis=1)
                acc = tl.where(rows[:, None] == m, acc + part[None, :], acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + n[None, :], acc.to(Y.dtype.element_ty),
             mask=(rows[:, None] < M) & n_ok[None, :])


def nf4_linear_problem(packed: torch.Tensor, quant_state) -> str | None:
    """Why nf4_linear_fwd cannot read this weight, or None."""
    shape = getattr(quant_state, "shape", None)
    if shape is None or len(shape) != 2:
        return "no 2-D quant_state shape"
    if getattr(quant_state, "packing_format_for_cpu", False):
        return "repacked by bitsandbytes for CPU inference"
    if shape[1] % quant_state.blocksize or quant_state.blocksize < 32:
        return f"in_features {shape[1]} is not a whole number of {quant_state.blocksize}-value blocks"
    return None


def _blocks(n: int, k: int, blocksize: int) -> tuple[int, int]:
    """(BLOCK_N, UNROLL): 16 output features a program, 8 blocks a step (4 on long rows); the fastest of a sweep
    of 16-64 features, 2-8 blocks and 1-8 K splits on an H200 for one row (1B gate 19.1 us, 8B q/gate/down
    within 3% of the best, *-nf4-gemv-variants.txt); K splits left out (their atomic sums vary run to run)."""
    return 16, 8 if k // blocksize <= 64 else 4


def nf4_linear_fwd(x: torch.Tensor, packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None,
                   xa: torch.Tensor | None = None, b: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x (M, in), M <= MAX_ROWS, through the 4-bit weight (`packed` bytes + bnb QuantState) -> (M, out) in
    x's dtype; xa (M, r) and b (out, r) add the LoRA branch, `out` (M, out) may be a column slice of a wider
    buffer (a projection group's output). blocks: (BLOCK_N, UNROLL, num_warps), for sweeps."""
    st = _read_state(packed, quant_state, x.dtype)
    if (why := nf4_linear_problem(packed, quant_state)) is not None:
        raise ModelError(f"nf4_linear_fwd: {why}")
    m, k = x.shape
    n = st.shape[0]
    if m > MAX_ROWS or st.shape[1] != k:
        raise ModelError(f"nf4_linear_fwd takes at most {MAX_ROWS} rows of {st.shape[1]} features, "
                         f"got {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = out if out is not None else x.new_empty(m, n)
    nested = st.nested_code is not None
    dummy = st.absmax
    block_n, unroll, warps = blocks or (*_blocks(n, k, st.blocksize), 4)
    r = 0 if xa is None else xa.shape[1]
    _nf4_linear_fwd_kernel[(cdiv(n, block_n),)](
        y, x, st.packed, code_table(st.quant_type, x.device), st.absmax,
        st.nested_code if nested else dummy, st.nested_absmax if nested else dummy, st.offset if nested else dummy,
        bias if bias is not None else x, xa if xa is not None else x, b if b is not None else x,
        m, n, k, r, y.stride(0), x.stride(0), xa.stride(0) if xa is not None else 0,
        b.stride(0) if b is not None else 0,
        BLOCKSIZE=st.blocksize, NESTED_BLOCKSIZE=st.nested_blocksize, NESTED=nested, HAS_BIAS=bias is not None,
        HAS_LORA=xa is not None, ROUND_BY_BITS=x.dtype == torch.bfloat16 and interpreting(),
        BLOCK_M=next_power_of_2(m), BLOCK_N=block_n, UNROLL=unroll, BLOCK_R=max(16, next_power_of_2(r)),
        num_warps=warps, enable_fp_fusion=False,
    )
    return y


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None,
               xa: torch.Tensor | None = None, b: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """nf4_linear_fwd for a few rows; more rows (a prompt) dequantize the weight (kernels/nf4.py) and run one
    GEMM, the LoRA branch added by addmm_."""
    if x.shape[0] <= MAX_ROWS:
        return nf4_linear_fwd(x, packed, quant_state, bias, xa, b, out)
    y = F.linear(x, dequantize_nf4(packed, quant_state, x.dtype), bias)
    if xa is not None:
        y.addmm_(xa, b.t())
    if out is None:
        return y
    out.copy_(y)
    return out
