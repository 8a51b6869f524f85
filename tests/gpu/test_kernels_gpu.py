"""The fused kernels compiled on a GPU, bf16 and fp32, on Llama-3-8B shapes, against the fp32 references.

Skipped without CUDA (tests/conftest.py marks this folder). Run: python -m pytest tests/gpu/test_kernels_gpu.py -q
"""

import sys
from pathlib import Path

import pytest
import torch

# The references and tolerance tables live beside the CPU kernel tests; one copy of the math.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "kernels"))
from reference import (  # noqa: E402
    LOSS_RTOL,
    assert_close,
    assert_close_norm,
    geglu_ref,
    hf_cos_sin,
    linear_cross_entropy_ref,
    rms_norm_ref,
    rope_ref,
    swiglu_ref,
)

from ppalli.kernels._utils import jit, sigmoid, tanh_fast, tl  # noqa: E402
from ppalli.kernels.geglu import geglu  # noqa: E402
from ppalli.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from ppalli.kernels.rms_norm import rms_norm  # noqa: E402
from ppalli.kernels.rope import apply_rope  # noqa: E402
from ppalli.kernels.swiglu import swiglu  # noqa: E402

DTYPES = [torch.bfloat16, torch.float32]
DTYPE_IDS = ["bf16", "fp32"]
# Against a reference that computes the logits as HF does (bf16 GEMM, then upcast) only the fp32
# summation order of the softmax differs: 1e-4 relative is loose by two orders of magnitude.
HF_PATH_LOSS_RTOL = 1e-4


def _grads(fn, inputs, grad_out):
    """Run fn on fresh leaves of inputs (those that require grad), backprop grad_out -> (out, grads)."""
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grad_out)
    return outs, [t.grad for t in leaves if t.requires_grad]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("train_weight", [True, False], ids=["dw", "frozen"])
