"""The gated MLP of Llama-style models with LoRA on all three projections, fused, with a hand-written backward.

    g = x Wg^T + sg (x Ag^T) Bg^T        (N, I)
    u = x Wu^T + su (x Au^T) Bu^T        (N, I)
    h = act(g) * u                       (N, I)   act = silu (SwiGLU) or gelu_tanh (GeGLU)
    y = h Wd^T + sd (h Ad^T) Bd^T        (N, d)

Saved for the backward: x (N, d), the base outputs g0 = x Wg^T and u0 = x Wu^T (N, I each) and the three
(N, r) LoRA products. The adapters' rank-r terms of g and u are never added into g0 and u0: the activation
kernel (lora_glu.py) forms g and u tile by tile, in the forward and again in the backward, which saves 4
passes over (N, I) per forward (~0.4 ms a layer for Llama-3.1-8B at N = 8192 on an H100). h is NOT saved
either: keeping it costs N*I*2 = 235 MB per layer, 7.5 GB over 32 layers, and the backward never needs it
whole: down's dA = (sd dy Bd)^T h is summed inside the activation backward, tile by tile, as are gate's and
up's dB. Autograd through HF + PEFT keeps g, act(g), u, h and a copy of x per LoRA branch. The activation
backward writes dg over g0 and du over u0 in place, so the backward's peak adds only dh on top of the saved
tensors; down's rank-r input-gradient term (sd dy Bd) Ad is added inside that kernel too, instead of a
read-modify-write pass over dh. In the forward, the activation kernel also sums h Ad^T from its tiles
(lora_glu_fwd_had), so nothing reads h back for down's rank-r product; with `residual`, down's rank-r term
and the residual add are one pass over (N, d) (lora_add_fwd) instead of addmm_ and an add.

The GEMMs are cuBLAS. When a layer is recomputed for its backward (`_utils.recomputing`), y is thrown away:
the down projection's base GEMM is skipped, and (h Ad^T), the one thing the backward needs from h, comes
from the forward through the recompute wrapper's stash (`_utils.recompute_stash`, (N, r): 256 KB at
N = 8192, r = 16), so the recompute runs no activation kernel at all (3 passes over (N, I) saved a layer).
"""

from __future__ import annotations

import torch
from torch import nn

from ppalli.errors import PpalliError
from ppalli.kernels._utils import current_stash, is_recomputing
from ppalli.kernels.factor_cache import factor_cast
from ppalli.kernels.lora_add_rms_norm import lora_add_fwd
from ppalli.kernels.lora_glu import ACTS, lora_glu_bwd, lora_glu_fwd, lora_glu_fwd_had
from ppalli.kernels.lora_linear import (
    add_input_grad,
    base_mm,
    cast,
    factor_dtypes,
    lora_bwd,
    lora_parts,
    out_features,
    quantized_input,
    scaled_mm,
    stacked_lora_a,
    stacked_lora_a_grads,
)


