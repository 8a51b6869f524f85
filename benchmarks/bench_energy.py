"""Energy per call of a LoRA step's kernel kinds at T1's shapes, read from the GPU's own energy counter.

    python benchmarks/bench_energy.py --out benchmarks/results/energy.json [--profile T1_PROFILE.txt]

Why: T1 (Llama-3.1-8B, 4x2048) runs at the H100's 700 W cap in every timed step, and its speed against
Unsloth's followed the ratio of energy per token (2026-12-05/06 summaries), so a step is as short as its joules
allow. Which kernels those joules go to decides what a change can still win: a memory-bound pass taken out
saves its joules, not its time. Each row runs one kind of kernel back to back for SECONDS after a warm-up of as
long, and reads NVML's total energy counter (mJ) around the loop: mJ a call, mean W, and per unit (J a TFLOP
for GEMMs, J a GB moved for the memory-bound passes). "idle" is the card's draw with nothing queued.

With --profile (a T1 profile from peers.py --profile, whose census lists each kernel's ms a step), the step's
kernels are grouped by kind and each group's ms is priced at its kind's mean W measured here: a model of where
the step's joules go, printed beside the step energy it implies.
Shapes: tokens N 8192, hidden 4096, intermediate 14336, 32 query heads and 8 kv heads of 128, bf16, rank 16.
"""

import argparse
import ctypes
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from ppalli.kernels import lora_glu as lora_glu_module  # noqa: E402
from ppalli.kernels.lora_glu import lora_glu_bwd, lora_glu_fwd, lora_glu_fwd_had  # noqa: E402

N, D, INTER, HQ, HK, HD, RANK, S = 8192, 4096, 14336, 32, 8, 128, 16, 2.0
SECONDS = 2.0


class Energy:
    """NVML's total energy counter of the card torch uses (mJ since the driver loaded), through ctypes."""

    def __init__(self):
        self.nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if self.nvml.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit_v2 failed")
        self.handle = ctypes.c_void_p()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]  # NVML counts every card
        index = int(visible) if visible.isdigit() else 0
        rc = self.nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(self.handle))
        if rc != 0:
            raise RuntimeError(f"no NVML handle for the CUDA device (rc {rc})")

    def mj(self) -> int:
        value = ctypes.c_ulonglong()
        if self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(value)) != 0:
            raise RuntimeError("nvmlDeviceGetTotalEnergyConsumption failed (the card may not report energy)")
        return value.value


def measure(energy: Energy, fn: Callable, seconds: float = SECONDS) -> dict:
    """fn back to back: a warm-up of `seconds`, then as many calls as fill `seconds`; ms and mJ a call, mean W."""
    def loop(limit: float) -> tuple[int, float]:
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < limit:  # the host queues ahead; the sync below closes the window
            fn()
            n += 1
        return n, t0

    loop(seconds)
    torch.cuda.synchronize()
    e0 = energy.mj()
    n, t0 = loop(seconds)
    torch.cuda.synchronize()
    wall, e1 = time.perf_counter() - t0, energy.mj()
    return {"calls": n, "ms": round(1e3 * wall / n, 4), "mj": round((e1 - e0) / n, 3),
            "watts": round((e1 - e0) / 1e3 / wall, 1)}


def idle(energy: Energy, seconds: float = SECONDS) -> dict:
    torch.cuda.synchronize()
    time.sleep(seconds / 2)
    e0, t0 = energy.mj(), time.perf_counter()
    time.sleep(seconds)
    return {"watts": round((energy.mj() - e0) / 1e3 / (time.perf_counter() - t0), 1)}


def exact_math(fn: Callable) -> Callable:
    """fn with lora_glu's kernels on tl.sigmoid / exp-and-divide tanh instead of the PTX approximations
    (_utils.fast_math): what those approximations save in joules."""
    def run():
        fast, lora_glu_module.fast_math = lora_glu_module.fast_math, lambda: False
        try:
            fn()
        finally:
            lora_glu_module.fast_math = fast
    return run