def test_rms_norm(dtype, offset, train_weight):
    torch.manual_seed(0)
    x = torch.randn(4096, 4096, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(4096, device="cuda", dtype=dtype).requires_grad_(train_weight)
    dy = (torch.randn_like(x),)
    got = _grads(lambda a, w: rms_norm(a, w, 1e-5, offset), (x, weight), dy)
    want = _grads(lambda a, w: rms_norm_ref(a, w, 1e-5, offset), (x, weight), dy)
    assert_close("y", got[0][0], want[0][0], dtype)
    assert_close("dx", got[1][0], want[1][0], dtype)
    if train_weight:
        # dW sums 4096 rows (|dW| ~ 100): an elementwise 1e-5 bound fails on summation order alone
        # (H100, 2026-11-25: max abs diff 4.6e-5 in fp32), so compare the relative norm of the error.
        assert_close_norm("dW", got[1][1], want[1][1], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rope(dtype):
    torch.manual_seed(0)
    b, hq, hk, t, d = 4, 32, 8, 2048, 128
    q = torch.randn(b, t, hq, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()  # (B, Hq, T, D)
    k = torch.randn(b, t, hk, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()  # (B, Hk, T, D)
    position_ids = (torch.arange(t, device="cuda") % 700)[None]  # packed samples of 700 tokens, (1, T)
    cos, sin = hf_cos_sin(position_ids, d, base=500000.0, dtype=dtype)
    grad_out = (torch.randn_like(q), torch.randn_like(k))
    got = _grads(lambda a, c: apply_rope(a, c, cos, sin), (q, k), grad_out)
    want = _grads(lambda a, c: rope_ref(a, c, cos, sin), (q, k), grad_out)
    for name, a, ref in zip(("q_out", "k_out"), got[0], want[0]):
        assert_close(name, a, ref, dtype)
    # Gradients by relative norm: the bf16 reference rounds each product before the sum, the kernel once in
    # fp32, so single elements near a cancellation sat 2 bf16 ulps apart (H100, 2026-11-25: dq max 3.1e-2).
    for name, a, ref in zip(("dq", "dk"), got[1], want[1]):
        assert_close_norm(name, a, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op, ref", [(swiglu, swiglu_ref), (geglu, geglu_ref)], ids=["swiglu", "geglu"])
def test_glu(op, ref, dtype):
    torch.manual_seed(0)
    gate = (torch.randn(4, 2048, 14336, device="cuda", dtype=dtype) * 3).requires_grad_()
    up = torch.randn_like(gate).requires_grad_()
    dh = (torch.randn_like(gate),)
    got, want = _grads(op, (gate, up), dh), _grads(ref, (gate, up), dh)
    assert_close("h", got[0][0], want[0][0], dtype)
    # Gradients by relative norm: the kernel builds tanh from exp (libdevice tanh does not run in the CPU
    # interpreter), which sat 1.3e-5 off torch's tanh on single fp32 elements (H100, 2026-11-25).
    for name, a, b in zip(("dgate", "dup"), got[1], want[1]):
        assert_close_norm(name, a, b, dtype)


def _ce_inputs(n, dtype, train_weight=False, vocab=128256, d=4096):
    torch.manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
    # logits of std ~2, as a trained lm_head gives; larger logits only grow the bf16 rounding of the logits
    weight = (torch.randn(vocab, d, device="cuda", dtype=dtype) * 2 / d**0.5).requires_grad_(train_weight)
    labels = torch.randint(0, vocab, (n,), device="cuda")
    labels[torch.rand(n, device="cuda") < 0.3] = -100  # prompts and padding
    return hidden, weight, labels


@pytest.mark.parametrize("softcap", [None, 10.0], ids=["plain", "softcap"])
def test_linear_cross_entropy_bf16_llama3(softcap):
    dtype = torch.bfloat16
    hidden, weight, labels = _ce_inputs(8192, dtype)
    kwargs = {"softcap": softcap, "reduction": "mean"}
    got = _grads(lambda h: linear_cross_entropy(h, weight, labels, **kwargs), (hidden,), None)
    want = _grads(lambda h: linear_cross_entropy_ref(h, weight, labels, chunk_rows=1024, **kwargs), (hidden,), None)
    loss, ref_loss = got[0][0], want[0][0]
    assert abs(loss.item() - ref_loss.item()) <= LOSS_RTOL[dtype] * abs(ref_loss.item()), (loss, ref_loss)
    assert_close_norm("grad_hidden", got[1][0], want[1][0], dtype)
    with torch.no_grad():
        hf_loss = linear_cross_entropy_ref(hidden, weight, labels, chunk_rows=1024, hf_logits=True, **kwargs)
    assert abs(loss.item() - hf_loss.item()) <= HF_PATH_LOSS_RTOL * abs(hf_loss.item()), (loss, hf_loss)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_cross_entropy_trained_lm_head(dtype):
    hidden, weight, labels = _ce_inputs(2048, dtype, train_weight=True)
    got = _grads(lambda h, w: linear_cross_entropy(h, w, labels), (hidden, weight), None)
    want = _grads(lambda h, w: linear_cross_entropy_ref(h, w, labels, chunk_rows=512), (hidden, weight), None)
    loss, ref_loss = got[0][0], want[0][0]
    assert abs(loss.item() - ref_loss.item()) <= LOSS_RTOL[dtype] * abs(ref_loss.item()), (loss, ref_loss)
    for name, a, b in zip(("grad_hidden", "grad_weight"), got[1], want[1]):
        assert_close_norm(name, a, b, dtype)


def test_linear_cross_entropy_never_holds_the_logits():
    """Llama-3 lm_head, 8x1024 tokens, bf16: the (N, V) logits alone would take 2 GiB; the fused path's
    extra peak is one 256 MiB chunk plus grad_hidden twice (64 MiB each) and cuBLAS workspace."""
    hidden, weight, labels = _ce_inputs(8192, torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(hidden, weight, labels, reduction="mean").backward()
    torch.cuda.synchronize()
    extra_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    assert extra_mib < 768, f"fused CE peaked {extra_mib:.0f} MiB above its inputs"


@jit
def _act_kernel(X, S, T, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    tl.store(S + offs, sigmoid(x, FAST), mask=offs < n)
    tl.store(T + offs, tanh_fast(x, FAST), mask=offs < n)


def test_fast_sigmoid_and_tanh_match_torch():
    """_utils.sigmoid / tanh_fast with FAST (ex2 / rcp.approx.ftz PTX) against torch's fp32 sigmoid and tanh,
    over the range where a bf16 activation lives and far past it (exp overflows and flushes at |x| > 88)."""
    x = torch.cat([torch.linspace(-120, 120, 200_001, device="cuda"), torch.randn(100_000, device="cuda"),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.7, -88.7, 1e4, -1e4], device="cuda")])
    for fast in (True, False):
        s, t = torch.empty_like(x), torch.empty_like(x)
        _act_kernel[(-(-x.numel() // 1024),)](x, s, t, x.numel(), FAST=fast, BLOCK=1024)
        # exp as 2^(x log2 e): the product's rounding, |x| 2^-24, becomes relative error (5e-6 at |x| = 120, in
        # tl.exp as here); the flush to 0 only where torch's sigmoid is below 2^-126
        torch.testing.assert_close(s, torch.sigmoid(x), rtol=1e-5, atol=1.2e-38)
        # tanh from exp(-2|x|) cancels near 0 (1 - e), as the exact path does: an absolute floor there
        torch.testing.assert_close(t, torch.tanh(x), rtol=2e-6, atol=2e-7)
