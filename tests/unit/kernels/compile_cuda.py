"""Compile every Triton kernel for CUDA GPUs on a machine without one (run by test_compile_cuda.py).

Each launcher runs once on small CPU tensors, in bf16 and fp32, with every kernel swapped for a recorder
that keeps the arguments instead of launching. Each recorded call then goes through triton.compile for
Hopper (sm_90) and Ampere (sm_80) down to a cubin with Triton's bundled ptxas. This catches what the CPU
interpreter cannot: layouts, tl.dot shapes, register allocation, ops missing on a target. Must start
without TRITON_INTERPRET (triton.jit picks the interpreter at decoration time); it is set after the imports
only so that ppalli's launchers accept CPU tensors. Prints one line per compile; exits 1 on any failure.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from ppalli.kernels import (
    geglu,
    linear_cross_entropy,
    lora_add_rms_norm,
    lora_b_bwd,
    lora_glu,
    nf4,
    qk_norm_rope,
    rms_norm,
    rms_norm_add,
    rope,
    swiglu,
)

MODULES = (geglu, linear_cross_entropy, lora_add_rms_norm, lora_b_bwd, lora_glu, nf4, qk_norm_rope, rms_norm,
           rms_norm_add, rope, swiglu)
TARGETS = (GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32))
# Shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): H100 227 KiB, A100 163 KiB. A
# kernel over it compiles but fails at launch (a 64 x 128 fp32 lora_glu backward asked 242 KiB on an H100).
SHARED_LIMIT = {90: 232448, 80: 166912}
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
          torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}
CALLS: list[tuple[str, JITFunction, tuple, dict]] = []
# The integer arguments that count a batch's rows or tokens, which change from step to step: each kernel declares
# them (`_utils.jit(rows=...)`), which decides whether Triton specializes on them (`_utils.SPECIALIZE_ROWS`).
ROWS = {"lora_add_rms_norm._lora_add_rms_norm_fwd_kernel": {"n_rows"}, "lora_b_bwd._lora_b_bwd_kernel": {"N"},
        "lora_glu._lora_glu_fwd_kernel": {"N"}, "lora_glu._lora_glu_bwd_kernel": {"N"},
        "qk_norm_rope._qk_norm_rope_fwd_kernel": {"n_rows", "n_t"},
        "qk_norm_rope._qk_norm_rope_bwd_kernel": {"n_rows", "n_t"}, "rope._rope_fwd_kernel": {"n_out_t", "n_t"},
        "rope._rope_lora_fwd_kernel": {"n_rows", "n_t"},
        "rms_norm._rms_norm_bwd_kernel": {"n_rows", "rows_per_program"}}


class _Recorder:
    def __init__(self, name: str, fn: JITFunction):
        self.name, self.fn = name, fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: CALLS.append((self.name, self.fn, args, kwargs))


def record_all() -> None:
    """Swap every `*_kernel` of MODULES for a recorder of its launches (in this process only): the launchers then
    run on CPU tensors and CALLS holds what each would have compiled. Also used by benchmarks/sass_census.py."""
    for module in MODULES:
        for name, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                setattr(module, name, _Recorder(f"{module.__name__.rsplit('.', 1)[-1]}.{name}", obj))


def _launch_everything(dtype: torch.dtype) -> None:
    """Every launcher the fused path calls, with shapes that take each kernel's branches."""
    def t(*shape, dt=dtype):
        return torch.randn(*shape).to(dt)

    x, w = t(6, 64), t(64)
    rms_norm.rms_norm_fwd(x, w, 1e-6)
    rms_norm.rms_norm_bwd(t(6, 64), x, w, torch.ones(6), compute_dw=True)
    rms_norm.rms_norm_bwd(t(6, 64), x, w, torch.ones(6), compute_dw=False)
    rms_norm.rms_norm_bwd(t(6, 64), x, w, torch.ones(6), compute_dw=False, dres=t(6, 64))
    for d in (64, 3840):  # Gemma-3 12B's d: the row's 4096-wide block in registers
        r2, y2, w2, rs = t(6, d), t(6, d), t(d), torch.ones(6)
        for nxt in ((w2, 1e-6), None):
            rms_norm_add.rms_norm_add_fwd(r2, y2, w2, 1e-6, 1.0, nxt)
        rms_norm_add.rms_norm_add_bwd(t(6, d), t(6, d), r2, y2, w2, w2, rs, rs, 1.0)
        rms_norm_add.rms_norm_add_bwd(t(6, d), None, None, y2, w2, None, rs, None, 0.0)
        rms_norm_add.rms_norm_add_bwd(None, t(6, d), r2, y2, w2, w2, rs, rs, 1.0)
    lora_add_rms_norm.lora_add_rms_norm_fwd(x, t(6, 64), t(6, 16), t(64, 16), 0.5, w, 1e-6)
    lora_add_rms_norm.lora_add_rms_norm_fwd(x, t(6, 64), None, None, 0.5, w, 1e-6, 1.0)
    lora_add_rms_norm.lora_add_fwd(x, t(6, 64), t(6, 16), t(64, 16), 0.5)
    for out in (64, 4096):  # the default settings of a narrow and a wide projection
        lora_b_bwd.lora_b_bwd(t(6, out), t(6, 16), t(out, 16), 0.5, torch.float32)
    q, k, cos, sin = t(1, 4, 6, 16), t(1, 2, 6, 16), t(1, 6, 16), t(1, 6, 16)  # (B, H, T, D), (B, T, D)
    rope.rope_fwd(q, k, cos, sin)
    rope.rope_fwd(q, k, cos, sin, backward=True)
    rope.rope_fwd(q, k, cos, sin, backward=True, v=(k, torch.empty_like(k)))
    rope.rope_fwd(q, k, cos, sin, qk_norms=((t(16), 1e-6), (t(16), 1e-6), 0.0))
    y, xa, lora_b = t(12, 64), t(12, 16), t(64, 16)  # 2 x 6 tokens, 4 heads of 16
    for head_dim in (64, 128):
        rope.rope_lora_fwd(y, xa, lora_b, 0.5, cos, sin, 2, 16, blocks=rope.LORA_BLOCKS[head_dim])
    for head_dim in (64, 128, 256):  # Qwen3 / Gemma 3 head dims; 2 x 6 tokens, 2 heads
        y, w, d_out = t(12, 2 * head_dim), t(head_dim), t(2, 2, 6, head_dim)
        cs, sn = t(2, 6, head_dim), t(2, 6, head_dim)
        for xa, lb in ((t(12, 16), t(2 * head_dim, 16)), (None, None)):
            qk_norm_rope.qk_norm_rope_fwd(y, xa, lb, 0.5, w, 1e-6, 0.0, cs, sn, 2, head_dim)
            qk_norm_rope.qk_norm_rope_bwd(d_out, y, xa, lb, 0.5, w, 1e-6, 1.0, cs, sn, 2, head_dim)
            qk_norm_rope.qk_norm_rope_bwd(d_out, y, xa, lb, 0.5, w, 1e-6, 0.0, cs, sn, 2, head_dim,
                                          v=(d_out, torch.empty_like(y)))
    for fwd, bwd in ((swiglu.swiglu_fwd, swiglu.swiglu_bwd), (geglu.geglu_fwd, geglu.geglu_bwd)):
        fwd(t(6, 64), t(6, 64))
        bwd(t(6, 64), t(6, 64), t(6, 64), inplace=True)
    for act in lora_glu.ACTS:
        g0, u0, xa, b, ad = t(70, 200), t(70, 200), t(70, 16), t(200, 16), t(16, 200)
        lora_glu.lora_glu_fwd(g0, u0, xa, b, 0.5, xa, b, 0.5, act)
        lora_glu.lora_glu_fwd(g0, u0, None, None, 0.5, xa, b, 0.5, act)
        lora_glu.lora_glu_fwd_had(g0, u0, xa, b, 0.5, xa, b, 0.5, ad, act)
        lora_glu.lora_glu_fwd_had(g0, u0, xa, b, 0.5, xa, b, 0.5, ad, act, store_h=False)
        lora_glu.lora_glu_bwd(t(70, 200), g0, u0, xa, b, 0.5, xa, b, 0.5, xa, ad, act, (True, True, True))
        lora_glu.lora_glu_bwd(t(70, 200), g0, u0, xa, b, 0.5, None, None, 0.5, None, None, act)
    hidden, weight = t(8, 64).requires_grad_(), t(300, 64).requires_grad_()
    labels = torch.randint(0, 300, (8,))
    for softcap in (None, 30.0):
        try:
            linear_cross_entropy.linear_cross_entropy_fwd(hidden, weight, labels, softcap=softcap)
        except Exception:  # noqa: BLE001 - the launcher reads the (never computed) outputs afterwards
            pass