def rows() -> list[tuple[str, str, float, Callable]]:
    """(name, kind, units a call, fn): units are TFLOP for kind gemm/attention, GB moved for kind memory and
    variant (a pass the step does not run as such: left out of the watts that --profile prices with)."""
    def t(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

    x, dy, wg, wd, wq = t(N, D), t(N, D), t(INTER, D, scale=0.02), t(D, INTER, scale=0.02), t(D, D, scale=0.02)
    g0, u0, dh0 = t(N, INTER), t(N, INTER), t(N, INTER)
    xag, xau, dxad = t(N, RANK), t(N, RANK), t(N, RANK)
    bg, bu, ad = t(INTER, RANK, scale=0.1), t(INTER, RANK, scale=0.1), t(RANK, INTER, scale=0.1)
    g1, u1 = g0.clone(), u0.clone()  # lora_glu_bwd writes dg, du over these: its own, so g0's values stay randn
    dst, big = torch.empty_like(g0), torch.empty_like(g0)
    q = t(4, HQ, 2048, HD).requires_grad_()
    k, v = t(4, HK, 2048, HD).requires_grad_(), t(4, HK, 2048, HD).requires_grad_()
    do = t(4, HQ, 2048, HD)
    mlp_tf = 2 * N * D * INTER / 1e12
    attn_tf = 4 * 4 * HQ * 2048 * 2048 * HD / 2 / 1e12  # causal forward: 2 GEMMs of half the (s, s) square

    def attention():  # gradients returned, not accumulated: no extra pass over q's
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.autograd.grad(o, (q, k, v), do)

    sums = (True, True, True)
    return [
        ("gemm gate fwd x Wg^T (8192x4096 @ 4096x14336)", "gemm", mlp_tf, lambda: torch.mm(x, wg.t(), out=big)),
        ("gemm down dgrad dy Wd (8192x4096 @ 4096x14336)", "gemm", mlp_tf, lambda: torch.mm(dy, wd, out=big)),
        ("gemm down fwd h Wd^T (8192x14336 @ 14336x4096)", "gemm", mlp_tf, lambda: torch.mm(g0, wd.t())),
        ("gemm q fwd x Wq^T (8192x4096 @ 4096x4096)", "gemm", 2 * N * D * D / 1e12, lambda: torch.mm(x, wq.t())),
        ("copy (8192, 14336) bf16", "memory", 2 * N * INTER * 2 / 1e9, lambda: dst.copy_(g0)),
        ("lora_glu_fwd_had (3 passes of (N, I))", "memory", 3 * N * INTER * 2 / 1e9,
         lambda: lora_glu_fwd_had(g0, u0, xag, bg, S, xau, bu, S, ad)),
        ("lora_glu_bwd with sums (5 passes of (N, I))", "memory", 5 * N * INTER * 2 / 1e9,
         lambda: lora_glu_bwd(dh0, g1, u1, xag, bg, S, xau, bu, S, dxad, ad, sums=sums)),
        # The same passes without the rank-r sums inside (the fast path runs the ones above): what the sums'
        # tl.dot tiles and their layout changes cost in joules, beside what they save in bytes.
        ("lora_glu_fwd, no h Ad^T sum (3 passes)", "variant", 3 * N * INTER * 2 / 1e9,
         lambda: lora_glu_fwd(g0, u0, xag, bg, S, xau, bu, S)),
        ("lora_glu_bwd, no sums (5 passes)", "variant", 5 * N * INTER * 2 / 1e9,
         lambda: lora_glu_bwd(dh0, g1, u1, xag, bg, S, xau, bu, S, dxad, ad)),
        ("lora_glu_fwd_had, exact sigmoid (3 passes)", "variant", 3 * N * INTER * 2 / 1e9,
         exact_math(lambda: lora_glu_fwd_had(g0, u0, xag, bg, S, xau, bu, S, ad))),
        ("lora_glu_bwd with sums, exact sigmoid (5 passes)", "variant", 5 * N * INTER * 2 / 1e9,
         exact_math(lambda: lora_glu_bwd(dh0, g1, u1, xag, bg, S, xau, bu, S, dxad, ad, sums=sums))),
        ("skinny dg Bg (8192x14336 @ 14336x16)", "memory", N * INTER * 2 / 1e9, lambda: torch.mm(g0, bg)),
        ("sdpa causal fwd+bwd (4, 32/8 heads, 2048, 128)", "attention", 3.5 * attn_tf, attention),
    ]


# Census names -> kind, for --profile: the first pattern a kernel's name matches.
KINDS = (("gemm", r"^nvjet_sm90_tst_(256|320|128)x(128|256)"), ("attention", r"flash|fmha|sdpa|cudnn_generated"),
         ("gemm-skinny", r"^nvjet|splitK|cutlass"), ("memory", r"."))


def price_profile(path: Path, watts: dict[str, float]) -> dict:
    """The profile's census (ms a step by kernel) grouped by kind, each group's ms at its kind's mean W."""
    text = path.read_text(encoding="utf-8").split("device kernels a step")[1].split("\n\n")[0]
    groups: dict[str, float] = {}
    for line in text.splitlines()[1:]:
        m = re.match(r"\s*[\d.]+\s+([\d.]+)\s+(.*)", line)
        if m:
            kind = next(k for k, pattern in KINDS if re.search(pattern, m.group(2)))
            groups[kind] = groups.get(kind, 0.0) + float(m.group(1))
    rate = {"gemm": watts["gemm"], "attention": watts["attention"], "gemm-skinny": watts["memory"],
            "memory": watts["memory"]}
    out = {k: {"ms": round(ms, 2), "joules": round(ms * rate[k] / 1e3, 2)} for k, ms in groups.items()}
    total = sum(v["joules"] for v in out.values())
    for v in out.values():
        v["share"] = round(v["joules"] / total, 3)
    return {"groups": out, "joules": round(total, 1), "busy_ms": round(sum(groups.values()), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--profile", type=Path, help="a peers.py --profile file of T1 to price kind by kind")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    energy = Energy()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seconds": SECONDS,
              "idle": idle(energy), "rows": []}
    print(f"idle: {result['idle']['watts']} W")
    for name, kind, units, fn in rows():
        r = measure(energy, fn)
        unit = "GB" if kind in ("memory", "variant") else "TFLOP"
        r.update(name=name, kind=kind, units=units, per_unit=round(r["mj"] / 1e3 / units, 4),
                 rate=round(units / r["ms"] * 1e3, 1))
        result["rows"].append(r)
        print(f"{name:52s} {r['ms']:8.4f} ms {r['mj']:9.2f} mJ {r['watts']:6.1f} W  "
              f"{r['per_unit']:.4f} J/{unit}  {r['rate']:.1f} {unit}/s")
    if args.profile:
        mean = {kind: sum(r["watts"] for r in result["rows"] if r["kind"] == kind) /
                max(1, sum(r["kind"] == kind for r in result["rows"])) for kind in ("gemm", "memory", "attention")}
        result["profile"] = {"file": args.profile.name, **price_profile(args.profile, mean)}
        print(json.dumps(result["profile"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_energy.py needs a CUDA GPU")
    os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")
    main()
