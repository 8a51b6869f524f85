"""flash-attn 4's SM90 launch configurations on one attention shape: forward and backward, each variant
against the one FA4 picks itself, timed on this GPU and checked against the default's outputs.

Why: on T1 (Llama-3.1-8B, 4 x 2048, H100) FA4's kernels take ~41 ms of a 460 ms step (forward 306 us,
backward 780 us + 96 us preprocess + 3 x 36 us postprocess a layer, `*-h100-t1-s31-profile-ppalli.txt`),
~450 TFLOP/s where FA3's C++ kernels report more. FA4 picks its SM90 tiles from FA3's table
(`flash_attn.cute.config.select_sm90_tile` / `select_sm90_bwd_tile`); this asks whether another tile,
swap or stage count is faster on the shapes ppalli trains, before anything in ppalli passes one.

    python benchmarks/bench_fa4_configs.py --out results.json [--batch 4 --seq 2048 --heads 32 --kv-heads 8]

Each variant is compiled at its first call (CuTe DSL), then timed over --reps calls between CUDA events
(median of --rounds rounds). A variant FA4 rejects (its validate_*_config) is listed with the reason.
--budget-s stops starting new variants after that many seconds, keeping what was measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

# (name, fields replaced in the default config); hdim 128 causal defaults on SM90 (FA4 4.0.0b40):
# forward 128 x 128, P@V from registers, intra-warpgroup overlap; backward 64 x 128, SdP swapped,
# 2 Q / dO / PdS stages, atom layouts (1, 2, 1), 3 x 128 threads.
FWD_VARIANTS = [
    ("tile_n 176", dict(tile_n=176)),
    ("tile_n 160", dict(tile_n=160)),
    ("tile_n 144", dict(tile_n=144)),
    ("tile_n 112", dict(tile_n=112)),
    ("tile_n 96", dict(tile_n=96)),
    ("P@V from smem", dict(mma_pv_is_rs=False)),
    ("no intra-wg overlap", dict(intra_wg_overlap=False)),
    ("pack_gqa flipped", "pack_gqa"),
    ("static persistent flipped", "is_static_persistent"),
    ("tma O flipped", "use_tma_o"),
]
BWD_VARIANTS = [
    ("tile_m 80, dQ swapped", dict(tile_m=80, dQ_swapAB=True)),
    ("dQ swapped", dict(dQ_swapAB=True)),
    ("dQ swapped, dQ atoms 2", dict(dQ_swapAB=True, AtomLayoutMdQ=2)),
    ("SdP not swapped", dict(SdP_swapAB=False)),
    ("SdP not swapped, SdP atoms 2", dict(SdP_swapAB=False, AtomLayoutMSdP=2)),
    ("dKV swapped, dKV atoms 1", dict(dKV_swapAB=True, AtomLayoutNdKV=1)),
    ("PdS 1 stage", dict(num_stages_PdS=1)),
    ("V in registers", dict(V_in_regs=True)),
    ("spt flipped", "spt"),
    ("tile_n 96", dict(tile_n=96)),
    ("tile_m 80, dQ swapped, dQ atoms 2", dict(tile_m=80, dQ_swapAB=True, AtomLayoutMdQ=2)),
]


def _captured(module, name: str, store: list):
    """Wrap module.name so the config it returns is kept (restored by the caller)."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        store.append(original(*args, **kwargs))
        return store[-1]

    setattr(module, name, wrapper)
    return original


def _variant(default, change):
    if isinstance(change, str):  # a bool field flipped
        return dataclasses.replace(default, **{change: not getattr(default, change)})
    return dataclasses.replace(default, **change)


def _time(fn, reps: int, rounds: int) -> float:
    """Median over rounds of the mean ms a call, between CUDA events."""
    per_round = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        per_round.append(start.elapsed_time(end) / reps)
    return statistics.median(per_round)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--which", default="fwd,bwd")
    parser.add_argument("--budget-s", type=float, default=400.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    from flash_attn.cute import interface

    b, t, hq, hk, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, t, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, t, hk, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(b, t, hk, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    dout = torch.randn(b, t, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    flops_fwd = 4 * b * hq * d * t * t / 2  # causal: half the score matrix
    started = time.perf_counter()
    rows: list[dict] = []
    meta = {"shape": [b, t, hq, hk, d], "device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save():
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)

    def fwd(config=None):
        return interface._flash_attn_fwd(q, k, v, causal=True, return_lse=True, config=config)

    fwd_configs: list = []
    original = _captured(interface, "select_fwd_config", fwd_configs)
    try:
        out, lse = fwd()[:2]
    finally:
        interface.select_fwd_config = original
    fwd_default = fwd_configs[-1]
    bwd_configs: list = []
    original = _captured(interface, "select_bwd_config", bwd_configs)
    try:
        ref = interface._flash_attn_bwd(q, k, v, out, dout, lse, causal=True)[:3]
    finally:
        interface.select_bwd_config = original
    bwd_default = bwd_configs[-1]
    meta["fwd_default"] = repr(fwd_default)
    meta["bwd_default"] = repr(bwd_default)
    print("fwd default:", fwd_default, "\nbwd default:", bwd_default, flush=True)

    def run(kind: str, name: str, config):
        if time.perf_counter() - started > args.budget_s:
            print(f"{kind} {name}: skipped (budget)", flush=True)
            return
        row = {"kind": kind, "variant": name, "config": repr(config)}
        try:
            t0 = time.perf_counter()
            if kind == "fwd":
                got = fwd(config)[0]
                row["max_rel_err"] = _max_rel(got, out)
                call = lambda: fwd(config)  # noqa: E731
                flops = flops_fwd
            else:
                got = interface._flash_attn_bwd(q, k, v, out, dout, lse, causal=True, config=config)[:3]
                row["max_rel_err"] = max(_max_rel(x, y) for x, y in zip(got, ref))
                call = lambda: interface._flash_attn_bwd(q, k, v, out, dout, lse, causal=True, config=config)  # noqa: E731
                flops = 2.5 * flops_fwd
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            call()
            row["ms"] = _time(call, args.reps, args.rounds)
            row["tflops"] = flops / row["ms"] / 1e9
        except (ValueError, AssertionError, RuntimeError, TypeError) as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        rows.append(row)
        save()
        shown = (f"{row['ms']:.4f} ms, {row['tflops']:.0f} TFLOP/s, err {row['max_rel_err']:.1e}, "
                 f"first call {row['first_call_s']} s" if "ms" in row else row["error"])
        print(f"{kind} {name}: {shown}", flush=True)

    which = args.which.split(",")
    if "fwd" in which:
        run("fwd", "default", None)
        for name, change in FWD_VARIANTS:
            run("fwd", name, _variant(fwd_default, change))
    if "bwd" in which:
        run("bwd", "default", None)
        for name, change in BWD_VARIANTS:
            run("bwd", name, _variant(bwd_default, change))
        run("bwd", "default again", None)
    if "fwd" in which:
        run("fwd", "default again", None)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