def _launch_nf4() -> None:
    import bitsandbytes as bnb

    for quant_type in ("nf4", "fp4"):
        packed, state = bnb.functional.quantize_4bit(torch.randn(64, 128), quant_type=quant_type,
                                                     compress_statistics=True)
        for dtype in (torch.bfloat16, torch.float32):
            try:
                nf4.dequantize_nf4(packed, state, dtype)
            except Exception:  # noqa: BLE001 - as above
                pass


def signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """(signature, constexprs) of one recorded launch, as triton.compile's ASTSource takes them."""
    sig, const = {}, {}
    for i, p in enumerate(fn.params):
        value = args[i] if i < len(args) else kwargs.get(p.name, p.default)
        if p.is_constexpr or value is None:
            sig[p.name], const[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[p.name] = "*" + DTYPES[value.dtype]
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            sig[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{p.name}: no Triton type for {type(value).__name__}")
    return sig, const


def gpu_variant(const: dict) -> dict:
    """The launchers ran under the interpreter: the constexprs a GPU gets instead, in place. FAST: the PTX
    approximations (_utils.fast_math); UPCAST: off, bf16 tensor-core dots (fp32 copies only for the interpreter)."""
    const.update({key: value for key, value in (("FAST", True), ("UPCAST", False)) if key in const})
    return const


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("start without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    record_all()
    os.environ["TRITON_INTERPRET"] = "1"  # only for ppalli's device checks; the kernels are JITFunctions
    for dtype in (torch.bfloat16, torch.float32):
        _launch_everything(dtype)
    try:
        _launch_nf4()
    except ImportError:
        print("skip nf4: bitsandbytes missing")
    seen, failed = set(), 0
    for name, fn, args, kwargs in CALLS:
        sig, const = signature(fn, args, kwargs)
        gpu_variant(const)
        key = (name, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in const.items())))
        if key in seen:
            continue
        seen.add(key)
        undeclared = ROWS.get(name, set()) - set(getattr(fn, "row_args", ()))
        if undeclared:
            failed += len(TARGETS)
            print(f"FAIL {name} does not declare its row counts {sorted(undeclared)}: give them to jit(rows=...)")
            continue
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        for target in TARGETS:
            t0 = time.perf_counter()
            try:
                shared = triton.compile(ASTSource(fn, sig, const), target=target, options=options).metadata.shared
                if shared > SHARED_LIMIT[target.arch]:
                    raise RuntimeError(f"needs {shared} bytes of shared memory, sm_{target.arch} has "
                                       f"{SHARED_LIMIT[target.arch]}")
                print(f"ok   sm_{target.arch} {name} {const} ({time.perf_counter() - t0:.1f} s, {shared} B shared)")
            except Exception:  # noqa: BLE001 - report every failing kernel, not just the first
                failed += 1
                print(f"FAIL sm_{target.arch} {name} {sig} {const}\n{traceback.format_exc(limit=3)}")
    print(f"{len(seen)} kernel signatures, {len(seen) * len(TARGETS) - failed} compiled, {failed} failed")
    return 1 if failed or not seen else 0


if __name__ == "__main__":
    sys.exit(main())
