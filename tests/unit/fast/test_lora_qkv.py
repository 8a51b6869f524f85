"""lora_qkv (three LoRA projections over one saved input) and lora_linear against PEFT's modules: outputs
and the gradients of x and every LoRA A and B, fp32, aligned and odd shapes, with and without biases."""

import pytest
import torch
from fast_reference import assert_close, lora_params, wrap_lora
from torch import nn

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels.lora_linear import base_weight, lora_parts  # noqa: E402
from ppalli.kernels.lora_qkv import lora_linear, lora_qkv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (batch, tokens, hidden, q out, kv out, rank): 4 heads x 8 with 2 kv heads; odd: 3 heads x 7, 1 kv head.
SHAPES = [(2, 8, 32, 32, 16, 8), (3, 5, 37, 21, 7, 3)]


class Attn(nn.Module):
    def __init__(self, d, q_out, kv_out, bias):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, q_out, bias=bias), nn.Linear(d, kv_out, bias=bias)
        self.v_proj, self.o_proj = nn.Linear(d, kv_out, bias=bias), nn.Linear(q_out, d, bias=False)


def _model(d, q_out, kv_out, r, bias):
    torch.manual_seed(0)
    base = Attn(d, q_out, kv_out, bias).requires_grad_(False)
    return wrap_lora(base, ["q_proj", "k_proj", "v_proj", "o_proj"], r=r, lora_alpha=3 * r).to(DEVICE)


def _grads(outs, douts, x, model):
    params = lora_params(model)
    grads = torch.autograd.grad(outs, [x, *params.values()], douts, allow_unused=True)
    return dict(zip(["x", *params], grads))


def _check_grads(g, g_ref, expect_none=()):
    for name, ref in g_ref.items():
        if ref is None or any(k in name for k in expect_none):
            assert g[name] is None, f"{name}: the fused block returned a gradient the reference has not"
            continue
        assert g[name] is not None, f"{name}: no gradient"
        assert_close(f"grad {name}", g[name], ref, "block")


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "qwen2_bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=["aligned", "odd"])
def test_qkv_forward_and_every_gradient_match_peft(shape, bias):
    b, t, d, q_out, kv_out, r = shape
    model = _model(d, q_out, kv_out, r, bias)
    m = model.base_model.model
    torch.manual_seed(2)
    x = torch.randn(b, t, d, device=DEVICE, requires_grad=True)
    douts = [torch.randn(b, t, n, device=DEVICE) for n in (q_out, kv_out, kv_out)]
    outs = lora_qkv(x, m.q_proj, m.k_proj, m.v_proj)
    refs = (m.q_proj(x), m.k_proj(x), m.v_proj(x))
    for name, o, ref in zip("QKV", outs, refs):
        assert_close(name, o, ref, "block")
    # o_proj is not used: its A and B get no gradient on either side
    _check_grads(_grads(outs, douts, x, model), _grads(refs, douts, x, model), expect_none=("o_proj",))


@pytest.mark.parametrize("shape", SHAPES, ids=["aligned", "odd"])
def test_lora_linear_matches_peft(shape):
    b, t, d, q_out, kv_out, r = shape
    model = _model(d, q_out, kv_out, r, bias=False)
    o = model.base_model.model.o_proj
    torch.manual_seed(3)
    x = torch.randn(b, t, q_out, device=DEVICE, requires_grad=True)
    dy = torch.randn(b, t, d, device=DEVICE)
    y, y_ref = lora_linear(x, o), o(x)
    assert_close("output", y, y_ref, "block")
    g, g_ref = _grads(y, dy, x, model), _grads(y_ref, dy, x, model)
    _check_grads(g, g_ref, expect_none=("q_proj", "k_proj", "v_proj"))


def test_plain_linear_without_lora_runs_as_a_linear():
    torch.manual_seed(0)
    lin = nn.Linear(13, 7).to(DEVICE).requires_grad_(False)
    x = torch.randn(4, 13, device=DEVICE, requires_grad=True)
    y = lora_linear(x, lin)
    assert_close("output", y, lin(x), "block")
    dx = torch.autograd.grad(y, x, torch.ones_like(y))[0]
    assert_close("grad x", dx, lin.weight.sum(0).expand(4, 13), "block")


def test_unsupported_adapter_states_are_refused():
    model = _model(32, 32, 16, 8, bias=False)
    q = model.base_model.model.q_proj
    q.merge()
    with pytest.raises(PpalliError, match="merged"):
        lora_parts(q)
    q.unmerge()
    assert lora_parts(q).a is not None
    assert base_weight(q) is q.get_base_layer().weight  # 16-bit: the weight itself, no copy


def test_dora_is_refused():
    torch.manual_seed(0)
    model = wrap_lora(Attn(16, 16, 8, False).requires_grad_(False), ["q_proj"], use_dora=True)
    with pytest.raises(PpalliError, match="DoRA"):
        lora_parts(model.base_model.model.q_proj)
