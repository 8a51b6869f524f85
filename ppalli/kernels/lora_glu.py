"""The gated activation of a LoRA MLP with the adapters' rank-r terms folded in: SwiGLU or GeGLU.

With LoRA on gate and up, g = g0 + sg (x Ag^T) Bg^T and u = u0 + su (x Au^T) Bu^T, where g0 = x Wg^T and
u0 = x Wu^T come from the base GEMMs. Adding each rank-r product with cuBLAS (addmm_ into g0) reads and
writes the whole (N, I) output: for Llama-3.1-8B at N = 8192 tokens, 4 passes of 235 MB per layer forward,
~0.4 ms on an H100 (the `badd` kernels of benchmarks/results/*-t1-profile-ppalli-1.txt). Here each tile of
the activation kernel computes its own (BM, r) x (r, BN) products with tl.dot and never writes g or u:

    forward:   h  = act(g) * u                                       reads g0, u0; writes h
    backward:  dh = dh0 + (sd dy Bd) Ad    (down's LoRA input-gradient term, same trick)
               dg = dh * u * act'(g),  du = dh * act(g)              written over g0 and u0
               h  again, only when down's dA = (sd dy Bd)^T h needs it

so the block saves g0 and u0 (the same bytes as g and u) and the backward re-forms g and u in registers.
fp32 inside; the rank-r products take bf16/fp16 inputs with fp32 accumulation, as cuBLAS's addmm does.
act: 0 = silu (SwiGLU: Llama, Qwen, Mistral), 1 = gelu_tanh (GeGLU: Gemma).
"""

from __future__ import annotations

import torch

from ppalli.errors import PpalliError
from ppalli.kernels._utils import cdiv, check_tensors, jit, next_power_of_2, tanh, tl

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_COEF = tl.constexpr(0.044715)
ACTS = {"silu": 0, "gelu_tanh": 1}
BLOCK_M, BLOCK_N = 64, 128  # a (64, 128) tile of the (N, I) activation; r stays whole in registers


@jit
def _rank_r(XA, xa_stride, B, rows, cols, N, M, R, s, B_ROWS_ARE_COLS: tl.constexpr, IEEE: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr):
    """s * XA[rows] @ B^T[:, cols] as a (BM, BN) fp32 tile: XA (N, R) with row stride xa_stride (a column
    slice of the stacked x [Ag; Au]^T is read in place); B (M, R) when B_ROWS_ARE_COLS (a lora_B weight),
    else (R, M) (a lora_A weight); M is the intermediate size I."""
    k = tl.arange(0, RP)
    xa = tl.load(XA + rows[:, None] * xa_stride + k[None, :], mask=(rows[:, None] < N) & (k[None, :] < R), other=0.0)
    if B_ROWS_ARE_COLS:
        bt = tl.load(B + cols[None, :] * R + k[:, None], mask=(cols[None, :] < M) & (k[:, None] < R), other=0.0)
    else:
        bt = tl.load(B + k[:, None] * M + cols[None, :], mask=(cols[None, :] < M) & (k[:, None] < R), other=0.0)
    if IEEE:
        acc = tl.dot(xa, bt, input_precision="ieee")
    else:
        acc = tl.dot(xa, bt)
    return acc * s


@jit
def _act(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        sig = tl.sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    t = tanh(SQRT_2_OVER_PI * (g + GELU_COEF * g * g * g))
    da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_COEF * g * g)
    return 0.5 * g * (1.0 + t), da


