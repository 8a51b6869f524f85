"""benchmarks/csrc/hopper_gemm.cu (a warp-specialized TMA + wgmma GEMM, C = A @ B^T in bf16) against cuBLAS
on the forward GEMMs of T4 (Llama-3.2-1B, 8 x 2048 tokens) and T1 (Llama-3.1-8B, 4 x 2048), one H100/H200.

    python benchmarks/bench_hopper_gemm.py --out benchmarks/results/hopper-gemm.txt [--lib libhopper_gemm.so]

--glu times gate/up + SwiGLU in one kernel, --nn the input-gradient layout C = A @ B (B row-major).
Builds the kernel with nvcc (sm_90a) unless --lib names a build, checks each product against torch.mm
(relative Frobenius error), then times it (CTAs alone, in clusters of 2 sharing B by multicast, and the
ping-pong schedule) and cuBLAS: medians of triton.testing.do_bench, and a sustained run (the
card held at its power cap: 2 s of back-to-back products, each side twice, alternating), TFLOP/s = 2 M N K / t.
"""

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

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


# name: (M tokens, N, K) of an input gradient dy W, W (K, N) row-major as nn.Linear stores (out, in)
NN_SHAPES = {"1b down dgrad": (16384, 8192, 2048), "1b gate dgrad": (16384, 2048, 8192),
             "8b down dgrad": (8192, 14336, 4096), "8b gate dgrad": (8192, 4096, 14336)}


def bench_nn(lib, sms: int, seconds: float) -> list[str]:
    """ppalli_gemm_nn (B row-major (K, N): an MN-major wgmma operand) against torch.mm(a, b)."""
    lines = []
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    for name, (m, n, k) in NN_SHAPES.items():
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

        def ours(cluster, a=a, b=b, c=c, m=m, n=n, k=k):
            err = lib.ppalli_gemm_nn(a.data_ptr(), b.data_ptr(), c.data_ptr(), m, n, k, k, n, n, sms, cluster, stream)
            if err:
                raise RuntimeError(f"ppalli_gemm_nn returned {err}")

        ref = torch.mm(a, b)
        errs = {}
        for cluster in (1, 2):
            c.zero_()
            ours(cluster)
            torch.cuda.synchronize()
            errs[cluster] = ((c.float() - ref.float()).norm() / ref.float().norm()).item()
        fns = {"cublas": lambda a=a, b=b, c=c: torch.mm(a, b, out=c), "ours": lambda: ours(1),
               "ours cluster 2": lambda: ours(2)}
        ok = all(e < 1e-2 for e in errs.values())
        times = {key: min(sustained_ms(f, seconds) for _ in range(2)) for key, f in fns.items()} if ok else {}
        row = (f"nn {name} (M {m}, N {n}, K {k}): rel err {errs[1]:.1e} / {errs[2]:.1e} (alone / cluster 2)"
               + "".join(f"; {key} {ms:.4f} ms ({2 * m * n * k / ms / 1e9:.0f} TFLOP/s, "
                         f"{times['cublas'] / ms:.3f}x cuBLAS)" for key, ms in times.items()))
        print(row, flush=True)
        lines.append(row)
        del a, b, c, ref
    return lines


GLU_SHAPES = {"1b": (16384, 8192, 2048), "8b": (8192, 14336, 4096)}  # (tokens, intermediate, hidden)


