"""The gated MLP of Llama-style models with LoRA on all three projections, fused, with a hand-written backward.

    g = x Wg^T + sg (x Ag^T) Bg^T        (N, I)
    u = x Wu^T + su (x Au^T) Bu^T        (N, I)
    h = act(g) * u                       (N, I)   act = silu (SwiGLU) or gelu_tanh (GeGLU)
    y = h Wd^T + sd (h Ad^T) Bd^T        (N, d)

Saved for the backward: x (N, d), g and u (N, I each) and the three (N, r) LoRA products. h is NOT saved;
the backward recomputes it from g and u with one elementwise kernel. The trade, for Llama-3.1-8B
(I = 14336) at N = 8192 tokens in bf16: keeping h costs N*I*2 = 235 MB per layer, 7.5 GB over 32 layers,
while recomputing it reads g, u and writes h once, 0.7 GB of traffic, ~0.2 ms per layer at the H100's
3.35 TB/s, against ~10 ms for the layer's forward+backward GEMMs (4 * N * 218M weights at ~700 TFLOP/s).
Autograd through HF + PEFT keeps g, act(g), u, h and a copy of x per LoRA branch. The activation backward
writes dg over g and du over u in place (the kernels' inplace=True), so the backward's peak adds only dh
and the transient h on top of the saved tensors.

The GEMMs are cuBLAS; each LoRA B-product is added into its base GEMM's output buffer by addmm_.
When a layer is recomputed for its backward (`_utils.recomputing`), y is thrown away: the down projection's
base GEMM is skipped and only (h Ad^T), which the backward needs, is made.
"""

from __future__ import annotations

import torch
from torch import nn

from ppalli.errors import PpalliError
from ppalli.kernels._utils import is_recomputing
from ppalli.kernels.geglu import geglu_bwd, geglu_fwd
from ppalli.kernels.lora_linear import add_input_grad, cast, lora_bwd, lora_fwd, lora_parts, out_features
from ppalli.kernels.swiglu import swiglu_bwd, swiglu_fwd

ACTIVATIONS = {"silu": (swiglu_fwd, swiglu_bwd), "gelu_tanh": (geglu_fwd, geglu_bwd)}


class LoRAMLPFunction(torch.autograd.Function):
    """act(x Wg'^T) * (x Wu'^T) -> down projection, W' = W + s B A; the LoRA weights of all three train."""

    @staticmethod
    def forward(ctx, x, act, gb, ga, gB, gs, ub, ua, uB, us, db, da, dB, ds):
        act_fwd, _ = ACTIVATIONS[act]
        gate, xag = lora_fwd(x, gb, ga, gB, gs)  # (N, I), (N, r)
        up, xau = lora_fwd(x, ub, ua, uB, us)  # (N, I), (N, r)
        h = act_fwd(gate, up)  # (N, I), freed when forward returns: the backward recomputes it
        if is_recomputing():  # a recompute for backward keeps the saved tensors and drops y: skip the down GEMM
            had = None if da is None else torch.mm(h, cast(da, h.dtype).t())  # (N, r)
            y = h.new_empty(h.shape[0], out_features(db))  # (N, d), never read
        else:
            y, had = lora_fwd(h, db, da, dB, ds)  # (N, d), (N, r)
        ctx.save_for_backward(x, gate, up, xag, xau, had, ga, gB, ua, uB, da, dB)
        ctx.act, ctx.bases, ctx.scales = act, (gb, ub, db), (gs, us, ds)
        ctx.used = False
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.used:  # the first backward overwrote g and u with their gradients
            raise PpalliError("the fused LoRA MLP supports one backward per forward (no retain_graph=True)")
        ctx.used = True
        x, gate, up, xag, xau, had, ga, gB, ua, uB, da, dB = ctx.saved_tensors
        (gb, ub, db), (gs, us, ds) = ctx.bases, ctx.scales
        need = ctx.needs_input_grad
        act_fwd, act_bwd = ACTIVATIONS[ctx.act]

        # Down projection: needs h for dA_down only; h lives just long enough for that one GEMM.
        dxad = d_da = d_dB = None
        if da is not None:
            h = act_fwd(gate, up)  # (N, I) recomputed
            dxad, d_da, d_dB = lora_bwd(dy, h, had, da, dB, ds, need[11], need[12])
            del h
        dh = add_input_grad(None, dy, db, dxad, da)  # (N, I)
        dgate, dup = act_bwd(dh, gate, up, inplace=True)  # written over gate and up
        del dh

        dxag = g_da = g_dB = dxau = u_da = u_dB = None
        if ga is not None:
            dxag, g_da, g_dB = lora_bwd(dgate, x, xag, ga, gB, gs, need[3], need[4])
        if ua is not None:
            dxau, u_da, u_dB = lora_bwd(dup, x, xau, ua, uB, us, need[7], need[8])
        dx = None
        if need[0]:
            dx = add_input_grad(None, dgate, gb, dxag, ga)  # (N, d)
            dx = add_input_grad(dx, dup, ub, dxau, ua)
        return dx, None, None, g_da, g_dB, None, None, u_da, u_dB, None, None, d_da, d_dB, None


def lora_mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, act: str = "silu") -> torch.Tensor:
    """x (..., d) through the gated MLP whose projections are PEFT LoRA Linears -> (..., d).

    act: "silu" (Llama, Qwen, Mistral: SwiGLU) or "gelu_tanh" (Gemma: GeGLU).
    """
    if act not in ACTIVATIONS:
        raise PpalliError(f"lora_mlp act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    g, u, d = lora_parts(gate), lora_parts(up), lora_parts(down)
    x2 = x.reshape(-1, x.shape[-1])  # (N, d)
    y = LoRAMLPFunction.apply(x2, act, *g, *u, *d)
    return y.view(*x.shape[:-1], y.shape[-1])
