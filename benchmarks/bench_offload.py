"""Host <-> GPU copy bandwidth for offloaded activations (ppalli/train/recompute.py, offload mode).

    python benchmarks/bench_offload.py [--mib 256] [--out FILE.json]

Pinned host buffers, copies on a side stream: device-to-host alone, host-to-device alone, both at once, and
each while the compute stream runs bf16 GEMMs (8192 x 4096 x 14336, a Llama-3.1-8B MLP shape), which is
what offloading sees during a training step. Prints GB/s and how much the GEMMs slowed down.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _gemm_loop(n: int, a: torch.Tensor, b: torch.Tensor) -> None:
    for _ in range(n):
        torch.mm(a, b)


def _timed(fn, stream=None) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--out")
    args = p.parse_args()
    n = args.mib * 2**20 // 2
    gpu = [torch.empty(n, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    host = [torch.empty(n, dtype=torch.bfloat16, pin_memory=True) for _ in range(2)]
    side, side2 = torch.cuda.Stream(), torch.cuda.Stream()
    a = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)
    gb = args.reps * args.mib * 2**20 / 1e9

    def d2h():
        with torch.cuda.stream(side):
            for _ in range(args.reps):
                host[0].copy_(gpu[0], non_blocking=True)

    def h2d():
        with torch.cuda.stream(side2):
            for _ in range(args.reps):
                gpu[1].copy_(host[1], non_blocking=True)

    for fn in (d2h, h2d):
        fn()  # warm-up
    _gemm_loop(3, a, b)
    res = {"device": torch.cuda.get_device_name(), "mib": args.mib, "reps": args.reps}
    res["d2h_gbps"] = gb / _timed(d2h)
    res["h2d_gbps"] = gb / _timed(h2d)
    res["both_gbps_each"] = gb / _timed(lambda: (d2h(), h2d()))
    gemms = 40
    t_gemm = _timed(lambda: _gemm_loop(gemms, a, b))
    t_with = _timed(lambda: (d2h(), h2d(), _gemm_loop(gemms, a, b)))
    res["gemm_ms"] = 1e3 * t_gemm / gemms
    res["gemm_tflops"] = 2 * 8192 * 4096 * 14336 * gemms / t_gemm / 1e12
    res["gemm_with_copies_tflops"] = 2 * 8192 * 4096 * 14336 * gemms / t_with / 1e12
    res["copies_during_gemms_s"] = t_with
    res["gb_each_way"] = gb
    for k, v in res.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
