"""Whether the gated MLP's input-gradient GEMMs can give the adapters' rank-r products for free.

The fast path's backward (kernels/lora_mlp.py) runs dx = dg Wg + du Wu (two cuBLAS GEMMs, the second adding)
and then dg Bg and du Bu, two skinny GEMMs that read dg and du (N, I) again only for an (N, r) result: ~69 us
each on the H200 at T4's shape (results/2026-12-04-h200-t4-s19-profile-ppalli-1.txt, 2.2 ms a step). With
each base weight held as a view of a wider buffer, [Wg | sg Bg | 0] and [Wu | 0 | su Bu] (I, d + 2r), the same
two GEMMs write (N, d + 2r): dx and both products, dg and du read once. Timed here, per shape:

    now:      mm(dg, Wg); addmm_(du, Wu); mm(dg, Bg); mm(du, Bu)
    wide:     mm(dg, Wg_wide); addmm_(du, Wu_wide)                  (N, d + 2r) out
    wide64:   the same with the extra columns padded to 64
and the forward GEMM x Wg^T with Wg contiguous against Wg a view of the wide buffer (its rows strided).

    python benchmarks/bench_dgrad_ext.py --out benchmarks/results/dgrad-ext.json

H100 80GB HBM3, 2026-12-05 (results/2026-12-05-h100-dgrad-ext.txt): the backward side pays at 1B (1.542 -> 1.459
ms) and, padded to 64 columns, at 8B (2.802 -> 2.625; 2r alone 2.810), but the forward GEMM through the strided
view costs more (1B 0.778 -> 0.806 ms, 8B 1.231 -> 1.381 / 1.428, twice a layer): a net loss at 8B, ~0.02 ms a
layer at 1B. The fast path's version (ppalli/kernels/lora_wide.py, 4348ee9) was reverted; this stays to time it
again (e.g. with a forward that does not read the weight through the view).

The same weights read whole in the forward (182ff90, reverted): x handed over as the leading columns of
an (N, d + 64) buffer whose last columns the RMSNorm before the MLP wrote as zeros, so x_pad [Wg | sg Bg | 0]^T is
a compact GEMM over K = d + 64; every gradient matched PEFT's (CPU, and the H100's GPU tests). The fused MLP
block's forward + backward on the H100 (2026-12-05, results/2026-12-05-h100-dgrad-block.json): 8B 9.139 ms
against 9.113 compact, 1B 5.672 against 5.635. No gain: not kept. Stored transposed instead ("wideT" rows,
(d + p, I)), the forward becomes an NN GEMM: 1.32-1.43 ms against 1.27-1.29 (results/2026-12-05-h100-dgrad-ext-t.json).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sweep import main, median_ms, rel_err  # noqa: E402

SHAPES = {"1b": (16384, 2048, 8192), "8b": (8192, 4096, 14336)}  # (N tokens, d, I): T4's and T1's MLP
RANK = 16


def _wide(w: torch.Tensor, b: torch.Tensor, slot: int, extra: int) -> torch.Tensor:
    """(I, d + extra) buffer holding w (I, d) and b (I, r) at columns d + slot * r; zeros elsewhere."""
    i, d = w.shape
    out = torch.zeros(i, d + extra, device=w.device, dtype=w.dtype)
    out[:, :d] = w
    out[:, d + slot * RANK:d + (slot + 1) * RANK] = b
    return out


def bench_shape(name: str, n: int, d: int, i: int) -> dict:
    def t(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

    dg, du, x = t(n, i), t(n, i), t(n, d)
    wg, wu, bg, bu = t(i, d, scale=0.02), t(i, d, scale=0.02), t(i, RANK, scale=0.1), t(i, RANK, scale=0.1)
    out = {"shape": name, "n": n, "d": d, "i": i}

    def now():
        dx = torch.mm(dg, wg)
        dx.addmm_(du, wu)
        return dx, torch.mm(dg, bg), torch.mm(du, bu)

    out["now_ms"] = round(median_ms(now), 4)
    out["now_gemms_only_ms"] = round(median_ms(lambda: torch.mm(dg, wg).addmm_(du, wu)), 4)
    out["now_rank_r_ms"] = round(median_ms(lambda: (torch.mm(dg, bg), torch.mm(du, bu))), 4)
    ref = now()
    for label, extra in (("wide", 2 * RANK), ("wide64", 64)):
        wg_w, wu_w = _wide(wg, bg, 0, extra), _wide(wu, bu, 1, extra)

        def wide(wg_w=wg_w, wu_w=wu_w):
            return torch.mm(dg, wg_w).addmm_(du, wu_w)

        got = wide()
        err = max(((got[:, :d] - ref[0]).float().norm() / ref[0].float().norm()).item(),
                  ((got[:, d:d + RANK] - ref[1]).float().norm() / ref[1].float().norm()).item(),
                  ((got[:, d + RANK:d + 2 * RANK] - ref[2]).float().norm() / ref[2].float().norm()).item())
        out[f"{label}_ms"] = round(median_ms(wide), 4)
        out[f"{label}_rel_err"] = float(f"{err:.2e}")
        out[f"{label}_fwd_view_ms"] = round(median_ms(lambda wg_w=wg_w: torch.mm(x, wg_w[:, :d].t())), 4)
        out[f"{label}_dx_copy_ms"] = round(median_ms(lambda got=got: got[:, :d].contiguous()), 4)
    out["fwd_contiguous_ms"] = round(median_ms(lambda: torch.mm(x, wg.t())), 4)
    a_stack = t(2 * RANK, d, scale=0.02)
    dx_c = ref[0].clone()
    out["rank_r_into_dx_ms"] = round(median_ms(lambda: dx_c.addmm_(torch.cat(ref[1:], 1), a_stack)), 4)
    for extra in (64, 128):  # transposed buffers (d + extra, I): the forward reads a compact (d, I) row block
        label = f"wideT{extra}"
        tg, tu = _wide_t(wg, bg, 0, extra), _wide_t(wu, bu, 1, extra)

        def wide_t(tg=tg, tu=tu):
            return torch.mm(dg, tg.t()).addmm_(du, tu.t())

        got = wide_t()
        out[f"{label}_ms"] = round(median_ms(wide_t), 4)
        out[f"{label}_rel_err"] = rel_err((got[:, :d], got[:, d:d + RANK], got[:, d + RANK:d + 2 * RANK]), ref)
        out[f"{label}_fwd_ms"] = round(median_ms(lambda tg=tg: torch.mm(x, tg[:d])), 4)
        dxs, dxa = got[:, :d], got[:, d:d + 2 * RANK].clone()
        out[f"{label}_rank_r_into_dx_ms"] = round(median_ms(lambda dxs=dxs, dxa=dxa: dxs.addmm_(dxa, a_stack)), 4)
    return out


def _wide_t(w: torch.Tensor, b: torch.Tensor, slot: int, extra: int) -> torch.Tensor:
    """(d + extra, I) buffer holding w^T (d, I) and b^T (r, I) at rows d + slot * r; zeros elsewhere."""
    i, d = w.shape
    out = torch.zeros(d + extra, i, device=w.device, dtype=w.dtype)
    out[:d] = w.t()
    out[d + slot * RANK:d + (slot + 1) * RANK] = b.t()
    return out


def report(r: dict) -> None:
    print(f"{r['shape']} (N {r['n']}, d {r['d']}, I {r['i']}): now {r['now_ms']} ms (GEMMs {r['now_gemms_only_ms']}, "
          f"rank-r {r['now_rank_r_ms']}); forward GEMM contiguous {r['fwd_contiguous_ms']}")
    for label in ("wide", "wide64"):
        print(f"  {label}: {r[label + '_ms']} ms (rel err {r[label + '_rel_err']}), forward through the view "
              f"{r[label + '_fwd_view_ms']} ms, dx made contiguous {r[label + '_dx_copy_ms']} ms")
    print(f"  rank-r addmm_ into a compact dx {r['rank_r_into_dx_ms']} ms")
    for label in ("wideT64", "wideT128"):
        print(f"  {label}: {r[label + '_ms']} ms (rel err {r[label + '_rel_err']}), forward x (d, I) rows "
              f"{r[label + '_fwd_ms']} ms, rank-r addmm_ into the strided dx {r[label + '_rank_r_into_dx_ms']} ms")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