@jit
def _tile(N, M, BM: tl.constexpr, BN: tl.constexpr):
    """This program's (BM, BN) tile of the (N, M) activation: row and column indices, offsets, bounds mask."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    return rows, cols, rows[:, None] * M + cols[None, :], (rows[:, None] < N) & (cols[None, :] < M)


@jit
def _gate_up(G0, U0, XAG, xag_stride, BG, XAU, xau_stride, BU, rows, cols, offs, mask, N, M, R, sg, su,
             HAS_G: tl.constexpr, HAS_U: tl.constexpr, IEEE: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr):
    g = tl.load(G0 + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U0 + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_G:
        g += _rank_r(XAG, xag_stride, BG, rows, cols, N, M, R, sg, True, IEEE, BM, BN, RP)
    if HAS_U:
        u += _rank_r(XAU, xau_stride, BU, rows, cols, N, M, R, su, True, IEEE, BM, BN, RP)
    return g, u


@jit
def _lora_glu_fwd_kernel(H, G0, U0, XAG, xag_stride, BG, XAU, xau_stride, BU, N, M, R, sg, su,
                         ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, IEEE: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr):
    rows, cols, offs, mask = _tile(N, M, BM, BN)
    g, u = _gate_up(G0, U0, XAG, xag_stride, BG, XAU, xau_stride, BU, rows, cols, offs, mask, N, M, R, sg, su,
                    HAS_G, HAS_U, IEEE, BM, BN, RP)
    a, _ = _act(g, ACT)
    tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=mask)


@jit
def _lora_glu_bwd_kernel(DG, DU, H, DH0, XAD, AD, G0, U0, XAG, xag_stride, BG, XAU, xau_stride, BU, N, M, R, sg,
                         su,
                         ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, HAS_D: tl.constexpr,
                         WRITE_H: tl.constexpr, IEEE: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr):
    rows, cols, offs, mask = _tile(N, M, BM, BN)
    g, u = _gate_up(G0, U0, XAG, xag_stride, BG, XAU, xau_stride, BU, rows, cols, offs, mask, N, M, R, sg, su,
                    HAS_G, HAS_U, IEEE, BM, BN, RP)
    dh = tl.load(DH0 + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_D:  # XAD is already s_d * dy Bd
        dh += _rank_r(XAD, R, AD, rows, cols, N, M, R, 1.0, False, IEEE, BM, BN, RP)
    a, da = _act(g, ACT)
    if WRITE_H:
        tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * a).to(DU.dtype.element_ty), mask=mask)  # DU may be U0: read above, same tile
    tl.store(DG + offs, (dh * u * da).to(DG.dtype.element_ty), mask=mask)


def _factors(x: torch.Tensor, xa: torch.Tensor | None, b: torch.Tensor | None, rank: int):
    """(xa, its row stride, b) in x's dtype, xa's rows unit-stride (a column view of a stacked product is
    used in place), b contiguous; a dummy pointer when absent."""
    if xa is None:
        return x, 0, x
    if xa.shape[-1] != rank or b.shape[-1] != rank:
        raise PpalliError(f"lora_glu: every adapter needs the same rank, got {xa.shape[-1]} and {rank}")
    xa = xa.to(x.dtype)
    if xa.stride(-1) != 1:
        xa = xa.contiguous()
    return xa, xa.stride(0), b.to(x.dtype).contiguous()


def _launch_args(g0: torch.Tensor, up0: torch.Tensor, act: str, pairs) -> tuple:
    if act not in ACTS:
        raise PpalliError(f"lora_glu act must be one of {sorted(ACTS)}, got {act!r}")
    if g0.shape != up0.shape or g0.dim() != 2 or not (g0.is_contiguous() and up0.is_contiguous()):
        raise PpalliError(f"lora_glu needs contiguous (N, I) gate and up of one shape, got {tuple(g0.shape)}, "
                          f"{tuple(up0.shape)}")
    ranks = {xa.shape[-1] for xa, _ in pairs if xa is not None}
    rank = ranks.pop() if ranks else 1
    if ranks:
        raise PpalliError("lora_glu: the gate, up and down adapters must share one rank")
    check_tensors(g0, up0, *[t for pair in pairs for t in pair if t is not None])
    n, i = g0.shape
    grid = (cdiv(n, BLOCK_M), cdiv(i, BLOCK_N))
    meta = dict(IEEE=g0.dtype == torch.float32, BM=BLOCK_M, BN=BLOCK_N, RP=max(16, next_power_of_2(rank)))
    return n, i, rank, grid, meta


def lora_glu_fwd(g0: torch.Tensor, up0: torch.Tensor, xag, bg, sg: float, xau, bu, su: float,
                 act: str = "silu") -> torch.Tensor:
    """g0, up0 (N, I) base outputs; xag, xau (N, r) = x A^T or None; bg, bu (I, r) lora_B weights ->
    h = act(g0 + sg xag bg^T) * (up0 + su xau bu^T), (N, I) in g0's dtype."""
    n, i, rank, grid, meta = _launch_args(g0, up0, act, [(xag, bg), (xau, bu)])
    xag, xag_stride, bg = _factors(g0, xag, bg, rank)
    xau, xau_stride, bu = _factors(g0, xau, bu, rank)
    h = torch.empty_like(g0)
    _lora_glu_fwd_kernel[grid](h, g0, up0, xag, xag_stride, bg, xau, xau_stride, bu, n, i, rank, float(sg),
                               float(su), ACT=ACTS[act], HAS_G=xag is not g0, HAS_U=xau is not g0, **meta,
                               num_warps=4)
    return h


