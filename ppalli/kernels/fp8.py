"""FP8 (e4m3) GEMMs for the frozen base weights: per-row scaled operands, bf16 products (plan.fp8).

A LoRA step spends most of its time in GEMMs with the frozen base weights: the forward y = x W^T and the input
gradient dx = dy W (no weight gradient). Hopper's tensor cores run e4m3 at twice bf16's rate; cuBLAS through
`torch._scaled_mm` took 0.451 against 0.759 ms for Llama-3.2-1B's gate projection at N = 16384 on the H200
(results/2026-12-03-h200-gemm-fp8.txt). Each operand is quantized with one fp32 scale per row of the
product's reduction (row-wise scaling, the recipe torchao calls "rowwise"):

    x (N, K)  -> xq (N, K) e4m3, sx (N, 1):   x[n, k] ~ xq[n, k] sx[n],  sx[n] = max_k |x[n, k]| / 448
    W (O, K)  -> wq (O, K) e4m3, sw (1, O)    (forward: scales per output channel)
    W^T (K, O) -> wtq (K, O) e4m3, swt (1, K) (input gradient: scales per input channel)
    y = (xq wq^T) * sx * sw, accumulated in fp32 by cuBLAS and rounded once to bf16.

cuBLAS takes fp8 operands only as A row-major and B column-major, so the input gradient needs W's transpose
laid out in memory: `Fp8Weights` keeps both copies (together as many bytes as the bf16 weight), made on first
use and made again when the weight changes (its data pointer or version). Activations and gradients are
quantized on the fly by `fp8_rows`, one pass over them.

e4m3 keeps 3 mantissa bits: each product's relative error is ~20x bf16's (3.7e-2 against 1.7e-3 on random data at the 1B
shapes, against the fp32 product). The adapters, their GEMMs, attention, norms and the loss stay in bf16/fp32.
Off by default (`plan.fp8`): losses then no longer match the reference path step for step.
"""

from __future__ import annotations

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import (
    MAX_FUSED_SIZE,
    cdiv,
    interpreting,
    is_triton_available,
    jit,
    next_power_of_2,
    num_warps_for,
    tl,
)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3fn value
_TINY = 1e-12  # a zero row gets this absmax: its scale stays finite, its values quantize to 0
# GEMMs over fewer rows (tokens) than this stay bf16 under plan.fp8: there the quantize launch costs what the
# e4m3 GEMM saves. H200, 2026-12-03 (results/*-s16-fp8-rows.txt, 1B shapes, bf16 against fp8 with its
# activation quantized): at 2048 rows q 0.0281 -> 0.0272 ms, gate 0.0984 -> 0.0678, down 0.0916 -> 0.0708; at
# 1024 q 0.0170 -> 0.0185; at 512 gate 0.0288 -> 0.0563. Short launch-bound steps lose more: 50 steps of
# ko_chatbot_qa (~475 tokens an iteration) took 0.133 s an iteration with every GEMM in fp8 against 0.116 bf16.
FP8_MIN_ROWS = 2048
FP8_ATTR = "ppalli_fp8"  # the base layer's instance attribute holding its Fp8Weights (set by the fast path)


@jit
def _round_e4m3(v):
    # v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, in fp32 arithmetic: adding and
    # subtracting c = 1.5 * 2^(e + 20), e = v's exponent (at least e4m3's smallest normal exponent, -6),
    # rounds v at 2^(e - 3), e4m3's step in v's binade, by fp32's own round-to-nearest-even. The cast after
    # is then exact. Triton's CPU interpreter casts to fp8 without carrying a rounded-up mantissa into the
    # exponent (124.75 -> 64 rather than 128, triton 3.9), so the kernel does not leave the rounding to it.
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    c = ((e + 20 + 127) << 23 | (1 << 22)).to(tl.float32, bitcast=True)
    return (v + c) - c


