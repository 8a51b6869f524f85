"""The fused LoRA MLP against PEFT's modules run by autograd: the output and the gradients of x and of
every LoRA A and B, fp32 on the CPU (Triton interpreted) or CUDA, aligned and odd shapes."""

import pytest
import torch
import torch.nn.functional as F
from fast_reference import assert_close, lora_params, wrap_lora
from torch import nn

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels._utils import recomputing  # noqa: E402
from ppalli.kernels.lora_linear import base_weight  # noqa: E402
from ppalli.kernels.lora_mlp import lora_mlp  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}
# (batch, tokens, hidden, intermediate, rank): a multiple-of-16 case and an odd one (prime sizes).
SHAPES = [(2, 8, 32, 64, 8), (3, 5, 37, 53, 3)]


class MLP(nn.Module):
    def __init__(self, d: int, i: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, i, bias=bias), nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)
        self.act = ACTS[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _model(d, i, r, act, bias=False):
    torch.manual_seed(0)
    base = MLP(d, i, act, bias).requires_grad_(False)
    return wrap_lora(base, ["gate_proj", "up_proj", "down_proj"], r=r, lora_alpha=2 * r).to(DEVICE)


def _run(fn, model, x, dy):
    """Output, dx and the LoRA gradients of one forward + backward."""
    x = x.detach().requires_grad_()
    y = fn(x)
    params = lora_params(model)
    grads = torch.autograd.grad(y, [x, *params.values()], dy, allow_unused=True)
    return y, dict(zip(["x", *params], grads))


def _fused(model, act):
    m = model.base_model.model
    return lambda x: lora_mlp(x, m.gate_proj, m.up_proj, m.down_proj, act=act)


def _compare(model, act, shape):
    b, t, d = shape
    torch.manual_seed(2)
    x, dy = torch.randn(b, t, d, device=DEVICE), torch.randn(b, t, d, device=DEVICE)
    y, g = _run(_fused(model, act), model, x, dy)
    y_ref, g_ref = _run(model, model, x, dy)
    assert_close("output", y, y_ref, "block")
    assert len(g) == 7  # x and A, B of gate, up and down
    for name in g_ref:
        assert g[name] is not None, f"{name}: no gradient"
        assert_close(f"grad {name}", g[name], g_ref[name], "block")


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("shape", SHAPES, ids=["aligned", "odd"])
def test_forward_and_every_gradient_match_peft(shape, act):
    b, t, d, i, r = shape
    _compare(_model(d, i, r, act), act, (b, t, d))


@pytest.mark.parametrize("shape", SHAPES, ids=["aligned", "odd"])
def test_residual_is_added_and_gets_the_output_gradient(shape):
    """lora_mlp(x, residual=r) = r + MLP(x), the add inside down's LoRA pass; r's gradient is dy itself."""
    b, t, d, i, r = shape
    model = _model(d, i, r, "silu")
    m = model.base_model.model
    torch.manual_seed(3)
    x, res, dy = (torch.randn(b, t, d, device=DEVICE) for _ in range(3))
    res = res.requires_grad_()
    y = lora_mlp(x, m.gate_proj, m.up_proj, m.down_proj, residual=res)
    assert_close("output", y, res.detach() + model(x), "block")
    y.backward(dy)
    assert torch.equal(res.grad, dy)
    wide = res.detach().double()  # a wider residual stream is added outside, in its own dtype
    y = lora_mlp(x, m.gate_proj, m.up_proj, m.down_proj, residual=wide)
    assert y.dtype == torch.float64
    assert_close("wide output", y.float(), res.detach() + model(x), "block")


def test_recompute_without_a_stash_gives_the_same_gradients():
    """Under recomputing() with no stash, the block sums down's h Ad^T in the activation kernel without
    writing h and skips down's GEMM; the backward, which never reads the thrown-away output, gives the
    gradients of a plain forward."""
    model = _model(37, 53, 3, "silu")
    torch.manual_seed(4)
    x, dy = torch.randn(2, 5, 37, device=DEVICE), torch.randn(2, 5, 37, device=DEVICE)
    _, ref = _run(_fused(model, "silu"), model, x, dy)
    with recomputing():
        _, got = _run(_fused(model, "silu"), model, x, dy)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_base_biases_are_added_and_stay_frozen():
    model = _model(37, 53, 3, "silu", bias=True)
    _compare(model, "silu", (2, 5, 37))


def test_disabled_adapter_computes_the_base_mlp():
    """Inside peft's disable_adapter() (a DPO reference pass) the block is the frozen base MLP."""
    model = _model(37, 53, 3, "silu")
    x = torch.randn(2, 5, 37, device=DEVICE)
    res = torch.randn(2, 5, 37, device=DEVICE)
    with model.disable_adapter():
        assert_close("output", _fused(model, "silu")(x), model(x), "block")
        m = model.base_model.model  # the residual joins the pass that would add down's LoRA term
        y = lora_mlp(x, m.gate_proj, m.up_proj, m.down_proj, residual=res)
        assert_close("output + residual", y, res + model(x), "block")


def test_frozen_adapters_still_give_the_input_gradient():
    model = _model(37, 53, 3, "gelu_tanh")
    model.requires_grad_(False)
    x = torch.randn(2, 5, 37, device=DEVICE, requires_grad=True)
    dx = torch.autograd.grad(_fused(model, "gelu_tanh")(x), x, torch.ones(2, 5, 37, device=DEVICE))[0]
    dx_ref = torch.autograd.grad(model(x), x, torch.ones(2, 5, 37, device=DEVICE))[0]
    assert_close("grad x", dx, dx_ref, "block")


def test_a_second_backward_is_refused():
    """The backward writes the activation gradients over the saved g and u; a second pass must not reuse them."""
    model = _model(32, 64, 8, "silu")
    y = _fused(model, "silu")(torch.randn(2, 3, 32, device=DEVICE, requires_grad=True))
    y.sum().backward(retain_graph=True)
    with pytest.raises(PpalliError, match="one backward"):
        y.sum().backward()


def test_unknown_activation_is_refused():
    model = _model(32, 64, 8, "silu")
    with pytest.raises(PpalliError, match="act must be one of"):
        _fused(model, "relu")(torch.randn(1, 2, 32, device=DEVICE))


def _quantize_4bit(base: nn.Module, bnb) -> nn.Module:
    """The MLP with its three Linears replaced by bitsandbytes NF4 Linear4bit holding the same weights."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(base, name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                              quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
        setattr(base, name, q.to(DEVICE))  # quantized on the move
    return base


def test_qlora_4bit_base_matches_lora_on_the_dequantized_weight():
    """An NF4 base: the block dequantizes through base_weight, in the forward and again in the backward.
    The reference is PEFT on a dense twin holding those dequantized weights (whether they equal
    bitsandbytes' is test_nf4.py's question); bnb's CPU 4-bit GEMM is not exact (5e-2 off x @ W^T in fp32
    here), so PEFT on the 4-bit layers themselves is compared on the GPU (tests/gpu/test_fast_gpu.py)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    q_model = wrap_lora(_quantize_4bit(MLP(32, 64, "silu").requires_grad_(False), bnb),
                        ["gate_proj", "up_proj", "down_proj"]).to(DEVICE)
    dense = MLP(32, 64, "silu").requires_grad_(False).to(DEVICE)
    qm = q_model.base_model.model
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(dense, name).weight.data = base_weight(getattr(qm, name), torch.float32).clone()
    d_model = wrap_lora(dense, ["gate_proj", "up_proj", "down_proj"])  # same seed: the same A and B
    for (n, p), (n_ref, p_ref) in zip(lora_params(q_model).items(), lora_params(d_model).items()):
        assert n == n_ref and torch.equal(p, p_ref), f"{n}: the twins' LoRA weights differ"
    torch.manual_seed(2)
    x, dy = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 5, 32, device=DEVICE)
    y, g = _run(_fused(q_model, "silu"), q_model, x, dy)
    y_ref, g_ref = _run(d_model, d_model, x, dy)
    assert_close("output", y, y_ref, "block")
    for name, ref in g_ref.items():
        assert_close(f"grad {name}", g[name], ref, "block")
