"""The base GEMMs of one LoRA training step, shape by shape, on one GPU: TFLOP/s of each as the fast path
calls it, and of the alternatives a change would bring (stacked gate/up, stacked q/k/v, fused dgrad).

    python benchmarks/bench_gemm.py --out benchmarks/results/gemm.json

Shapes: Llama-3.1-8B at 4x2048 tokens (T1) and Llama-3.2-1B at 8x2048 (T4), bf16. The frozen weight W is
(out, in) as nn.Linear stores it. As called: forward y = x W^T (torch.mm(x, W.t())); input gradient
dx = dy W (torch.mm), or accumulated into dx (addmm_, beta = 1) when a block sums several; lm_head chunks of
1024 rows. Alternatives: gate and up as one (2I, d) weight (forward N = 2I; dgrad one GEMM over K = 2I
instead of a GEMM and an accumulating GEMM); q, k, v as one weight; the MLP
GEMMs and lm_head transposed (W x^T: cuBLAS picks its kernel per layout) or against a weight stored
transposed; the residual add in down's GEMM epilogue (addmm) against a GEMM then an add. Times are medians
of triton.testing.do_bench; TFLOP/s = 2 M N K / time; the share is of the best rate measured in the same run.
(2026-11-25, results/*-gemm-orientation.txt: no orientation or stored layout of the MLP GEMMs wins beyond
+-2%; the 8B lm_head dgrad transposed took 1.502 against 1.660 ms, the 1B one 0.783 against 0.669: left.)
"fp8:" rows: the main GEMMs in e4m3 with row / channel scales (torch._scaled_mm), for an FP8 base-GEMM plan.
"rows:" rows: lm_head chunks of LM_HEAD_ROWS rows, forward, dgrad and dgrad transposed (W^T dz^T, (d, rows)).
"pad:" rows: gate and up weights stored in (I, d + 2r) buffers, [Wg | Bg | 0] and [Wu | 0 | Bu] (r = 16), so
the dgrad GEMMs also give the rank-r products dg Bg and du Bu as 2r more output columns (no second read of
dg and du, 2 x N x I x 2 bytes a layer), at the price of leading dimensions d + 2r instead of d.
"kext:" rows: gate's weight as the head rows of an (I + 2r, d) buffer [Wg; Ag; Au] and its output as the head
columns of an (N, I + 2r) one, so the forward's GEMM also gives x [Ag; Au]^T and the dgrad takes the MLP's rank-r
term as 2r more of K ([dg | dxag | dxau], the skinny dg Bg, du Bu written into the buffer's last columns).
"order:" rows: a block's input gradient with the rank-r term last (the base GEMMs, then dxa [A_1; A_2; ...]
accumulated by a skinny GEMM that reads and writes dx, memory-bound) against the rank-r term first (it only
writes dx; the base GEMMs then accumulate with beta = 1, reading dx in their epilogue). The fast path sums
q/k/v and o rank-r first, the MLP rank-r last (H200: results/2026-12-02-h200-gemm-order.txt, 2026-12-03-*-gemm-*).
"order: qkv dx stacked" is lora_qkv's backward with RoPE inside and the weights stacked: dv copied into the
(N, q + 2 kv) buffer beside dq and dk, the rank-r term, then one base GEMM over K = q + 2 kv. "order: MLP dx
stacked" would be lora_mlp's with gate and up laid out as one weight (dg, du the halves of one (N, 2I) buffer,
which the forward's two GEMMs would write: "fwd gate, up into the halves"); tried on 2026-12-03 and not kept
(results/2026-12-03-h200-gemm-gate-up-stacked.txt, *-t4-s11-gateup.md).
BENCH_GEMM_ONLY=text,text times only the rows whose name holds one of them. BENCH_GEMM_BLAS=cublaslt makes
torch call cuBLASLt rather than cuBLAS for the whole run (PYTORCH_TUNABLEOP_ENABLED=1, every algorithm timed per
shape, was mixed on the H100: results/2026-11-25-h100-gemm-tunableop.txt, and T1 slower with it).
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from _sweep import main, median_ms  # noqa: E402

# (tokens, hidden, q out, kv out, intermediate, vocab)
MODELS = {"8b": (8192, 4096, 4096, 1024, 14336, 128256), "1b": (16384, 2048, 2048, 512, 8192, 128256)}
DTYPE = torch.bfloat16
RANK = 16
# lm_head chunk heights for the "rows:" rows. cuBLAS tiles of 192 or 256 rows leave a 1024-row chunk's last
# tile part-empty (1024 = 5.3 x 192): the 1B forward chunk ran at 648 TFLOP/s against 736 for its dgrad
# (results/2026-12-03-h200-gemm-cublas.txt).
LM_HEAD_ROWS = (768, 1024, 1152, 1536, 2048, 2304, 3072, 4096)


def _rows(n, d, q, kv, inter, vocab, device="cuda"):
    """(name, flops, fn) for each GEMM, with its operands allocated once."""
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=DTYPE)

    x, x_i = t(n, d), t(n, inter)
    w = {"q": t(q, d), "kv": t(kv, d), "o": t(d, q), "gate": t(inter, d), "down": t(d, inter)}
    w_gu, w_qkv = t(2 * inter, d), t(q + 2 * kv, d)
    dy = {"q": t(n, q), "kv": t(n, kv), "gate": t(n, inter), "gu": t(n, 2 * inter), "qkv": t(n, q + 2 * kv),
          "d": t(n, d)}
    dx = t(n, d)
    h, head, dz = t(1024, d), t(vocab, d), t(1024, vocab)
    chunks = {m: (t(m, d), t(m, vocab)) for m in LM_HEAD_ROWS}  # (h, dz) per chunk height
    w_gate_t, w_down_t = w["gate"].t().contiguous(), w["down"].t().contiguous()  # (d, I), (I, d)
    pad_g, pad_u, out_pad = t(inter, d + 2 * RANK), t(inter, d + 2 * RANK), t(n, d + 2 * RANK)
    b_g = t(inter, RANK)
    dxa2, a2, dxa3, a3 = t(n, 2 * RANK), t(2 * RANK, d), t(n, 3 * RANK), t(3 * RANK, d)
    dxa1, a_o = t(n, RANK), t(RANK, q)
    gu_out = t(n, 2 * inter)
    g_ext, w_ext = t(n, inter + 2 * RANK), t(inter + 2 * RANK, d)  # [dg | dxag | dxau], [Wg; Ag; Au]

    def mlp_dx(rank_first: bool):
        out = torch.mm(dxa2, a2) if rank_first else torch.mm(dy["gate"], w["gate"])
        out.addmm_(dy["gate"], w["gate"])
        out.addmm_(*((dy["gate"], w["gate"]) if rank_first else (dxa2, a2)))
        return out

    def mlp_dx_stacked(rank_first: bool):  # lora_mlp with gate/up laid out as one weight: one GEMM over K = 2I
        if rank_first:
            return torch.mm(dxa2, a2).addmm_(dy["gu"], w_gu)
        return torch.mm(dy["gu"], w_gu).addmm_(dxa2, a2)

    def gate_up_halves():  # lora_mlp's forward then: two GEMMs writing the halves of one (N, 2I) buffer
        torch.mm(x, w_gu[:inter].t(), out=gu_out[:, :inter])
        return torch.mm(x, w_gu[inter:].t(), out=gu_out[:, inter:])

    def qkv_dx(rank_first: bool):
        out = torch.mm(dxa3, a3) if rank_first else torch.mm(dy["q"], w["q"])
        out.addmm_(dy["kv"], w["kv"])
        out.addmm_(dy["kv"], w["kv"])
        out.addmm_(*((dy["q"], w["q"]) if rank_first else (dxa3, a3)))
        return out

    def qkv_dx_stacked():  # lora_qkv with RoPE inside: dv copied beside RoPE's dq, dk; one base GEMM over K
        dy["qkv"][:, q + kv:].copy_(dy["kv"])
        return torch.mm(dxa3, a3).addmm_(dy["qkv"], w_qkv)

    def o_dx(rank_first: bool):
        out = torch.mm(dxa1, a_o) if rank_first else torch.mm(dy["d"], w["o"])  # (N, q)
        out.addmm_(*((dy["d"], w["o"]) if rank_first else (dxa1, a_o)))
        return out

    def mlp_dx_kext():  # the rank-r term as 2r more K of gate's dgrad: no pass of its own over dx
        return torch.mm(g_ext, w_ext).addmm_(dy["gate"], w["gate"])

    def gate_fwd_now():  # gate's base GEMM and the stacked x [Ag; Au]^T, two GEMMs
        return torch.mm(x, w["gate"].t()), torch.mm(x, a2.t())

    mlp_flops = 4 * n * inter * d + 2 * n * 2 * RANK * d
    qkv_flops = 2 * n * (q + 2 * kv) * d + 2 * n * 3 * RANK * d
    o_flops = 2 * n * d * q + 2 * n * RANK * q
    rows = [
        ("fwd q  x Wq^T", 2 * n * d * q, lambda: torch.mm(x, w["q"].t())),
        ("fwd k/v  x Wk^T", 2 * n * d * kv, lambda: torch.mm(x, w["kv"].t())),
        ("fwd o  a Wo^T", 2 * n * q * d, lambda: torch.mm(dy["q"], w["o"].t())),
        ("fwd gate/up  x Wg^T", 2 * n * d * inter, lambda: torch.mm(x, w["gate"].t())),
        ("fwd down  h Wd^T", 2 * n * inter * d, lambda: torch.mm(x_i, w["down"].t())),
        ("dgrad q  dq Wq", 2 * n * q * d, lambda: torch.mm(dy["q"], w["q"])),
        ("dgrad k/v accumulate  dx += dk Wk", 2 * n * kv * d, lambda: dx.addmm_(dy["kv"], w["kv"])),
        ("dgrad o  do Wo", 2 * n * d * q, lambda: torch.mm(dy["d"], w["o"])),
        ("dgrad down  dy Wd", 2 * n * d * inter, lambda: torch.mm(dy["d"], w["down"])),
        ("dgrad gate  dg Wg", 2 * n * inter * d, lambda: torch.mm(dy["gate"], w["gate"])),
        ("dgrad up accumulate  dx += du Wu", 2 * n * inter * d, lambda: dx.addmm_(dy["gate"], w["gate"])),
        ("lm_head chunk  h W^T", 2 * 1024 * d * vocab, lambda: torch.mm(h, head.t())),
        ("lm_head chunk dgrad  dz W", 2 * 1024 * vocab * d, lambda: torch.mm(dz, head)),
        ("alt: fwd gate+up stacked  x [Wg;Wu]^T", 4 * n * d * inter, lambda: torch.mm(x, w_gu.t())),
        ("alt: dgrad gate+up stacked  [dg du] [Wg;Wu]", 4 * n * inter * d, lambda: torch.mm(dy["gu"], w_gu)),
        ("alt: fwd q+k+v stacked", 2 * n * d * (q + 2 * kv), lambda: torch.mm(x, w_qkv.t())),
        ("as now: fwd down, then residual add", 2 * n * inter * d, lambda: torch.add(dx, torch.mm(x_i, w["down"].t()))),
        ("alt: fwd down + residual in the epilogue", 2 * n * inter * d, lambda: torch.addmm(dx, x_i, w["down"].t())),
        ("alt: dgrad q+k+v stacked", 2 * n * (q + 2 * kv) * d, lambda: torch.mm(dy["qkv"], w_qkv)),
        # The MLP GEMMs in the other orientation (the transposed product: cuBLAS picks its kernel per layout)
        # and against a weight stored transposed.
        ("alt: fwd gate transposed  Wg x^T", 2 * n * d * inter, lambda: torch.mm(w["gate"], x.t())),
        ("alt: fwd gate, W^T stored  x (Wg^T)", 2 * n * d * inter, lambda: torch.mm(x, w_gate_t)),
        ("alt: fwd down transposed  Wd h^T", 2 * n * inter * d, lambda: torch.mm(w["down"], x_i.t())),
        ("alt: fwd down, W^T stored", 2 * n * inter * d, lambda: torch.mm(x_i, w_down_t)),
        ("alt: dgrad gate transposed  Wg^T dg^T", 2 * n * inter * d, lambda: torch.mm(w["gate"].t(), dy["gate"].t())),
        ("alt: dgrad gate, W^T stored", 2 * n * inter * d, lambda: torch.mm(dy["gate"], w_gate_t.t())),
        ("alt: dgrad down transposed  Wd^T dy^T", 2 * n * d * inter, lambda: torch.mm(w["down"].t(), dy["d"].t())),
        ("alt: dgrad down, W^T stored", 2 * n * d * inter, lambda: torch.mm(dy["d"], w_down_t.t())),
        ("alt: fwd q transposed  Wq x^T", 2 * n * d * q, lambda: torch.mm(w["q"], x.t())),
        ("alt: lm_head chunk transposed  W h^T", 2 * 1024 * d * vocab, lambda: torch.mm(head, h.t())),
        ("alt: lm_head chunk dgrad transposed  W^T dz^T", 2 * 1024 * vocab * d, lambda: torch.mm(head.t(), dz.t())),
        ("pad: as now  dg Bg, then du Bu (rank-r reads)", 4 * n * inter * RANK,
         lambda: (torch.mm(dy["gate"], b_g), torch.mm(dy["gate"], b_g))),
        ("pad: fwd gate from the padded weight", 2 * n * d * inter, lambda: torch.mm(x, pad_g[:, :d].t())),
        ("pad: dgrad gate  dg [Wg|Bg|0]", 2 * n * inter * (d + 2 * RANK), lambda: torch.mm(dy["gate"], pad_g,
                                                                                        out=out_pad)),
        ("pad: dgrad up accumulate  += du [Wu|0|Bu]", 2 * n * inter * (d + 2 * RANK),
         lambda: out_pad.addmm_(dy["gate"], pad_u)),
        ("order: MLP dx rank-r last  dg Wg, += du Wu, += dxa A", mlp_flops, lambda: mlp_dx(False)),
        ("order: MLP dx rank-r first  dxa A, += dg Wg, += du Wu", mlp_flops, lambda: mlp_dx(True)),
        ("order: qkv dx rank-r last  dq Wq, += dk Wk, dv Wv, dxa A", qkv_flops, lambda: qkv_dx(False)),
        ("order: qkv dx rank-r first", qkv_flops, lambda: qkv_dx(True)),
        ("order: qkv dx stacked  dv copied, dxa A, += [dq dk dv] [Wq;Wk;Wv]", qkv_flops, qkv_dx_stacked),
        ("order: MLP dx stacked rank-r last  [dg du] [Wg;Wu], += dxa A", mlp_flops, lambda: mlp_dx_stacked(False)),
        ("order: MLP dx stacked rank-r first", mlp_flops, lambda: mlp_dx_stacked(True)),
        ("fwd gate, up into the halves of one (N, 2I) buffer", 4 * n * d * inter, gate_up_halves),
        ("fwd gate, up as two GEMMs", 4 * n * d * inter,
         lambda: (torch.mm(x, w["gate"].t()), torch.mm(x, w["gate"].t()))),
        ("alt: fwd q+k stacked  x [Wq;Wk]^T", 2 * n * d * (q + kv), lambda: torch.mm(x, w_qkv[:q + kv].t())),
        ("kext: MLP dx  [dg|dxa] [Wg;Ag;Au], += du Wu", mlp_flops, mlp_dx_kext),
        ("kext: fwd gate as now  x Wg^T, x [Ag;Au]^T", 2 * n * d * (inter + 2 * RANK), gate_fwd_now),
        ("kext: fwd gate  x [Wg;Ag;Au]^T", 2 * n * d * (inter + 2 * RANK), lambda: torch.mm(x, w_ext.t())),
        ("kext: dg Bg into the buffer's columns", 2 * n * inter * RANK,
         lambda: torch.mm(g_ext[:, :inter], b_g, out=g_ext[:, inter:inter + RANK])),
        ("order: o dx rank-r last  do Wo, += dxa Ao", o_flops, lambda: o_dx(False)),
        ("order: o dx rank-r first", o_flops, lambda: o_dx(True)),
    ]
    for m, (hm, dzm) in chunks.items():  # default args: each lambda keeps its own chunk
        rows += [(f"rows: lm_head {m:>4} rows  h W^T", 2 * m * d * vocab, lambda hm=hm: torch.mm(hm, head.t())),
                 (f"rows: lm_head {m:>4} rows dgrad  dz W", 2 * m * vocab * d, lambda dzm=dzm: torch.mm(dzm, head)),
                 (f"rows: lm_head {m:>4} rows dgrad transposed", 2 * m * vocab * d,
                  lambda dzm=dzm: torch.mm(head.t(), dzm.t()))]
    rows += _fp8_rows(x, x_i, w, dy, h, head, dz)
    only = [x for x in os.environ.get("BENCH_GEMM_ONLY", "").split(",") if x]
    return [r for r in rows if not only or any(x in r[0] for x in only)]


def _fp8_rowwise(t: torch.Tensor):
    """t (M, K) -> (e4m3 (M, K), fp32 (M, 1) scales): each row scaled so its largest |value| is e4m3's 448."""
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return (t / scale).to(torch.float8_e4m3fn), scale


