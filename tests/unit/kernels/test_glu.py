"""Fused gated activations against their references: SwiGLU silu(gate) * up (Llama, Qwen, Mistral) and GeGLU
gelu_tanh(gate) * up (Gemma); forward and both gradients, through autograd and the launchers the LoRA MLP
block calls (including the in-place backward). One file for both: the ops differ only in the activation."""

import pytest
import torch
from reference import assert_close, geglu_ref, swiglu_ref

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels.geglu import geglu, geglu_bwd, geglu_fwd, geglu_fwd_stacked  # noqa: E402
from ppalli.kernels.swiglu import swiglu, swiglu_bwd, swiglu_fwd, swiglu_fwd_stacked  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32
SHAPES = [(4, 64), (5, 123), (2, 3, 37)]
OPS = {"swiglu": (swiglu, swiglu_fwd, swiglu_bwd, swiglu_ref), "geglu": (geglu, geglu_fwd, geglu_bwd, geglu_ref)}


def _run(fn, gate, up, dh):
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    h = fn(gate, up)
    h.backward(dh)
    return h, gate.grad, up.grad


def _inputs(shape):
    torch.manual_seed(0)
    # gate spans [-12, 12]: both tails of the sigmoid / tanh, where the derivative formula is most fragile.
    gate = torch.randn(shape, device=DEVICE, dtype=DTYPE) * 4
    return gate, torch.randn(shape, device=DEVICE, dtype=DTYPE), torch.randn(shape, device=DEVICE, dtype=DTYPE)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=["aligned", "odd", "3d"])
def test_autograd_matches_reference(op, shape):
    fn, _, _, ref = OPS[op]
    gate, up, dh = _inputs(shape)
    got, want = _run(fn, gate, up, dh), _run(ref, gate, up, dh)
    for name, a, b in zip(("h", "dgate", "dup"), got, want):
        assert_close(name, a, b, DTYPE)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(op):
    fn, _, _, ref = OPS[op]
    gate, up, dh = (t.t() for t in _inputs((37, 5)))  # (5, 37) transposed views
    got, want = _run(fn, gate, up, dh), _run(ref, gate, up, dh)
    for name, a, b in zip(("h", "dgate", "dup"), got, want):
        assert_close(name, a, b, DTYPE)


@pytest.mark.parametrize("op", OPS)
def test_launchers_and_inplace_backward(op):
    _, fwd, bwd, ref = OPS[op]
    gate, up, dh = _inputs((5, 123))
    _, dgate_ref, dup_ref = _run(ref, gate, up, dh)
    assert_close("h", fwd(gate, up), ref(gate, up), DTYPE)
    dgate, dup = bwd(dh, gate, up)
    assert_close("dgate", dgate, dgate_ref, DTYPE)
    assert_close("dup", dup, dup_ref, DTYPE)
    gate_buf, up_buf = gate.clone(), up.clone()
    dgate, dup = bwd(dh, gate_buf, up_buf, inplace=True)
    assert dgate.data_ptr() == gate_buf.data_ptr() and dup.data_ptr() == up_buf.data_ptr()
    assert_close("dgate in place", dgate, dgate_ref, DTYPE)
    assert_close("dup in place", dup, dup_ref, DTYPE)
    with pytest.raises(PpalliError, match=f"{op}_bwd\\(inplace=True\\) needs contiguous"):
        bwd(dh, torch.cat([gate, gate], dim=-1)[:, ::2], up.clone(), inplace=True)  # no room to write in place


@pytest.mark.parametrize("name, stacked", [("swiglu", swiglu_fwd_stacked), ("geglu", geglu_fwd_stacked)])
@pytest.mark.parametrize("rows", [1, 3])
def test_stacked_gate_up_halves_read_in_place(name, stacked, rows):
    """The output of one GEMM over [Wg; Wu], (rows, 2I): the halves are not contiguous apart for rows > 1."""
    gate, up, _ = _inputs((rows, 37))
    gu = torch.cat([gate, up], dim=-1)  # (rows, 74)
    assert_close(name, stacked(gu), OPS[name][3](gate, up), DTYPE)