@jit(rows=("n_rows",))
def _fp8_rows_fwd_kernel(
    Q, S, X,  # Q: (M, K) e4m3; S: (M,) fp32; X: (M, K), unit stride along rows
    stride_q, stride_x, n_rows, n_cols,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if ONE_TILE:  # the rows fit one tile (K <= BLOCK): read once, quantized from registers
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 448.0  # (ROWS,): _TINY and E4M3_MAX
        tl.store(S + rows, scale, mask=row_ok)
        v = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
        tl.store(Q + rows[:, None] * stride_q + cols[None, :], _round_e4m3(v).to(Q.dtype.element_ty), mask=mask)
    else:  # wider rows (an lm_head's logits): the absmax pass, then the row again (from L2)
        amax = tl.zeros((ROWS,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = row_ok[:, None] & (start + cols < n_cols)[None, :]
            x = tl.load(X + rows[:, None] * stride_x + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = tl.maximum(amax, 1e-12) / 448.0
        tl.store(S + rows, scale, mask=row_ok)
        for start in range(0, n_cols, BLOCK):
            mask = row_ok[:, None] & (start + cols < n_cols)[None, :]
            x = tl.load(X + rows[:, None] * stride_x + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
            tl.store(Q + rows[:, None] * stride_q + start + cols[None, :], _round_e4m3(v).to(Q.dtype.element_ty),
                     mask=mask)


def _rows_tile(n_cols: int) -> tuple[int, int, bool, int]:
    """(rows a program, block of columns, one tile?, warps): rows up to MAX_FUSED_SIZE wide in one tile of ~4096+
    elements held in registers (the two-pass form ran at ~2.0-2.5 TB/s on the H200 against a copy's ~3.8-4.1 at
    the 1B and 8B widths: results/2026-12-03-h200-s16-fp8-bench.txt); wider ones in 4 x 1024 steps."""
    if n_cols > MAX_FUSED_SIZE:
        return 4, 1024, False, 4
    block = next_power_of_2(n_cols)
    rows = max(1, 4096 // block)
    return rows, block, True, num_warps_for(rows * block)


def _fp8_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantization in torch ops (the CPU, or a machine without triton): 4 passes instead of 2."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / E4M3_MAX  # (M, 1)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (q (M, K) e4m3, scale (M, 1) fp32) with x ~ q * scale, one scale per row (its absmax / 448)."""
    if x.dim() != 2:
        raise PpalliError(f"fp8_rows takes a 2-D tensor, got shape {tuple(x.shape)}")
    use_kernel = is_triton_available() and (x.is_cuda or (interpreting() and x.device.type == "cpu"))
    if not use_kernel:
        return _fp8_rows_torch(x)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=E4M3, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    rows, block, one_tile, warps = _rows_tile(k)
    _fp8_rows_fwd_kernel[(cdiv(m, rows),)](q, scale, x, q.stride(0), x.stride(0), m, k, ROWS=rows, BLOCK=block,
                                           ONE_TILE=one_tile, num_warps=warps)
    return q, scale


def fp8_mm(aq: torch.Tensor, sa: torch.Tensor, bq_t: torch.Tensor, sb: torch.Tensor,
           out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(aq sa) (bq_t sb) for aq (M, K) e4m3 with sa (M, 1) and bq_t (K, N) e4m3 column-major (the transpose of a
    row-major (N, K) tensor) with sb (1, N) -> (M, N) in out_dtype."""
    return torch._scaled_mm(aq, bq_t, scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def fp8_shapes_ok(w: torch.Tensor) -> bool:
    """Whether cuBLAS takes this (O, K) weight's GEMMs in fp8 both ways: both sides multiples of 16."""
    return w.dim() == 2 and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """(whether row-wise fp8 GEMMs run here, why not)."""
    if device.type == "cpu":
        return True, ""
    if device.type != "cuda":
        return False, f"fp8 GEMMs run on CUDA (or the CPU, slowly), not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return False, (f"row-wise fp8 GEMMs need compute capability 9.0+ (Hopper); this GPU has {major}.{minor}: "
                       "set plan.fp8: false")
    return True, ""


class Fp8Weights:
    """The e4m3 copies of one frozen base layer's weight (and of a stacked weight it begins, lora_qkv's
    [Wq; Wk; Wv]), in both layouts, made when first used and again when the weight has changed."""

    def __init__(self):
        # (data pointer, shape, transposed) -> (the source weight, its version then, q, scale). Holding the
        # source keeps its memory from being reused by another tensor that would then match the key.
        self._made: dict[tuple, tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = {}

    def _get(self, w: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = (w.data_ptr(), tuple(w.shape), transposed)
        hit = self._made.get(key)
        if hit is None or hit[1] != w._version:
            with torch.no_grad():
                src = w.detach().t() if transposed else w.detach()
                q, scale = fp8_rows(src.contiguous())  # (rows, cols), (rows, 1)
            for old in [k for k in self._made if k[1:] == key[1:]]:  # a weight replaced: its copies go
                del self._made[old]
            hit = self._made[key] = (w.detach(), w._version, q, scale.view(1, -1))
        return hit[2], hit[3]

    def forward_operand(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(wq^T (K, O) column-major, sw (1, O)) for y = x W^T."""
        q, scale = self._get(w, transposed=False)
        return q.t(), scale

    def grad_operand(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(wtq^T (O, K) column-major, swt (1, K)) for dx = dy W."""
        q, scale = self._get(w, transposed=True)
        return q.t(), scale

    def nbytes(self) -> int:
        return sum(q.numel() * q.element_size() + s.numel() * 4 for _, _, q, s in self._made.values())

    def clear(self) -> None:
        self._made.clear()


def fp8_pays(rows: int) -> bool:
    """Whether a GEMM over `rows` tokens runs in fp8 when its layer has copies (FP8_MIN_ROWS)."""
    return rows >= FP8_MIN_ROWS


def fp8_weights(base) -> Fp8Weights | None:
    """The Fp8Weights the fast path put on this base layer (plan.fp8), or None: bf16 GEMMs."""
    if isinstance(base, torch.Tensor):
        return None
    layer = base.get_base_layer() if hasattr(base, "get_base_layer") else base
    return layer.__dict__.get(FP8_ATTR)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, cache: Fp8Weights, xq=None) -> torch.Tensor:
    """x (N, K) W^T with W (O, K) -> (N, O) in x's dtype; xq: x's (q, scale) when already quantized."""
    aq, sa = xq if xq is not None else fp8_rows(x)
    bq, sb = cache.forward_operand(w)
    return fp8_mm(aq, sa, bq, sb, x.dtype)


def fp8_input_grad(dy: torch.Tensor, w: torch.Tensor, cache: Fp8Weights) -> torch.Tensor:
    """dy (N, O) W with W (O, K) -> (N, K) in dy's dtype."""
    aq, sa = fp8_rows(dy)
    bq, sb = cache.grad_operand(w)
    return fp8_mm(aq, sa, bq, sb, dy.dtype)