def _fp8_rows(x, x_i, w, dy, h, head, dz):
    """"fp8:" rows: the same GEMMs with e4m3 operands scaled per row (activations, output gradients) and per
    output or input channel (the frozen weights, quantized once, W and W^T each), through torch._scaled_mm
    into bf16; and what quantizing an activation's rows costs (amax, scale, cast: torch ops)."""
    def mm(a, wt, n_out):  # a (M, K) bf16, wt (N, K): y = a wt^T
        a8, sa = _fp8_rowwise(a)
        w8, sw = _fp8_rowwise(wt)
        return (2 * a.shape[0] * a.shape[1] * n_out,
                lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw.t(), out_dtype=DTYPE))

    cases = [("fwd q  x Wq^T", x, w["q"]), ("fwd k/v", x, w["kv"]), ("fwd o", dy["q"], w["o"]),
             ("fwd gate/up", x, w["gate"]), ("fwd down", x_i, w["down"]),
             ("dgrad q  dq Wq", dy["q"], w["q"].t().contiguous()),
             ("dgrad down  dy Wd", dy["d"], w["down"].t().contiguous()),
             ("dgrad gate  dg Wg", dy["gate"], w["gate"].t().contiguous()), ("lm_head chunk", h, head),
             ("lm_head chunk dgrad", dz, head.t().contiguous())]
    rows = []
    for label, a, wt in cases:
        flops, fn = mm(a, wt, wt.shape[0])
        ref = a.float() @ wt.float().t()
        err = ((fn().float() - ref).norm() / ref.norm()).item()  # against the fp32 product of the bf16 operands
        rows.append((f"fp8: {label} (rel err {err:.1e})", flops, fn))
    rows.append(("fp8: quantize x rows (N, d) (torch ops; no GEMM: 0 FLOPs)", 0, lambda: _fp8_rowwise(x)))
    return rows


def bench_shape(name: str, *shape) -> dict:
    out = {"shape": name, "dims": dict(zip(("tokens", "hidden", "q", "kv", "intermediate", "vocab"), shape)),
           "gemms": []}
    for label, flops, fn in _rows(*shape):
        ms = median_ms(fn)
        out["gemms"].append({"gemm": label, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)})
    best = max(g["tflops"] for g in out["gemms"])
    for g in out["gemms"]:
        g["share_of_best"] = round(g["tflops"] / best, 3)
    return out


def report(r: dict) -> None:
    print(f"{r['shape']}: {r['dims']}")
    for g in r["gemms"]:
        print(f"  {g['gemm']:<45} {g['ms']:8.3f} ms {g['tflops']:7.1f} TFLOP/s ({g['share_of_best']:.0%})")


if __name__ == "__main__":
    if os.environ.get("BENCH_GEMM_BLAS"):  # "cublas" or "cublaslt": which library torch's mm calls
        torch.backends.cuda.preferred_blas_library(os.environ["BENCH_GEMM_BLAS"])
    main(__doc__, MODELS, bench_shape, report)
