"""lora_qkv (three LoRA projections over one saved input) and lora_linear against PEFT's modules: outputs
and the gradients of x and every LoRA A and B, fp32, aligned and odd shapes, with and without biases."""

import pytest
import torch
from fast_reference import assert_close, lora_params, wrap_lora
from torch import nn

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels.lora_linear import (  # noqa: E402
    base_weight,
    lora_parts,
    stack_base_weights,
    stacked_base_weight,
    unstack_base_weights,
)
from ppalli.kernels.lora_qkv import lora_linear, lora_qkv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (batch, tokens, hidden, q out, kv out, rank): 4 heads x 8 with 2 kv heads; odd: 3 heads x 7, 1 kv head.
SHAPES = [(2, 8, 32, 32, 16, 8), (3, 5, 37, 21, 7, 3)]


class Attn(nn.Module):
    def __init__(self, d, q_out, kv_out, bias):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, q_out, bias=bias), nn.Linear(d, kv_out, bias=bias)
        self.v_proj, self.o_proj = nn.Linear(d, kv_out, bias=bias), nn.Linear(q_out, d, bias=False)


def _model(d, q_out, kv_out, r, bias, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    torch.manual_seed(0)
    base = Attn(d, q_out, kv_out, bias).requires_grad_(False)
    return wrap_lora(base, list(targets), r=r, lora_alpha=3 * r).to(DEVICE)


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


def _cos_sin(position_ids, d):
    """HF's default rotary tables, (B, T, D) each."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=DEVICE) / d)
    emb = (position_ids.float()[..., None] * inv_freq).repeat(1, 1, 2)
    return emb.cos(), emb.sin()


def _bases(m):
    mods = [getattr(m, n) for n in ("q_proj", "k_proj", "v_proj")]
    return [p.get_base_layer() if hasattr(p, "get_base_layer") else p for p in mods]  # a projection without LoRA


def _check_qkv(outs, refs, x, model):
    """The block's (q, k, v) against the reference's, then every gradient for one random output gradient."""
    douts = [torch.randn_like(ref) for ref in refs]
    for name, o, ref in zip("QKV", outs, refs):
        assert o.shape == ref.shape
        assert_close(name, o, ref, "block")
    _check_grads(_grads(outs, douts, x, model), _grads(refs, douts, x, model), expect_none=("o_proj",))


# (batch, tokens, hidden, q out, kv out, rank, head dim): RoPE needs an even head dim; odd: 3 heads x 6, 1 kv.
ROPE_SHAPES = [(2, 8, 32, 32, 16, 8, 8), (3, 5, 37, 18, 6, 3, 6)]


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked_weights", "own_weights"])
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=["aligned", "odd"])
def test_qkv_with_rope_matches_peft_then_hf_rope(shape, stacked, monkeypatch):
    """RoPE inside the block: outputs (B, H, T, D) and every gradient against PEFT's projections then HF's
    apply_rotary_pos_emb; with the weights stacked, dx's base term takes the one-GEMM branch."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    import ppalli.kernels.lora_qkv as mod

    b, t, d, q_out, kv_out, r, hd = shape
    model = _model(d, q_out, kv_out, r, bias=True)
    m = model.base_model.model
    if stacked:
        assert stack_base_weights(_bases(m))
    found, real = [], mod.stacked_base_weight
    monkeypatch.setattr(mod, "stacked_base_weight", lambda *a: found.append(real(*a)) or found[-1])
    torch.manual_seed(2)
    x = torch.randn(b, t, d, device=DEVICE, requires_grad=True)
    pos = torch.stack([torch.randperm(t, device=DEVICE) for _ in range(b)])  # per-row positions (packing)
    cos, sin = _cos_sin(pos, hd)
    outs = mod.lora_qkv(x, m.q_proj, m.k_proj, m.v_proj, rope=(cos, sin), head_dim=hd)
    q, k, v = (p(x).view(b, t, -1, hd).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
    refs = (*apply_rotary_pos_emb(q, k, cos, sin), v)
    _check_qkv(outs, refs, x, model)
    assert len(found) == 1 and (found[0] is not None) == stacked


@pytest.mark.parametrize("offset, k_adapter", [(0.0, True), (1.0, False)], ids=["qwen3_norm", "gemma3_norm_plain_k"])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked_weights", "own_weights"])
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=["aligned", "odd"])
def test_qkv_with_qk_norms_and_rope_matches_peft_then_hf_norms_then_rope(shape, stacked, offset, k_adapter):
    """Qwen3 / Gemma 3: q and k RMSNormed per head (frozen weights, offset + w) before RoPE, inside the block,
    against PEFT's projections, the norm in fp32 and HF's apply_rotary_pos_emb; every gradient. Without an
    adapter on k, k's norm runs without a LoRA term while q's has one."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, t, d, q_out, kv_out, r, hd = shape
    targets = ("q_proj", "k_proj", "v_proj", "o_proj") if k_adapter else ("q_proj", "v_proj", "o_proj")
    model = _model(d, q_out, kv_out, r, bias=False, targets=targets)
    m = model.base_model.model
    if stacked:
        assert stack_base_weights(_bases(m))
    torch.manual_seed(3)
    wq, wk = (torch.randn(hd, device=DEVICE) * 0.3 + 1.0 - offset for _ in range(2))
    x = torch.randn(b, t, d, device=DEVICE, requires_grad=True)
    pos = torch.stack([torch.randperm(t, device=DEVICE) for _ in range(b)])
    cos, sin = _cos_sin(pos, hd)
    outs = lora_qkv(x, m.q_proj, m.k_proj, m.v_proj, rope=(cos, sin), head_dim=hd,
                    qk_norms=((wq, 1e-6), (wk, 1e-5), offset))

    def normed(z, w, eps):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)

    q, k, v = (p(x).view(b, t, -1, hd) for p in (m.q_proj, m.k_proj, m.v_proj))
    q, k, v = normed(q, wq, 1e-6).transpose(1, 2), normed(k, wk, 1e-5).transpose(1, 2), v.transpose(1, 2)
    refs = (*apply_rotary_pos_emb(q, k, cos, sin), v)
    _check_qkv(outs, refs, x, model)


def test_qk_norms_come_with_rope():
    model = _model(32, 32, 16, 8, bias=False)
    m = model.base_model.model
    w, x = torch.ones(8, device=DEVICE), torch.randn(2, 4, 32, device=DEVICE)
    with pytest.raises(PpalliError, match="qk_norms come with rope"):
        lora_qkv(x, m.q_proj, m.k_proj, m.v_proj, qk_norms=((w, 1e-6), (w, 1e-6), 0.0))


def test_stacked_base_weights_keep_parameters_and_values_and_revert():
    model = _model(32, 32, 16, 8, bias=False)
    bases = _bases(model.base_model.model)
    params = [w.weight for w in bases]
    before = [p.detach().clone() for p in params]
    assert stacked_base_weight(bases, params[0].dtype) is None  # three separate allocations
    assert stack_base_weights(bases) and stack_base_weights(bases)  # twice: already stacked, nothing to do
    w = stacked_base_weight(bases, params[0].dtype)
    assert w.shape == (64, 32) and torch.equal(w, torch.cat(before))
    assert [b.weight for b in bases] == params and all(torch.equal(p, q) for p, q in zip(params, before))
    assert stacked_base_weight(bases, torch.float16) is None  # another dtype: the per-weight GEMMs
    assert stacked_base_weight(bases[::-1], params[0].dtype) is None  # out of order
    unstack_base_weights(bases)
    assert stacked_base_weight(bases, params[0].dtype) is None
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert len({p.untyped_storage().data_ptr() for p in params}) == 3


def test_stacking_refuses_mixed_inputs():
    lins = [nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(6, 4)]  # v reads another width
    assert not stack_base_weights(lins)
    assert not stack_base_weights([nn.Linear(8, 4), nn.Linear(8, 4).half(), nn.Linear(8, 4)])
