"""The two gradients of a LoRA adapter's B side that read the output gradient dy, in one pass over dy.

A LoRA Linear's backward needs, from dy (N, out), the (N, r) product that carries the gradient on to A and x,
and B's own gradient:

    dxa = s dy B        (N, r)      a sum over out: each row needs all of dy's columns
    dB  = s dy^T xa     (out, r)    a sum over N:   each column needs all of dy's rows

With cuBLAS these are two GEMMs, each bound by reading dy (64 MB for one projection of Llama-3.2-1B at 16384
tokens), and dB's split-K GEMM adds a reduce launch: on the H200, per T4 step (2026-12-03, results/
2026-12-03-h200-t4-kernels.json), 31.4 us a `dy B` and 18.2 us + 2.1 us a `dy^T xa` for q, o and down.
Here each program takes BM rows and walks all of dy's columns in BN blocks: `dy B` is summed in registers
(complete for its rows at the end), and each block's (BN, r) share of dB is added into an fp32 buffer with
atomic adds. Programs start their walk at different column blocks so that they rarely add into one block at
once. The atomic adds make dB's rounding order vary from run to run (dxa's does not); under
torch.use_deterministic_algorithms(True) lora_linear.lora_bwd runs the two GEMMs instead. fp32 accumulation
throughout, as cuBLAS's.
"""

from __future__ import annotations

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import cdiv, check_tensors, dot, dot_upcast, jit, next_power_of_2, program_count, tl


def launch_blocks(n: int, m: int, programs: int) -> tuple[int, int, int]:
    """(rows a program, columns a step, warps) for dy (n, m) on a GPU of `programs` SMs: about one program per SM
    (rows = the power of two nearest n / SMs, 32 to 128), 128 columns a step where that still leaves 8 blocks
    for the staggered starts to spread the atomic adds over, else 64; 8 warps for tiles of 128 x 128 or more.
    benchmarks/bench_lora_b_bwd.py on the H200 (132 SMs, 2026-12-03, results/2026-12-03-h200-lora-b-bwd.json),
    the best setting of 7 for each shape and what this rule picks: 1B q/o/down (16384 x 2048) 128 x 128 x 8,
    0.0310 ms (the cuBLAS pair 0.0481); 1B k (16384 x 512) 128 x 64 x 4, 0.0186 (0.0226; 64 x 128 took 0.0454:
    256 programs adding into 4 column blocks); 8B q (8192 x 4096) 64 x 128 x 4, 0.0374 (0.0500); 8B k (8192 x
    1024) 64 x 128 x 4, 0.0149 (0.0320). 64-row programs over 4096 columns or more take 256 a step: on the H100
    (2026-12-05, results/2026-12-05-h100-s31-lora_b_bwd.txt) 8B q/o/down 0.0397 ms against 0.0431 for 64 x 128 x 4
    (three calls a T1 layer), on the H200 0.0375 against 0.0374."""
    bm = min(128, max(32, next_power_of_2(max(1, round(n / programs * 2 / 3)))))
    bn = 256 if bm == 64 and m >= 16 * 256 else 128 if m >= 8 * 128 else 64
    return bm, bn, 8 if bm * bn >= 128 * 128 else 4


@jit(rows=("N",))
def _lora_b_bwd_kernel(DXA, DB, DY, dy_stride, XA, xa_stride, B, N, M, R, s,
                       IEEE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       RP: tl.constexpr):
    # DY (N, M) rows of stride dy_stride; XA (N, R) rows of stride xa_stride; B (M, R) contiguous;
    # DXA (N, R) contiguous, dy's dtype; DB (M, RP) fp32, zeroed, added into.
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < N
    k = tl.arange(0, RP)
    k_ok = k < R
    xa = tl.load(XA + rows[:, None] * xa_stride + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    dxa = tl.zeros((BM, RP), dtype=tl.float32)
    n_blocks = tl.cdiv(M, BN)
    for i in range(0, n_blocks):
        cols = ((i + pid) % n_blocks) * BN + tl.arange(0, BN)  # staggered start (see the module docstring)
        col_ok = cols < M
        dy = tl.load(DY + rows[:, None] * dy_stride + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0)  # (BM, BN)
        b = tl.load(B + cols[:, None] * R + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # (BN, RP)
        dxa += dot(dy, b, IEEE, UPCAST)
        db = dot(tl.trans(dy), xa, IEEE, UPCAST)  # (BN, RP): this block of rows' share of dB
        tl.atomic_add(DB + cols[:, None] * RP + k[None, :], db * s, mask=col_ok[:, None] & k_ok[None, :],
                      sem="relaxed")
    tl.store(DXA + rows[:, None] * R + k[None, :], (dxa * s).to(DXA.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


def lora_b_bwd(dy: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, s: float,
               db_dtype: torch.dtype | None = None, blocks: tuple[int, int, int] | None = None):
    """dy (N, out), xa (N, r), b (out, r) -> (dxa = s dy b (N, r) in dy's dtype, dB = s dy^T xa (out, r) in
    db_dtype, dy's dtype when None). dy and xa may be column blocks of wider buffers (unit stride along a row)."""
    check_tensors(dy, xa, b)
    n, m = dy.shape
    r = b.shape[1]
    if xa.shape != (n, r) or b.shape != (m, r) or dy.stride(1) != 1 or xa.stride(1) != 1:
        raise PpalliError(f"lora_b_bwd needs dy (N, out) and xa (N, r) with unit-stride rows and b (out, r), got "
                          f"{tuple(dy.shape)}, {tuple(xa.shape)}, {tuple(b.shape)}")
    if xa.dtype != dy.dtype or b.dtype != dy.dtype:
        raise PpalliError(f"lora_b_bwd needs dy, xa and b in one dtype, got {dy.dtype}, {xa.dtype}, {b.dtype}")
    bm, bn, warps = blocks or launch_blocks(n, m, program_count(dy.device))
    rp = max(16, next_power_of_2(r))
    dxa = torch.empty(n, r, dtype=dy.dtype, device=dy.device)
    db = torch.zeros(m, rp, dtype=torch.float32, device=dy.device)
    _lora_b_bwd_kernel[(cdiv(n, bm),)](
        dxa, db, dy, dy.stride(0), xa, xa.stride(0), b.contiguous(), n, m, r, float(s),
        IEEE=dy.dtype == torch.float32, UPCAST=dot_upcast(dy.dtype), BM=bm, BN=bn, RP=rp, num_warps=warps)
    return dxa, db[:, :r].to(db_dtype or dy.dtype).contiguous()