def bench_glu(lib, sms: int, seconds: float) -> list[str]:
    """ppalli_gemm_swiglu (g, u and h = silu(g) * u from one kernel) against cuBLAS's two GEMMs and then
    lora_glu_fwd reading g and u back: without adapters (like for like) and, for context, lora_glu_fwd_had with
    rank-16 adapters on all three projections, the forward T4 and T1 run today."""
    from ppalli.kernels.lora_glu import lora_glu_fwd, lora_glu_fwd_had

    lines = []
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    for name, (m, n, k) in GLU_SHAPES.items():
        def t(*shape, scale=1.0):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

        x, wg, wu = t(m, k), t(n, k, scale=k**-0.5), t(n, k, scale=k**-0.5)
        xa, bg, ad = t(m, 16), t(n, 16, scale=0.1), t(16, n, scale=0.1)
        g, u, h = (torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(3))

        def ours(cluster, x=x, wg=wg, wu=wu, g=g, u=u, h=h, m=m, n=n, k=k):
            err = lib.ppalli_gemm_swiglu(x.data_ptr(), wg.data_ptr(), wu.data_ptr(), g.data_ptr(), u.data_ptr(),
                                         h.data_ptr(), m, n, k, k, k, n, sms, cluster, stream)
            if err:
                raise RuntimeError(f"ppalli_gemm_swiglu returned {err}")

        def pingpong(x=x, wg=wg, wu=wu, g=g, u=u, h=h, m=m, n=n, k=k):
            err = lib.ppalli_gemm_swiglu_pingpong(x.data_ptr(), wg.data_ptr(), wu.data_ptr(), g.data_ptr(),
                                                  u.data_ptr(), h.data_ptr(), m, n, k, k, k, n, sms, stream)
            if err:
                raise RuntimeError(f"ppalli_gemm_swiglu_pingpong returned {err}")

        def cublas_glu(x=x, wg=wg, wu=wu):
            return lora_glu_fwd(torch.mm(x, wg.t()), torch.mm(x, wu.t()), None, None, 1.0, None, None, 1.0)

        def cublas_glu_had(x=x, wg=wg, wu=wu, xa=xa, bg=bg, ad=ad):
            return lora_glu_fwd_had(torch.mm(x, wg.t()), torch.mm(x, wu.t()), xa, bg, 2.0, xa, bg, 2.0, ad)

        g_ref, u_ref, h_ref = torch.mm(x, wg.t()), torch.mm(x, wu.t()), cublas_glu()
        errs = []
        for label, run in (("cluster 2", lambda: ours(2)), ("cluster 1", lambda: ours(1)), ("pingpong", pingpong)):
            for out in (g, u, h):
                out.zero_()
            run()
            torch.cuda.synchronize()
            errs.append(f"{label}: g {'equal' if torch.equal(g, g_ref) else 'DIFFERS'}, u "
                        f"{'equal' if torch.equal(u, u_ref) else 'DIFFERS'}, h rel err "
                        f"{((h.float() - h_ref.float()).norm() / h_ref.float().norm()).item():.1e}, h max abs diff "
                        f"{(h.float() - h_ref.float()).abs().max().item():.1e}")
        fns = {"cuBLAS x2 + lora_glu_fwd": cublas_glu, "ours swiglu cluster 2": lambda: ours(2),
               "ours swiglu cluster 1": lambda: ours(1), "ours swiglu pingpong": pingpong,
               "cuBLAS x2 + lora_glu_fwd_had (r 16)": cublas_glu_had}
        times = {key: min(sustained_ms(f, seconds) for _ in range(2)) for key, f in fns.items()}
        base = times["cuBLAS x2 + lora_glu_fwd"]
        row = f"swiglu {name} (M {m}, I {n}, K {k}): " + "; ".join(errs) + "; sustained " + "; ".join(
            f"{key} {ms:.4f} ms ({base / ms:.3f}x)" for key, ms in times.items())
        print(row, flush=True)
        lines.append(row)
        del x, wg, wu, g, u, h, g_ref, u_ref, h_ref
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lib", type=Path, default=None)
    p.add_argument("--only", default="", help="comma-separated substrings of shape names to run")
    p.add_argument("--glu", action="store_true", help="time the fused gate/up + SwiGLU kernel instead")
    p.add_argument("--seconds", type=float, default=2.0, help="length of each sustained run")
    p.add_argument("--nn", action="store_true", help="time the input-gradient layout (B row-major) instead")
    args = p.parse_args()
    lib_path = args.lib or build(Path(tempfile.mkdtemp()))
    lib = ctypes.CDLL(str(lib_path))
    lib.ppalli_gemm_tn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 8 + [ctypes.c_void_p]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {sms} SMs"]
    lib.ppalli_gemm_swiglu.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 8 + [ctypes.c_void_p]
    lib.ppalli_gemm_pingpong.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 7 + [ctypes.c_void_p]
    lib.ppalli_gemm_swiglu_pingpong.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 7 + [ctypes.c_void_p]
    lib.ppalli_gemm_nn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 8 + [ctypes.c_void_p]
    if args.nn:
        args.out.write_text("\n".join(lines + bench_nn(lib, sms, args.seconds)) + "\n")
        return
    if args.glu:
        args.out.write_text("\n".join(lines + bench_glu(lib, sms, args.seconds)) + "\n")
        return

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

        def pingpong(a=a, b=b, c=c, m=m, n=n, k=k, stream=stream):
            err = lib.ppalli_gemm_pingpong(a.data_ptr(), b.data_ptr(), c.data_ptr(), m, n, k, k, k, n, sms, stream)
            if err:
                raise RuntimeError(f"ppalli_gemm_pingpong returned {err}")

        fns = {"cublas": lambda a=a, b=b, c=c: torch.mm(a, b.t(), out=c),
               "ours": lambda: gemm(1), "ours cluster 2": lambda: gemm(2),
               "ours cluster 2 no multicast": lambda: gemm(-2), "ours pingpong": pingpong}
        ref = torch.mm(a, b.t())
        errs = {}
        for key in ("ours", "ours cluster 2", "ours cluster 2 no multicast", "ours pingpong"):
            c.zero_()
            fns[key]()
            torch.cuda.synchronize()
            errs[key] = ((c.float() - ref.float()).norm() / ref.float().norm()).item()
        flops = 2 * m * n * k
        med = {key: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median") for key, f in fns.items()}
        sus = {key: [] for key in fns}
        for _ in range(2):
            for key, f in fns.items():
                sus[key].append(sustained_ms(f, args.seconds))
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
