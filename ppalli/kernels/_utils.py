"""Helpers shared by the Triton kernels: the optional triton import, launch settings, device checks.

Triton is an optional dependency (`pip install ppalli[fast]`). Every kernel module imports `triton`, `tl`
and `jit` from here, so `import ppalli.kernels.x` works without triton and the first launch raises one
clear error instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from types import SimpleNamespace

import torch

from ppalli.errors import PpalliError

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # the fast path is optional; the reference path needs no triton
    triton = None
    # Kernel signatures and constants use `tl.constexpr`; this stand-in lets the modules be defined.
    tl = SimpleNamespace(constexpr=lambda value=None: value)
    _TRITON_IMPORT_ERROR = exc

# The widest row a one-pass kernel holds in registers: 64 KiB of fp32 per program, Liger's MAX_FUSED_SIZE.
MAX_FUSED_SIZE = 65536 // 4

# Elementwise kernels (SwiGLU, GeGLU): 1024 elements and 4 warps a program, 8 per thread, the usual
# bandwidth-bound setting of the Triton tutorials; benchmarks/bench_kernels.py checks it on the H100.
ELEMENTWISE_BLOCK = 1024


_RECOMPUTE = threading.local()  # thread-local: CUDA backward (where recompute runs) has its own thread


@contextlib.contextmanager
def _thread_setting(name: str, value, default):
    """Set a thread-local recompute setting for the block, restoring what was there (nesting allowed)."""
    before = getattr(_RECOMPUTE, name, default)
    setattr(_RECOMPUTE, name, value)
    try:
        yield
    finally:
        setattr(_RECOMPUTE, name, before)


def recomputing(on: bool = True):
    """Mark a forward whose outputs are thrown away: a recompute for backward, where only the tensors that
    autograd saves matter. Fused blocks may then skip work that only makes their output (lora_mlp skips the
    down projection: 27% of a Llama-3.1-8B layer's GEMM FLOPs)."""
    return _thread_setting("on", on, False)


def is_recomputing() -> bool:
    return getattr(_RECOMPUTE, "on", False)


def recompute_stash(stash: dict | None):
    """The dict a recompute wrapper keeps for one forward call of one layer, from its first pass through its
    recompute (and dropped with that call's backward): a fused block keeps there what is small to hold and
    costly to make again, and its recompute reads it back instead. Keyed per call, so a recompute never
    reads another forward's values, whatever order the forwards and backwards run in."""
    return _thread_setting("stash", stash, None)


def current_stash() -> dict | None:
    return getattr(_RECOMPUTE, "stash", None)


class _MissingKernel:
    """Takes the place of a `@triton.jit` kernel when triton is missing; launching it raises."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        require_triton()


SPECIALIZE_ROWS = True  # see jit


def jit(fn=None, *, rows: tuple[str, ...] = ()):
    """`triton.jit` when triton is installed, else a placeholder that raises a clear error on launch.

    rows: the kernel's integer arguments that count a batch's rows or tokens (n_rows, N, T), which change from
    step to step; kept on the kernel as `row_args`. Triton compiles a variant of a kernel for each pattern of its
    integer arguments (== 1, divisible by 16), so a packed batch whose token count first comes out a multiple of 16
    compiles the fused kernels again mid-run: 4.6 s at step 18 of a SimPO run on a fresh H100 (2026-12-06), a disk
    cache load on later runs. Left unspecialized they never do, but T1 ran slower: 472.5 against 469.4 ms and 463.7
    against 461.7 ms a step in two A/Bs on two H100s (2026-12-06, `*-h100-s38-t1-ab-rows-*`), so they are specialized
    (SPECIALIZE_ROWS): a one-time compile beats a slower step for the rest of the run."""
    if fn is None:
        return functools.partial(jit, rows=rows)
    if triton is None:
        return _MissingKernel(fn.__name__)
    kernel = triton.jit(fn) if SPECIALIZE_ROWS or not rows else triton.jit(fn, do_not_specialize=list(rows))
    kernel.row_args = tuple(rows)
    return kernel


def is_triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests without CUDA set TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether a kernel should multiply fp32 copies in tl.dot: Triton's CPU interpreter returns garbage for
    bf16 operands (a 16 x 16 bf16 product off by 2e10 under triton 3.9, 2026-11-25), while fp32 is exact.
    On a GPU the bf16 tensor-core dot runs as written."""
    return interpreting() and dtype == torch.bfloat16


def require_triton() -> None:
    if triton is None:
        raise PpalliError(
            f"the fused kernels need triton, which failed to import ({_TRITON_IMPORT_ERROR}); "
            "install it with `pip install ppalli[fast]` or turn the fast path off (fast_path: false)"
        )


def check_tensors(*tensors: torch.Tensor) -> None:
    """Triton launches need triton, CUDA tensors (or CPU tensors under the interpreter) on one device."""
    require_triton()
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise PpalliError(f"the fused kernels need all tensors on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise PpalliError(
            f"the fused kernels run on CUDA tensors, got a {device.type} tensor; "
            "turn the fast path off (fast_path: false) or set TRITON_INTERPRET=1 for a slow CPU check"
        )


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def row_block(n_cols: int) -> int:
    """The block that covers one row of `n_cols` in a single pass; rows wider than MAX_FUSED_SIZE are refused."""
    block = next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise PpalliError(f"a row of {n_cols} elements is wider than the fused kernels hold ({MAX_FUSED_SIZE})")
    return block


def num_warps_for(block: int) -> int:
    """Warps for a program that reduces `block` elements: Liger's thresholds (~8 to 32 elements per thread)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=8)
def _device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def device_name(device: torch.device) -> str:
    """The CUDA device's name ("NVIDIA H200"), for launch settings swept per GPU; "" off CUDA."""
    return _device_name(_cuda_index(device)) if device.type == "cuda" else ""


def program_count(device: torch.device) -> int:
    """Persistent programs for kernels that loop over rows: one per SM; a few under the interpreter."""
    return _sm_count(_cuda_index(device)) if device.type == "cuda" else 4


def flat_same_shape(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Same-shape tensors as flat contiguous (n,) views, for kernels that index them elementwise."""
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        raise PpalliError(f"the kernel needs tensors of one shape, got {[tuple(t.shape) for t in tensors]}")
    check_tensors(*tensors)
    return [t.contiguous().view(-1) for t in tensors]


def glu_stacked(kernel, gu: torch.Tensor) -> torch.Tensor:
    """Launch a GLU forward kernel (swiglu.py, geglu.py) on gu (..., 2I) = [gate | up], the output of one GEMM
    over the stacked gate and up weights -> (..., I), the halves read in place (no copies to split them)."""
    check_tensors(gu)
    x = contiguous_rows(gu)  # (M, 2I)
    rows, width = x.shape
    if width % 2:
        raise PpalliError(f"a stacked [gate | up] needs an even last dim, got {width}")
    cols, n = width // 2, rows * (width // 2)
    h = torch.empty((rows, cols), dtype=gu.dtype, device=gu.device)
    if n:
        kernel[(cdiv(n, ELEMENTWISE_BLOCK),)](h, x, x[:, cols:], n, cols, x.stride(0), BLOCK=ELEMENTWISE_BLOCK,
                                              FAST=fast_math(), num_warps=4)
    return h.view(*gu.shape[:-1], cols)


def glu_fwd(kernel, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch a GLU forward kernel (swiglu.py, geglu.py): gate, up (..., I) -> h (..., I) in gate's dtype."""
    g, u = flat_same_shape(gate, up)
    h = torch.empty_like(g)
    kernel[(cdiv(g.numel(), ELEMENTWISE_BLOCK),)](h, g, u, g.numel(), g.numel(), g.numel(), BLOCK=ELEMENTWISE_BLOCK,
                                                  FAST=fast_math(), num_warps=4)
    return h.view(gate.shape)


def glu_bwd(kernel, name: str, dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, inplace: bool):
    """Launch a GLU backward kernel: dh, gate, up (..., I) -> (dgate, dup) (..., I); inplace=True writes them over
    gate and up, which must then be contiguous (`name` says whose launcher refused)."""
    if inplace and not (gate.is_contiguous() and up.is_contiguous()):
        raise PpalliError(f"{name}(inplace=True) needs contiguous gate and up: it writes the gradients into them")
    d, g, u = flat_same_shape(dh, gate, up)
    dgate, dup = (g, u) if inplace else (torch.empty_like(g), torch.empty_like(u))
    kernel[(cdiv(g.numel(), ELEMENTWISE_BLOCK),)](dgate, dup, d, g, u, g.numel(), BLOCK=ELEMENTWISE_BLOCK,
                                                  FAST=fast_math(), num_warps=4)
    return dgate.view(gate.shape), dup.view(up.shape)


def contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as a (rows, last dim) matrix with unit stride along the row, copying only when needed."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


LOG2_E = tl.constexpr(1.4426950408889634)


def fast_math() -> bool:
    """Whether kernels may use the PTX approximations below (FAST): on NVIDIA GPUs, not in the CPU
    interpreter (it runs no inline PTX) nor on ROCm."""
    return not interpreting() and torch.version.hip is None


@jit
def _ex2_ftz(x):
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@jit
def _rcp_ftz(x):
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@jit
def sigmoid(x, FAST: tl.constexpr):
    """fp32 1 / (1 + exp(-x)). FAST: 4 SASS instructions an element (FMUL, MUFU.EX2, FADD, MUFU.RCP) against
    tl.sigmoid's 12, whose exp and divide guard subnormal and huge operands with compares, selects and scalings
    (sm_90 SASS of lora_glu's kernels, triton 3.6, 2026-12-06). Flushing subnormals changes no result: where
    exp(-x) < 2^-126 the sum rounds to 1 anyway, and rcp(inf) = 0 where exp(-x) overflows."""
    if FAST:
        return _rcp_ftz(1.0 + _ex2_ftz(x * -LOG2_E))
    return tl.sigmoid(x)


@jit
def exp(x, FAST: tl.constexpr):
    """fp32 e^x; FAST: ex2.approx.ftz (tl.exp's own approximation without its subnormal guard: 3 instructions
    fewer an element; results below 2^-126 become 0)."""
    if FAST:
        return _ex2_ftz(x * LOG2_E)
    return tl.exp(x)


@jit
def tanh_fast(x, FAST: tl.constexpr):
    """fp32 tanh as `tanh` computes it; FAST: its exp and divide as sigmoid's FAST ones."""
    if FAST:
        neg = x < 0
        e = _ex2_ftz(tl.where(neg, x, -x) * (2.0 * LOG2_E))  # exp(-2|x|)
        t = (1.0 - e) * _rcp_ftz(1.0 + e)
        return tl.where(neg, -t, t)
    return tanh(x)


@jit
def tanh(x):
    """fp32 tanh from exp: libdevice's tanh has no CPU-interpreter version. e = exp(-2|x|) never overflows;
    the absolute error stays near fp32 epsilon (relative error grows only for |x| below ~1e-4)."""
    neg = x < 0
    e = tl.exp(2.0 * tl.where(neg, x, -x))  # exp(-2|x|); tl.abs fails in the interpreter inside a device call
    t = (1.0 - e) / (1.0 + e)
    return tl.where(neg, -t, t)


@jit
def dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation, as cuBLAS accumulates: IEEE for fp32 operands (no TF32 rounding), UPCAST
    (dot_upcast: the CPU interpreter with bf16 operands) multiplies fp32 copies."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)
