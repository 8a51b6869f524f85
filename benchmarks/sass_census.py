"""What the fused kernels compile to on Hopper, read without a GPU: SASS instructions of each kernel's loop.

    python benchmarks/sass_census.py [--only lora_glu] [--arch 90]

Why: T1 runs at the H100's power cap, so a memory-bound pass costs the joules of every instruction it issues, not
only of its bytes (results/2026-12-06-h100-s39-energy.txt: lora_glu at 1.6x a copy's joules per byte). This
script runs the launchers the fast path calls at T1's shapes (Llama-3.1-8B, 4 x 2048 tokens, rank 16) on CPU
tensors with every kernel swapped for a recorder (tests/unit/kernels/compile_cuda.py), compiles each recorded
call for sm_90 with Triton's bundled ptxas, as the JIT would specialize it (pointers 16-byte aligned, integers
divisible by 16 marked so), and prints per kernel: registers, spilled bytes a thread, shared memory, the largest
loop's instruction count and its opcode mix. Two findings of 2026-12-06 came from it: tl.sigmoid's exp and
divide spent 12 instructions an element where 4 do (_utils.sigmoid), and lora_glu_fwd_had on 4 warps computed
every element twice (FWD_HAD_TILES). Triton is the installed one; the GPU machine's is 3.6
(`pip install --target DIR triton==3.6.0` and DIR first on PYTHONPATH reads what it compiles).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns without it; 1 is what 3.6 does

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit" / "kernels")]
import compile_cuda  # noqa: E402 - the recorder and the signatures of tests/unit/kernels
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ppalli.kernels import lora_add_rms_norm, lora_b_bwd, lora_glu, rms_norm, rope  # noqa: E402

N, D, INTER, HQ, HK, HD, RANK, BATCH = 8192, 4096, 14336, 32, 8, 128, 16, 4
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
INSTR = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]+)")


def launch_t1() -> None:
    """The launchers of one T1 layer's fused kernels (forward and backward), bf16."""
    def t(*shape):
        return torch.randn(*shape).to(torch.bfloat16)

    x, w = t(N, D), t(D)
    lora_add_rms_norm.lora_add_rms_norm_fwd(x, t(N, D), t(N, RANK), t(D, RANK), 0.5, w, 1e-6)
    rms_norm.rms_norm_bwd(t(N, D), x, w, torch.ones(N), compute_dw=False, dres=t(N, D))
    cos, sin = t(BATCH, N // BATCH, HD), t(BATCH, N // BATCH, HD)
    rope.rope_lora_fwd(t(N, HQ * HD), t(N, RANK), t(HQ * HD, RANK), 0.5, cos, sin, BATCH, HD,
                       blocks=rope.LORA_BLOCKS[HD])
    rope.rope_fwd(t(BATCH, HQ, N // BATCH, HD), t(BATCH, HK, N // BATCH, HD), cos, sin, backward=True)
    for out in (D, HK * HD):
        lora_b_bwd.lora_b_bwd(t(N, out), t(N, RANK), t(out, RANK), 0.5, torch.float32)
    g0, u0, xa, b, ad = t(N, INTER), t(N, INTER), t(N, RANK), t(INTER, RANK), t(RANK, INTER)
    h100 = lora_glu.FWD_HAD_TILES_BY_GPU["NVIDIA H100 80GB HBM3"], lora_glu.BWD_TILES_BY_GPU["NVIDIA H100 80GB HBM3"]
    lora_glu.lora_glu_fwd_had(g0, u0, xa, b, 0.5, xa, b, 0.5, ad, tiles=h100[0])
    lora_glu.lora_glu_bwd(t(N, INTER), g0, u0, xa, b, 0.5, xa, b, 0.5, xa, ad, sums=(True, True, True),
                          tiles=h100[1])


def specialization(fn, args: tuple, kwargs: dict) -> dict:
    """The divisibility Triton's JIT would see: 16-byte aligned pointers, integers divisible by 16."""
    attrs = {}
    for i, p in enumerate(fn.params):
        value = args[i] if i < len(args) else kwargs.get(p.name, p.default)
        aligned = isinstance(value, torch.Tensor) or (type(value) is int and value and value % 16 == 0)
        if not p.is_constexpr and aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def census(cubin: bytes) -> dict:
    """Registers, stack bytes and the opcodes of the largest loop (a backward branch's span) of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([BIN / "cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    code = [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines() if (m := INSTR.search(line))]
    loop: list[str] = []
    for addr, _, line in code:
        target = re.search(r"BRA\s+0x([0-9a-f]+)", line)
        if target and int(target.group(1), 16) < addr:
            body = [op for a, op, _ in code if int(target.group(1), 16) <= a <= addr]
            loop = max(loop, body, key=len)
    regs, stack = (re.search(rf"{key}:(\d+)", usage) for key in ("REG", "STACK"))
    return {"instructions": len(code), "regs": int(regs.group(1)) if regs else -1,
            "stack": int(stack.group(1)) if stack else -1, "loop": collections.Counter(loop)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="kernels whose name contains this (e.g. lora_glu)")
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args()
    compile_cuda.record_all()
    os.environ["TRITON_INTERPRET"] = "1"  # the launchers' device checks accept CPU tensors; kernels are recorded
    launch_t1()
    print(f"triton {triton.__version__}, sm_{args.arch}, T1 shapes (N {N}, d {D}, I {INTER}, r {RANK})")
    seen = set()
    for name, fn, call_args, kwargs in compile_cuda.CALLS:
        sig, const = compile_cuda.signature(fn, call_args, kwargs)
        compile_cuda.gpu_variant(const)
        key = (name, repr(sorted(const.items())), kwargs.get("num_warps"))
        if args.only not in name or key in seen:
            continue
        seen.add(key)
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        kernel = triton.compile(ASTSource(fn, sig, const, specialization(fn, call_args, kwargs)),
                                target=GPUTarget("cuda", args.arch, 32), options=options)
        c = census(kernel.asm["cubin"])
        mix = ", ".join(f"{op} {n}" for op, n in c["loop"].most_common())
        print(f"\n{name} {const} warps {options.get('num_warps', 4)}\n  {c['instructions']} instructions, "
              f"{c['regs']} registers, {c['stack']} B stack, {kernel.metadata.shared} B shared; "
              f"largest loop {sum(c['loop'].values())}: {mix}")


if __name__ == "__main__":
    main()
