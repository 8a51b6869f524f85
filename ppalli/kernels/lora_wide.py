"""Gate and up base weights with spare columns, so that the MLP's input-gradient GEMMs also give the adapters'
rank-r terms; the forward reads those weights whole, through an input with as many zero columns.

The fused LoRA MLP's backward (lora_mlp.py) needs, from the gate's and up's output gradients dg and du (N, I):

    dx  = dg Wg + du Wu             (N, d)   two cuBLAS GEMMs, the second adding into the first's output
    dxg = sg dg Bg,  dxu = su du Bu  (N, r)   two skinny GEMMs, each bound by reading dg or du again

The skinny pair took 5.6 ms of a T1 step on an H100 (87.5 us each, two a layer; results/2026-12-05-h100-t1-
s31-profile-ppalli.txt). With Wg and Wu the leading (I, d) columns of (I, d + p) buffers [Wg | sg Bg | 0] and
[Wu | 0 | su Bu] (p = 2r rounded up to 64), the same two GEMMs write (N, d + p): dx, dxg and dxu, dg and du
read once. On the H100 (results/2026-12-05-h100-dgrad-ext.txt) that backward took 2.625 ms against 2.802 at
Llama-3.1-8B's shape, but a forward x Wg^T that reads Wg through its row stride d + p took 1.38-1.43 ms
against 1.23: the earlier version of this (4348ee9) lost more in the forward than it won. So the forward here
multiplies the whole buffer: x comes as the leading columns of an (N, d + p) buffer whose last p columns are
zero (the RMSNorm before the MLP writes it so: lora_add_rms_norm's `pad`), and x_pad [Wg | sg Bg | 0]^T =
x Wg^T exactly, a compact GEMM with K = d + p (1.6% more work at d = 4096). Storing the buffers transposed
instead, (d + p, I), made the forward an NN GEMM: 1.36-1.43 ms against 1.29 (results/2026-12-05-h100-dgrad-
ext-t.json), no better.

The base weights keep their values and identity (each parameter's .data becomes the view), the spare columns
cost p/d of the weights, and s B is copied in before each backward: (I, r), 458 KB at I = 14336.
`narrow_base_weights` gives the weights their own compact storage back (the fast path's revert).
"""

from __future__ import annotations

import torch

from ppalli.kernels.lora_linear import base_weight


def spare_columns(rank: int, n: int = 2) -> int:
    """The spare columns for n adapters of `rank`: n * rank rounded up to 64 (a row of d + p bf16 values then
    starts 128-byte aligned when d is a multiple of 64)."""
    return -(-n * rank // 64) * 64


def _spare(w: torch.Tensor, extra: int) -> torch.Tensor | None:
    """The (out, in + extra) buffer whose leading columns the weight w (out, in) is, else None. Checked at each
    use: a .to(), a load or a merge may have given w compact storage since."""
    if torch.compiler.is_compiling() or w.dim() != 2 or w.stride(1) != 1 or w.storage_offset() != 0:
        return None
    rows, cols = w.shape[0], w.shape[1] + extra
    if extra <= 0 or w.stride(0) != cols or w.untyped_storage().nbytes() < rows * cols * w.element_size():
        return None
    return w.detach().as_strided((rows, cols), (cols, 1))


def _weights(bases) -> list[torch.Tensor] | None:
    """The bases' floating-point (out, in) weights when all share dtype, device and shape, else None (a 4-bit
    weight is packed bytes)."""
    ws = [getattr(b, "weight", None) for b in bases]
    if any(w is None or w.dim() != 2 or not w.is_floating_point() or w.element_size() < 2 for w in ws):
        return None
    first = ws[0]
    return ws if all(w.dtype == first.dtype and w.device == first.device and w.shape == first.shape
                     for w in ws) else None


@torch.no_grad()
def widen_base_weights(bases, rank: int) -> int:
    """Give each of the base layers' frozen weights (out, in) spare_columns(rank, len(bases)) zero columns (the
    weight's .data becomes a view of the wider buffer) -> that count, or 0, and nothing changed, where they are
    not floating-point weights of one shape (a 4-bit base keeps the separate rank-r GEMMs)."""
    ws = _weights(bases)
    if ws is None or rank <= 0:
        return 0
    extra = spare_columns(rank, len(ws))
    for w in ws:
        if _spare(w, extra) is None:
            wide = w.new_zeros(w.shape[0], w.shape[1] + extra)
            wide[:, :w.shape[1]] = w
            w.data = wide[:, :w.shape[1]]
    return extra


@torch.no_grad()
def narrow_base_weights(bases, extra: int) -> None:
    """Undo widen_base_weights: each weight in its own compact storage again (a copy each)."""
    ws = _weights(bases)
    if ws is not None:
        for w in ws:
            if _spare(w, extra) is not None:
                w.data = w.data.contiguous()


def wide_weights(bases, factors, dtype: torch.dtype, extra: int) -> list[torch.Tensor] | None:
    """For base layers widened by widen_base_weights (`extra` spare columns) and their adapters' B factors
    (out, r), the (out, in + extra) buffers, or None where they are not there, not in `dtype`, or the factors'
    ranks do not fit. Nothing is written: wide_input_grad fills the spare columns."""
    rank = factors[0].shape[1]
    if extra <= 0 or any(b.shape[1] != rank for b in factors) or len(factors) * rank > extra:
        return None
    ws = [base_weight(b) for b in bases]
    if any(w.dtype != dtype for w in ws):
        return None
    wides = [_spare(w, extra) for w in ws]
    return None if any(x is None for x in wides) else wides


def padded_rows(x: torch.Tensor, extra: int) -> torch.Tensor | None:
    """x (N, d) as the (N, d + extra) buffer it leads, when its rows are laid out so (row stride d + extra), else
    None. The caller vouches that the extra columns hold zeros (lora_add_rms_norm's `pad` writes them)."""
    n, d = x.shape
    if extra <= 0 or x.stride(1) != 1 or x.stride(0) != d + extra:
        return None
    if x.untyped_storage().nbytes() < (x.storage_offset() + n * (d + extra)) * x.element_size():
        return None
    return x.as_strided((n, d + extra), (d + extra, 1))


def wide_forward(x_pad: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    """x_pad (N, d + p) with zero last columns, wide (out, d + p) -> x W^T (N, out): the spare columns meet zeros."""
    return torch.mm(x_pad, wide.t())


@torch.no_grad()
def _fill(wides, factors, scales, cols: int) -> None:
    """Base i's buffer: s_i B_i in its slot i of the spare columns (the others stay zero)."""
    rank = factors[0].shape[1]
    for i, (wide, b, s) in enumerate(zip(wides, factors, scales)):
        torch.mul(b, s, out=wide[:, cols + i * rank:cols + (i + 1) * rank])


def wide_input_grad(dys, wides, factors, scales, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i dy_i W_i (N, cols) and [s_1 dy_1 B_1, s_2 dy_2 B_2, ...] (N, n r), dys (N, out) each, from one
    GEMM per base layer into one (N, cols + p) buffer (wide_weights' buffers, W_i their first cols columns).
    -> (dx, a column view of that buffer with row stride cols + p; dxa, its own (N, n r) tensor, so that dx can
    take dxa A afterwards without reading what it writes)."""
    rank = factors[0].shape[1]
    _fill(wides, factors, scales, cols)
    out = torch.mm(dys[0], wides[0])  # (N, cols + p)
    for dy, wide in zip(dys[1:], wides[1:]):
        out.addmm_(dy, wide)
    return out[:, :cols], out[:, cols:cols + len(wides) * rank].clone()
