"""benchmarks/csrc/hopper_gemm.cu (a warp-specialized TMA + wgmma GEMM, C = A @ B^T in bf16) against cuBLAS
on the forward GEMMs of T4 (Llama-3.2-1B, 8 x 2048 tokens) and T1 (Llama-3.1-8B, 4 x 2048), one H100/H200.

    python benchmarks/bench_hopper_gemm.py --out benchmarks/results/hopper-gemm.txt [--lib libhopper_gemm.so]

Builds the kernel with nvcc (sm_90a) unless --lib names a build, checks each product against torch.mm
(relative Frobenius error), then times it (CTAs alone and in clusters of 2 sharing B by multicast) and
cuBLAS: medians of triton.testing.do_bench, and a sustained run (the
card held at its power cap: 2 s of back-to-back products, each side twice, alternating), TFLOP/s = 2 M N K / t.
"""

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import triton.testing

SRC = Path(__file__).resolve().parent / "csrc" / "hopper_gemm.cu"
# name: (M tokens, N out features, K in features) of y = x W^T
SHAPES = {"1b gate/up": (16384, 8192, 2048), "1b down": (16384, 2048, 8192), "1b q/o": (16384, 2048, 2048),
          "1b lm_head chunk": (1024, 128256, 2048), "8b gate/up": (8192, 14336, 4096),
          "8b down": (8192, 4096, 14336), "8b q/o": (8192, 4096, 4096), "8b lm_head chunk": (1024, 128256, 4096)}


def build(out_dir: Path) -> Path:
    lib = out_dir / "libhopper_gemm.so"
    cmd = ["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC", "-shared",
           "-Xptxas", "-v", "-o", str(lib), str(SRC)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"nvcc failed:\n{done.stderr}")
    print("\n".join(line for line in done.stderr.splitlines() if "registers" in line or "spill" in line))
    return lib


def sustained_ms(fn, seconds: float = 2.0) -> float:
    """Mean time of one call over `seconds` of back-to-back calls (events around the whole run)."""
    fn()
    torch.cuda.synchronize()
    calls, start = 0, torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            fn()
        calls += 20
        torch.cuda.synchronize()  # the host loop checks the wall clock: keep it level with the device
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lib", type=Path, default=None)
    p.add_argument("--only", default="", help="comma-separated substrings of shape names to run")
    args = p.parse_args()
    lib_path = args.lib or build(Path(tempfile.mkdtemp()))
    lib = ctypes.CDLL(str(lib_path))
    lib.ppalli_gemm_tn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 8 + [ctypes.c_void_p]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {sms} SMs"]

    for name, (m, n, k) in SHAPES.items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

        def gemm(cluster, a=a, b=b, c=c, m=m, n=n, k=k, stream=stream):
            err = lib.ppalli_gemm_tn(a.data_ptr(), b.data_ptr(), c.data_ptr(), m, n, k, k, k, n, sms, cluster, stream)
            if err:
                raise RuntimeError(f"ppalli_gemm_tn returned {err}")

        fns = {"cublas": lambda a=a, b=b, c=c: torch.mm(a, b.t(), out=c),
               "ours": lambda: gemm(1), "ours cluster 2": lambda: gemm(2),
               "ours cluster 2 no multicast": lambda: gemm(-2)}
        ref = torch.mm(a, b.t())
        errs = {}
        for key in ("ours", "ours cluster 2", "ours cluster 2 no multicast"):
            c.zero_()
            fns[key]()
            torch.cuda.synchronize()
            errs[key] = ((c.float() - ref.float()).norm() / ref.float().norm()).item()
        flops = 2 * m * n * k
        med = {key: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median") for key, f in fns.items()}
        sus = {key: [] for key in fns}
        for _ in range(2):
            for key, f in fns.items():
                sus[key].append(sustained_ms(f))
        best = {key: min(v) for key, v in sus.items()}
        row = f"{name} (M {m}, N {n}, K {k}): " + "; ".join(
            f"{key} median {med[key]:.4f} ms ({flops / med[key] / 1e9:.0f} TFLOP/s), sustained {best[key]:.4f} "
            f"({flops / best[key] / 1e9:.0f})" + (f", rel err {errs[key]:.1e}, {best['cublas'] / best[key]:.3f}x "
                                                   "cuBLAS" if key in errs else "")
            for key in fns)
        row += (f"; resident CTAs {lib.ppalli_gemm_resident(1)} alone, {lib.ppalli_gemm_resident(2)} in clusters, "
                f"{lib.ppalli_gemm_resident(-2)} in clusters without multicast")
        print(row, flush=True)
        lines.append(row)
        del a, b, c, ref
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
