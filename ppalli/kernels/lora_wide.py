"""Frozen base weights with spare columns, so that an input-gradient GEMM also gives a LoRA adapter's rank-r term.

The fused LoRA MLP's backward (lora_mlp.py) needs, from the gate's and up's output gradients dg and du (N, I):

    dx  = dg Wg + du Wu             (N, d)   two cuBLAS GEMMs, the second adding into the first's output
    dxg = sg dg Bg,  dxu = su du Bu  (N, r)   two more, each bound by reading dg or du (N, I) again

The skinny pair took 2.2 ms of a T4 step on the H200 (32 launches at 69 us, Llama-3.2-1B at 16384 tokens,
benchmarks/results/2026-12-04-h200-t4-s19-profile-ppalli-1.txt). With Wg and Wu the leading (I, d) columns of
(I, d + 2r) buffers, [Wg | sg Bg | 0] and [Wu | 0 | su Bu], the same two GEMMs write (N, d + 2r): dx, dxg and
dxu, dg and du read once. The base weights keep their values and identity (each parameter's .data becomes the
view; the forward's x W^T reads it through its row stride), the spare columns cost 2r/d of the weights (1.6%
at d = 2048) and s B is copied in before each backward: (I, r), 256 KB at I = 8192. `narrow_base_weights`
gives the weights their own compact storage back (the fast path's revert).
"""

from __future__ import annotations

import torch

from ppalli.kernels.lora_linear import base_weight


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
    weight is packed bytes, an fp8 one has no GEMM here)."""
    ws = [getattr(b, "weight", None) for b in bases]
    if any(w is None or w.dim() != 2 or not w.is_floating_point() or w.element_size() < 2 for w in ws):
        return None
    first = ws[0]
    return ws if all(w.dtype == first.dtype and w.device == first.device and w.shape == first.shape
                     for w in ws) else None


@torch.no_grad()
def widen_base_weights(bases, rank: int) -> bool:
    """Give each of the base layers' frozen weights (out, in) len(bases) * rank zero spare columns (the weight's
    .data becomes a view of the wider buffer). False, and nothing changed, where they are not floating-point
    weights of one shape (a 4-bit base keeps the separate rank-r GEMMs)."""
    ws = _weights(bases)
    if ws is None or rank <= 0:
        return False
    extra = len(ws) * rank
    for w in ws:
        if _spare(w, extra) is None:
            wide = w.new_zeros(w.shape[0], w.shape[1] + extra)
            wide[:, :w.shape[1]] = w
            w.data = wide[:, :w.shape[1]]
    return True


@torch.no_grad()
def narrow_base_weights(bases, rank: int) -> None:
    """Undo widen_base_weights: each weight in its own compact storage again (a copy each)."""
    ws = _weights(bases)
    if ws is not None:
        for w in ws:
            if _spare(w, len(ws) * rank) is not None:
                w.data = w.data.contiguous()


def wide_weights(bases, factors, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """For base layers widened by widen_base_weights and their adapters' B factors (out, r) in `dtype`, the
    (out, in + n r) buffers, or None where the spare columns are not there (or the weights are not `dtype`).
    Nothing is written: wide_input_grad fills the spare columns."""
    rank = factors[0].shape[1]
    if any(b.shape[1] != rank for b in factors):
        return None
    ws = [base_weight(b) for b in bases]
    if any(w.dtype != dtype for w in ws):
        return None
    wides = [_spare(w, len(ws) * rank) for w in ws]
    return None if any(x is None for x in wides) else wides


@torch.no_grad()
def _fill(wides, factors, scales, cols: int) -> None:
    """Base i's buffer: s_i B_i in its slot i of the spare columns (the others stay zero)."""
    rank = factors[0].shape[1]
    for i, (wide, b, s) in enumerate(zip(wides, factors, scales)):
        torch.mul(b, s, out=wide[:, cols + i * rank:cols + (i + 1) * rank])


def wide_input_grad(dys, wides, factors, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i dy_i W_i (N, in) and [s_1 dy_1 B_1, s_2 dy_2 B_2, ...] (N, n r), dys (N, out) each, from one
    GEMM per base layer into one (N, in + n r) buffer (wide_weights' buffers). -> (dx, a column view of the
    buffer; dxa, its own (N, n r) tensor, so that dx can take dxa A afterwards without reading what it writes)."""
    cols = wides[0].shape[1] - len(wides) * factors[0].shape[1]
    _fill(wides, factors, scales, cols)
    out = torch.mm(dys[0], wides[0])  # (N, in + n r)
    for dy, wide in zip(dys[1:], wides[1:]):
        out.addmm_(dy, wide)
    return out[:, :cols], out[:, cols:].clone()