class LoRAMLPFunction(torch.autograd.Function):
    """act(x Wg'^T) * (x Wu'^T) -> down projection, W' = W + s B A; the LoRA weights of all three train."""

    @staticmethod
    def forward(ctx, x, act, gb, ga, gB, gs, ub, ua, uB, us, db, da, dB, ds, res):
        ctx.ranks = [None if a is None else a.shape[0] for a in (ga, ua)]
        ctx.dtypes = factor_dtypes(ga, gB, ua, uB, da, dB)
        gB, uB, da, dB = (factor_cast(t, x.dtype) for t in (gB, uB, da, dB))  # once; the backward reuses them
        xq = quantized_input(x, gb, ub)  # plan.fp8: x quantized once for both GEMMs
        gate0, up0 = base_mm(x, gb, xq), base_mm(x, ub, xq)  # (N, I) each, without the adapters' terms
        del xq
        (xag, xau), a_stack = stacked_lora_a(x, (ga, ua))  # (N, r) views of one GEMM: x read once
        kept = current_stash()
        kept = kept.setdefault("lora_mlp.had", []) if kept is not None and da is not None else None
        glu = (gate0, up0, xag, gB, gs, xau, uB, us)
        if is_recomputing():  # a recompute for backward keeps the saved tensors and drops y: skip the down GEMM
            if kept:  # h (N, I) only made h Ad^T: the forward kept that (N, r) product, so no activation either
                had = kept.pop(0)
            elif da is not None:  # h Ad^T alone: the activation kernel sums it without writing h
                had = lora_glu_fwd_had(*glu, da, act, store_h=False)[1]
            else:
                had = None
            y = x.new_empty(x.shape[0], out_features(db))  # (N, d), never read
        else:
            if da is None:
                h, had = lora_glu_fwd(*glu, act), None  # (N, I), freed when forward returns
            else:
                h, had = lora_glu_fwd_had(*glu, da, act)  # (N, I), (N, r): h Ad^T summed from the kernel's tiles
            y = base_mm(h, db)  # (N, d)
            if res is not None:  # res + y + sd had Bd^T written over y: one pass, not addmm_ and then an add
                y = lora_add_fwd(res, y, had, dB, ds, out=y)
            elif had is not None:
                y.addmm_(had, dB.t(), alpha=ds)
            if kept is not None:  # inside a recompute wrapper: its recompute reads this back
                kept.append(had.detach())
        ctx.save_for_backward(x, gate0, up0, xag, xau, had, a_stack, gB, uB, da, dB)
        ctx.act, ctx.bases, ctx.scales = act, (gb, ub, db), (gs, us, ds)
        ctx.used = False
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.used:  # the first backward overwrote g0 and u0 with the gradients
            raise PpalliError("the fused LoRA MLP supports one backward per forward (no retain_graph=True)")
        ctx.used = True
        x, gate0, up0, xag, xau, had, a_stack, gB, uB, da, dB = ctx.saved_tensors
        (gb, ub, db), (gs, us, ds) = ctx.bases, ctx.scales
        (g_rank, u_rank), dtypes = ctx.ranks, ctx.dtypes
        need = ctx.needs_input_grad

        # Down projection: dh = dy Wd + (sd dy Bd) Ad, the second term added inside the activation kernel.
        dxad = d_dB = None
        if da is not None:
            dxad, _, d_dB = lora_bwd(dy, None, had, da, dB, ds, False, need[12], (None, dtypes[5]))  # (N, r), (d, r)
        dh0 = add_input_grad(None, dy, db, None, None)  # (N, I)
        # dBg, dBu and down's dA are summed inside the activation kernel, from the tiles it holds
        sums = (g_rank is not None and need[4], u_rank is not None and need[8], da is not None and need[11])
        dgate, dup, g_dB, u_dB, d_da = lora_glu_bwd(dh0, gate0, up0, xag, gB, gs, xau, uB, us, dxad, da, ctx.act,
                                                    sums)
        del dh0
        dxag = scaled_mm(dgate, gB, gs) if g_rank is not None else None  # (N, r)
        dxau = scaled_mm(dup, uB, us) if u_rank is not None else None
        (g_da, u_da), dxa_all = stacked_lora_a_grads((dxag, dxau), x, a_stack, ctx.ranks, (need[3], need[7]),
                                                     dtypes[0::2])
        dx = None
        if need[0]:
            dx = add_input_grad(None, dgate, gb, None, None)  # (N, d)
            dx = add_input_grad(dx, dup, ub, None, None)
            if dxa_all is not None:  # both rank-r terms in one GEMM, last (see add_input_grad)
                dx.addmm_(dxa_all, a_stack)
        g_dB, u_dB, d_da, d_dB = (cast(t, dt) for t, dt in ((g_dB, dtypes[1]), (u_dB, dtypes[3]), (d_da, dtypes[4]),
                                                            (d_dB, dtypes[5])))
        d_res = dy if need[14] else None  # the residual's gradient passes through
        return dx, None, None, g_da, g_dB, None, None, u_da, u_dB, None, None, d_da, d_dB, None, d_res


def lora_mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, act: str = "silu",
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., d) through the gated MLP whose projections are PEFT LoRA Linears -> (..., d), plus residual
    (..., d) when given (added in the pass that adds down's LoRA term).

    act: "silu" (Llama, Qwen, Mistral: SwiGLU) or "gelu_tanh" (Gemma: GeGLU).
    """
    if act not in ACTS:
        raise PpalliError(f"lora_mlp act must be one of {sorted(ACTS)}, got {act!r}")
    if residual is not None and residual.dtype != x.dtype:  # the fused add writes x's dtype: promote outside
        return residual + lora_mlp(x, gate, up, down, act)
    g, u, d = lora_parts(gate), lora_parts(up), lora_parts(down)
    x2 = x.reshape(-1, x.shape[-1])  # (N, d)
    res = residual.reshape(x2.shape[0], -1) if residual is not None else None
    y = LoRAMLPFunction.apply(x2, act, *g, *u, *d, res)
    return y.view(*x.shape[:-1], y.shape[-1])