def lora_glu_bwd(dh0: torch.Tensor, g0: torch.Tensor, up0: torch.Tensor, xag, bg, sg: float, xau, bu, su: float,
                 dxad=None, ad=None, act: str = "silu", want_h: bool = False):
    """The backward of lora_glu_fwd, written over g0 and up0: -> (dgate, dup, h or None), each (N, I).

    dh0 (N, I) = dy Wd, the down projection's base input gradient; dxad (N, r) = sd dy Bd and ad (r, I), its
    lora_A weight, add the adapter's term. h (the forward's output) comes back when want_h."""
    n, i, rank, grid, meta = _launch_args(g0, up0, act, [(xag, bg), (xau, bu), (dxad, ad)])
    if dh0.shape != g0.shape or not dh0.is_contiguous():
        raise PpalliError(f"lora_glu_bwd: dh0 must be contiguous {tuple(g0.shape)}, got {tuple(dh0.shape)}")
    xag, xag_stride, bg = _factors(g0, xag, bg, rank)
    xau, xau_stride, bu = _factors(g0, xau, bu, rank)
    has_d = dxad is not None
    dxad = dxad.to(g0.dtype).contiguous() if has_d else g0
    ad = ad.to(g0.dtype).contiguous() if has_d else g0
    h = torch.empty_like(g0) if want_h else g0
    _lora_glu_bwd_kernel[grid](g0, up0, h, dh0, dxad, ad, g0, up0, xag, xag_stride, bg, xau, xau_stride, bu, n, i,
                               rank, float(sg), float(su), ACT=ACTS[act], HAS_G=xag is not g0, HAS_U=xau is not g0,
                               HAS_D=has_d, WRITE_H=want_h, **meta, num_warps=4)
    return g0, up0, (h if want_h else None)


class LoRAGLUFunction(torch.autograd.Function):
    """h = act(g0 + sg xag bg^T) * (u0 + su xau bu^T) with gradients for all six tensors. The LoRA MLP block
    (lora_mlp.py) calls the launchers directly and owns a backward that writes over its saved g0 and u0;
    this Function keeps its inputs intact (autograd may hold them elsewhere), so it copies them first."""

    @staticmethod
    def forward(ctx, g0, u0, xag, bg, sg, xau, bu, su, act):
        ctx.save_for_backward(g0, u0, xag, bg, xau, bu)
        ctx.sg, ctx.su, ctx.act = sg, su, act
        return lora_glu_fwd(g0, u0, xag, bg, sg, xau, bu, su, act)

    @staticmethod
    def backward(ctx, dh):
        g0, u0, xag, bg, xau, bu = ctx.saved_tensors
        dg, du, _ = lora_glu_bwd(dh.contiguous(), g0.clone(), u0.clone(), xag, bg, ctx.sg, xau, bu, ctx.su,
                                 act=ctx.act)
        need = ctx.needs_input_grad
        grads = [dg if need[0] else None, du if need[1] else None]
        for d, xa, b, s in ((dg, xag, bg, ctx.sg), (du, xau, bu, ctx.su)):
            dxa = torch.mm(d, b.to(d.dtype)).mul_(s).to(xa.dtype) if xa is not None else None  # (N, r)
            db = torch.mm(d.t(), xa.to(d.dtype)).mul_(s).to(b.dtype) if b is not None else None  # (I, r)
            grads += [dxa, db, None]
        return grads[0], grads[1], grads[2], grads[3], None, grads[5], grads[6], None, None


def lora_glu(g0: torch.Tensor, u0: torch.Tensor, xag=None, bg=None, sg: float = 1.0, xau=None, bu=None,
             su: float = 1.0, act: str = "silu") -> torch.Tensor:
    """act(g0 + sg xag bg^T) * (u0 + su xau bu^T), g0 and u0 (N, I), with a fused backward."""
    return LoRAGLUFunction.apply(g0, u0, xag, bg, sg, xau, bu, su, act)
