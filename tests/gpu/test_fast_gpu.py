"""The fast path on CUDA in bf16 at realistic shapes (Llama-3.2-1B: hidden 2048, intermediate 8192, 32 heads
of 64, 8 kv heads): fused LoRA blocks, every attention backend, packed varlen attention, whole models
(loss and every LoRA gradient, packed rows, several families) and QLoRA.

Accuracy rule: bf16 results are compared with an fp32 "truth" (the same weights upcast), and the fast
path must be no less accurate than the bf16 reference path (HF + PEFT) is: err_fast <= 2 * err_ref + floor.
Relative errors are norms ||a - t|| / ||t||: bf16 keeps 8 bits of mantissa (eps 7.8e-3), a GEMM with fp32
accumulation rounds once (~3e-3 of a tensor's norm), and a chain of them adds up; elementwise tolerances
fail on the near-zero entries such sums produce. PEFT computes the LoRA branch in fp32 (its adapters
stay fp32 beside a bf16 base), the fused blocks in bf16, hence the factor 2 and the floor.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")
from ppalli.kernels.lora_mlp import lora_mlp  # noqa: E402
from ppalli.kernels.lora_qkv import lora_linear, lora_qkv  # noqa: E402
from ppalli.models.attention import _torch_varlen, attend, resolve_backend  # noqa: E402
from ppalli.models.fast import apply_fast_path  # noqa: E402
from ppalli.models.fast_loss import fast_causal_lm_loss  # noqa: E402

DEVICE = "cuda"
BF16 = torch.bfloat16
D, FFN, HQ, HK, HD = 2048, 8192, 32, 8, 64  # Llama-3.2-1B
TOKENS = (2, 1024)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLOOR = 5e-3  # blocks: one or two bf16 roundings of a tensor (~3e-3 each, see above)
MODEL_FLOOR = 2e-2  # whole models: 2 layers of norm, attention, MLP and a 128k-vocab loss, all bf16


def rel(a: torch.Tensor, truth: torch.Tensor) -> float:
    a, truth = a.detach().float(), truth.detach().float()
    return ((a - truth).norm() / truth.norm().clamp(min=1e-30)).item()


def check(name: str, fast, ref, truth, floor: float) -> None:
    e_fast, e_ref = rel(fast, truth), rel(ref, truth)
    assert e_fast <= 2 * e_ref + floor, f"{name}: fast error {e_fast:.2e} vs reference {e_ref:.2e} (floor {floor})"


def _lora(base: nn.Module, targets, r=16) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))


def _grads(model, outs, inputs, douts):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(outs, [*inputs, *params.values()], douts, allow_unused=True)
    return dict(zip([f"input{i}" for i in range(len(inputs))] + list(params), grads))


def _twins(base_fp32: nn.Module, targets):
    """(bf16 base + fp32 adapters as PEFT makes them, the same upcast to fp32) on the GPU."""
    model = _lora(base_fp32.to(DEVICE, BF16).requires_grad_(False), targets)
    return model, copy.deepcopy(model).float()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, FFN, bias=False), nn.Linear(D, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(D, HQ * HD), nn.Linear(D, HK * HD)  # Qwen2-style biases
        self.v_proj = nn.Linear(D, HK * HD)
        self.o_proj = nn.Linear(HQ * HD, D, False)


def test_lora_mlp_bf16():
    torch.manual_seed(0)
    model, truth = _twins(MLP(), ["gate_proj", "up_proj", "down_proj"])
    x = torch.randn(*TOKENS, D, device=DEVICE, dtype=BF16)
    dy = torch.randn_like(x)
    m = model.base_model.model
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.float().requires_grad_()]
    fast = lora_mlp(xs[0], m.gate_proj, m.up_proj, m.down_proj)
    ref = model(xs[1])
    tru = truth(xs[2])
    check("output", fast, ref, tru, FLOOR)
    g_fast, g_ref = _grads(model, fast, xs[:1], dy), _grads(model, ref, xs[1:2], dy)
    g_tru = _grads(truth, tru, xs[2:], dy.float())
    for name in g_tru:
        check(name, g_fast[name], g_ref[name], g_tru[name], FLOOR)


def test_lora_qkv_and_o_bf16():
    torch.manual_seed(0)
    model, truth = _twins(QKV(), ["q_proj", "k_proj", "v_proj", "o_proj"])
    x = torch.randn(*TOKENS, D, device=DEVICE, dtype=BF16)
    douts = [torch.randn(*TOKENS, n, device=DEVICE, dtype=BF16) for n in (HQ * HD, HK * HD, HK * HD)]
    m, t = model.base_model.model, truth.base_model.model
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.float().requires_grad_()]
    fast = lora_qkv(xs[0], m.q_proj, m.k_proj, m.v_proj)
    ref = (m.q_proj(xs[1]), m.k_proj(xs[1]), m.v_proj(xs[1]))
    tru = (t.q_proj(xs[2]), t.k_proj(xs[2]), t.v_proj(xs[2]))
    for i in range(3):
        check(f"output {i}", fast[i], ref[i], tru[i], FLOOR)
    g_fast, g_ref = _grads(model, fast, xs[:1], douts), _grads(model, ref, xs[1:2], douts)
    g_tru = _grads(truth, tru, xs[2:], [d.float() for d in douts])
    for name in g_tru:
        if g_tru[name] is not None:
            check(name, g_fast[name], g_ref[name], g_tru[name], FLOOR)
    h = torch.randn(*TOKENS, HQ * HD, device=DEVICE, dtype=BF16)
    check("o_proj", lora_linear(h, m.o_proj), m.o_proj(h), t.o_proj(h.float()), FLOOR)


def _attention_truth(q, k, v, window=None, softcap=None):
    """fp32 causal attention written out, GQA by repeat, softcap after the scale as HF's eager path ->
    (B, T, Hq, D)."""
    q, k, v = q.float(), k.float().repeat_interleave(HQ // HK, 1), v.float().repeat_interleave(HQ // HK, 1)
    t = q.shape[2]
    i, j = torch.arange(t, device=q.device)[:, None], torch.arange(t, device=q.device)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    s = (q @ k.transpose(-1, -2)) * HD**-0.5
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    return (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def _qkv_heads(b, t, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(b, h, t, HD, device=DEVICE, dtype=BF16, generator=g).requires_grad_() for h in (HQ, HK, HK)]


@pytest.mark.parametrize("backend", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "sdpa", "eager"])
def test_attention_backends_bf16(backend):
    q, k, v = _qkv_heads(*TOKENS)
    _check_attention(backend, attend(q, k, v, backend=backend), _attention_truth(q, k, v), (q, k, v))


def _check_attention(label, out, truth, qkv):
    """One bf16 attention against fp32: softmax in fp32 inside every kernel, outputs rounded once."""
    assert rel(out, truth) < 1e-2, f"{label}: output error {rel(out, truth):.2e}"
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, qkv, dout)
    grads_truth = torch.autograd.grad(truth, qkv, dout.float())
    for name, g, gt in zip("qkv", grads, grads_truth):
        assert rel(g, gt) < 2e-2, f"{label}: d{name} error {rel(g, gt):.2e}"


@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_dense_sliding_window_skips_blocks_and_matches_bf16(monkeypatch, kernel):
    """A window shorter than the rows (Mistral, Gemma's local layers): attend runs WINDOW_KERNEL, not SDPA with
    a (T, T) mask; output and gradients as the written-out fp32 attention."""
    from ppalli.models import attention

    monkeypatch.setattr(attention, "WINDOW_KERNEL", kernel)
    ran = []
    monkeypatch.setattr(attention, "_sdpa", lambda *a, **k: ran.append("sdpa"))  # must not be reached
    q, k, v = _qkv_heads(*TOKENS)
    out = attend(q, k, v, backend="sdpa_cudnn", window=256)
    assert not ran
    _check_attention(kernel, out, _attention_truth(q, k, v, 256), (q, k, v))


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_softcap_attention_runs_in_flex_bf16(monkeypatch, packed):
    """Gemma-2's logit softcap (no flash-attn here) runs in compiled flex_attention: output and q/k/v gradients
    against fp32 written out, in a dense batch and per sample of a packed row of uneven samples."""
    from ppalli.models import attention

    calls = []
    real = attention._flex
    monkeypatch.setattr(attention, "_flex", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    lengths = [300, 1, 700, 1047] if packed else [TOKENS[1]] * TOKENS[0]
    q, k, v = _qkv_heads(1, sum(lengths)) if packed else _qkv_heads(*TOKENS)
    cap = 2.0  # logits of these inputs reach ~4: the cap changes the result
    kw = dict(cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE,
                                      dtype=torch.int32), max_seqlen=max(lengths)) if packed else {}
    out = attend(q, k, v, backend="sdpa_cudnn", softcap=cap, **kw)
    assert calls, "softcap did not go through flex_attention"
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    truth = _samples_truth(q, k, v, lengths if packed else None, softcap=cap)
    assert rel(out, truth) < 1e-2, f"output error {rel(out, truth):.2e}"
    for name, g, gt in zip("qkv", grads, torch.autograd.grad(truth, (q, k, v), dout.float())):
        assert rel(g, gt) < 2e-2, f"d{name} error {rel(g, gt):.2e}"


def _samples_truth(q, k, v, lengths=None, window=None, softcap=None):
    """_attention_truth of each packed sample of a (1, H, T, D) row, joined (the whole batch without lengths)."""
    if lengths is None:
        return _attention_truth(q, k, v, window, softcap)
    parts, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        parts.append(_attention_truth(q[:, :, sl], k[:, :, sl], v[:, :, sl], window, softcap))
        start += n
    return torch.cat(parts, dim=1)


FLASH_BACKENDS = ["flash_attention_2", "flash_attention_3", "flash_attention_4"]


@pytest.mark.parametrize("backend", FLASH_BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("kw", [{}, {"window": 256}, {"softcap": 2.0}], ids=["causal", "window", "softcap"])
def test_flash_attn_backends_bf16(backend, packed, kw):
    """Whichever flash-attn packages are installed (flash-attn 4: `pip install 'ppalli[fa4]'`), through
    attend: a dense batch laid out as the fast path's lora_qkv hands it over ((B, T, H, D) memory seen as
    (B, H, T, D)), and a packed row of uneven samples through the varlen kernel; output and q/k/v gradients
    against fp32 written out."""
    from ppalli.models.attention import _import_flash

    module, why = _import_flash(backend)
    if module is None:
        pytest.skip(why)
    lengths = [300, 1, 700, 1047] if packed else None
    b, t = (1, 2048) if packed else TOKENS
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = [torch.randn(b, t, h, HD, device=DEVICE, dtype=BF16, generator=g).transpose(1, 2).requires_grad_()
               for h in (HQ, HK, HK)]
    cu = dict(cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE,
                                      dtype=torch.int32), max_seqlen=max(lengths)) if packed else {}
    out = attend(q * (2.0 if "softcap" in kw else 1.0), k, v, backend=backend, **cu, **kw)
    truth = _samples_truth(q * (2.0 if "softcap" in kw else 1.0), k, v, lengths, **kw)
    _check_attention(f"{backend} {kw}", out, truth, (q, k, v))


def test_resolve_backend_on_this_gpu():
    backend, reason = resolve_backend("auto", DEVICE)
    if torch.cuda.get_device_capability()[0] >= 9:
        assert backend == "sdpa_cudnn", reason


@pytest.mark.parametrize("window", [None, 256])
def test_packed_varlen_equals_samples_alone_bf16(window):
    assert _torch_varlen() is not None, "torch has no varlen_attn with window_size (expected from torch 2.11)"
    lengths = [300, 1, 700, 1047]  # 2048 tokens, a one-token sample
    q, k, v = _qkv_heads(1, sum(lengths))
    cu = torch.tensor([0, 300, 301, 1001, 2048], device=DEVICE, dtype=torch.int32)
    packed = attend(q, k, v, backend="sdpa_cudnn", cu_seqlens=cu, max_seqlen=1047, window=window)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        truth = _attention_truth(q[:, :, s], k[:, :, s], v[:, :, s], window)
        assert rel(packed[:, s], truth) < 1e-2, f"sample at {start}: error {rel(packed[:, s], truth):.2e}"
        start += n
    dq = torch.autograd.grad(packed.float().pow(2).sum(), q)[0]
    assert torch.isfinite(dq).all()


@pytest.mark.parametrize("window", [None, 256])
def test_packed_samples_of_one_length_equal_samples_alone_bf16(window):
    """4 samples of 512 tokens in one row run as a dense batch of 4 (cuDNN), forward and backward."""
    q, k, v = _qkv_heads(1, 2048)
    cu = torch.arange(0, 2049, 512, device=DEVICE, dtype=torch.int32)
    packed = attend(q, k, v, backend="sdpa_cudnn", cu_seqlens=cu, max_seqlen=512, window=window)
    for start in range(0, 2048, 512):
        s = slice(start, start + 512)
        truth = _attention_truth(q[:, :, s], k[:, :, s], v[:, :, s], window)
        assert rel(packed[:, s], truth) < 1e-2, f"sample at {start}: error {rel(packed[:, s], truth):.2e}"
    dq = torch.autograd.grad(packed.float().pow(2).sum(), q)[0]
    assert torch.isfinite(dq).all()


def _llama_1b_like(layers=2, vocab=128256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=D, intermediate_size=FFN, num_hidden_layers=layers, num_attention_heads=HQ,
                      num_key_value_heads=HK, head_dim=HD, vocab_size=vocab, max_position_embeddings=4096,
                      rope_theta=500000.0, tie_word_embeddings=True, use_cache=False)
    cfg._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        return LlamaForCausalLM(cfg).to(BF16).requires_grad_(False)


def _reference_loss(model, ids, labels, **kw):
    logits = model(input_ids=ids, use_cache=False, **kw).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")


def _loss_and_grads(model, fn):
    loss = fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _compare_model(model, truth, ids, labels, **fast_kw):
    ref_kw = {k: v for k, v in fast_kw.items() if k == "position_ids"}
    loss_ref, g_ref = _loss_and_grads(model, lambda: _reference_loss(model, ids, labels, **ref_kw))
    loss_tru, g_tru = _loss_and_grads(truth, lambda: _reference_loss(truth, ids, labels, **ref_kw))
    handle = apply_fast_path(model, attention_backend="auto", log=lambda line: None)
    loss_fast, g_fast = _loss_and_grads(model, lambda: fast_causal_lm_loss(model, ids, labels, **fast_kw)[0])
    handle.revert()
    check("loss", loss_fast, loss_ref, loss_tru, 2e-3)
    for name in g_tru:
        check(name, g_fast[name], g_ref[name], g_tru[name], MODEL_FLOOR)


def test_llama_1b_like_model_bf16():
    model = _lora(_llama_1b_like(), TARGETS)
    truth = copy.deepcopy(model).float()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, TOKENS, device=DEVICE, generator=g)
    labels = ids.clone()
    labels[:, :100] = -100
    _compare_model(model, truth, ids, labels)


def test_llama_1b_like_packed_row_bf16():
    """One packed row of 3 samples (varlen attention) against HF's own packed-sequence masking."""
    model = _lora(_llama_1b_like(), TARGETS)
    truth = copy.deepcopy(model).float()
    lengths = [512, 1000, 536]
    gen = torch.Generator(DEVICE).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, sum(lengths)), device=DEVICE, generator=gen)
    labels = ids.clone()
    starts = [0, 512, 1512]
    labels[0, starts] = -100  # no loss across a boundary
    pos = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])[None]
    cu = torch.tensor([0, 512, 1512, 2048], device=DEVICE, dtype=torch.int32)
    _compare_model(model, truth, ids, labels, position_ids=pos, cu_seqlens=cu, max_seqlen=1000)


FAMILY_CONFIGS = {
    "qwen2": ("Qwen2Config", dict()),
    "qwen3": ("Qwen3Config", dict(head_dim=64)),
    "gemma2": ("Gemma2Config", dict(head_dim=64, sliding_window=128, query_pre_attn_scalar=64,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "mistral": ("MistralConfig", dict(sliding_window=128)),
}


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_families_bf16(family):
    import transformers
    from transformers import AutoModelForCausalLM

    name, extra = FAMILY_CONFIGS[family]
    cfg = getattr(transformers, name)(hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=32064,
                                      max_position_embeddings=2048, use_cache=False, **extra)
    cfg._attn_implementation = "eager" if family == "gemma2" else "sdpa"  # HF's SDPA drops Gemma-2's softcap
    torch.manual_seed(0)
    with torch.device(DEVICE):
        base = AutoModelForCausalLM.from_config(cfg).to(BF16).requires_grad_(False)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family == "phi3" else TARGETS
    model = _lora(base, targets)
    truth = copy.deepcopy(model).float()
    ids = torch.randint(0, 32064, (2, 512), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    _compare_model(model, truth, ids, ids.clone())


def test_qlora_nf4_bf16():
    """bitsandbytes NF4 base layers: the fused blocks dequantize through ppalli's nf4 kernel; the reference
    runs bnb's CUDA 4-bit matmul. Both use the same quantized weights, so they are compared directly."""
    bnb = pytest.importorskip("bitsandbytes")
    base = _llama_1b_like(layers=2, vocab=32000)
    for layer in base.model.layers:
        for owner, name in [(layer.self_attn, n) for n in TARGETS[:4]] + [(layer.mlp, n) for n in TARGETS[4:]]:
            lin = getattr(owner, name)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=BF16,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            setattr(owner, name, q.to(DEVICE))
    model = _lora(base, TARGETS)
    gen = torch.Generator(DEVICE).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, TOKENS, device=DEVICE, generator=gen)
    loss_ref, g_ref = _loss_and_grads(model, lambda: _reference_loss(model, ids, ids))
    handle = apply_fast_path(model, attention_backend="auto", log=lambda line: None)
    loss_fast, g_fast = _loss_and_grads(model, lambda: fast_causal_lm_loss(model, ids, ids)[0])
    handle.revert()
    # bf16 against bf16 on identical 4-bit weights: the LoRA branch (fp32 in PEFT, bf16 here) and summation
    # order differ; seen-size margins as for the whole-model checks above.
    assert rel(loss_fast, loss_ref) < 2e-3, f"loss {loss_fast.item()} vs {loss_ref.item()}"
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) < 5e-2, f"{name}: {rel(g_fast[name], g_ref[name]):.2e}"


@pytest.mark.parametrize("mode,layers", [("offload", None), ("full", None), ("selective", 3)])
def test_recompute_modes_match_no_recompute_bf16(mode, layers):
    """8 layers, so offload's side-stream copies and prefetches overlap real work: a missed wait would read a
    half-copied or stale input. SDPA's math kernel keeps attention deterministic (cuDNN's backward sums in a
    varying order), and deterministic algorithms keep lora_B's gradient off lora_b_bwd's atomic adds (2e-7
    apart run to run), so recompute, which replays the same kernels on the same inputs, must match bit for
    bit. Each step draws new tokens: a stale buffer from the previous step would not hold the right values."""
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: cuBLAS needs no workspace setting
    try:
        _recompute_matches(mode, layers)
    finally:
        torch.use_deterministic_algorithms(False)


def _recompute_matches(mode, layers):
    from ppalli.train.recompute import apply_recompute, remove_recompute

    model = _lora(_llama_1b_like(layers=8, vocab=32000), TARGETS).train()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    batches = [torch.randint(0, 32000, (4, 1024), device=DEVICE, generator=g) for _ in range(2)]
    handle = apply_fast_path(model, attention_backend="sdpa_math", log=lambda line: None)
    ref = [_loss_and_grads(model, lambda ids=ids: fast_causal_lm_loss(model, ids, ids.clone())[0]) for ids in batches]
    apply_recompute(model, mode, layers)
    got = [_loss_and_grads(model, lambda ids=ids: fast_causal_lm_loss(model, ids, ids.clone())[0]) for ids in batches]
    remove_recompute(model)
    handle.revert()
    for (loss_ref, g_ref), (loss_re, g_re) in zip(ref, got):
        assert torch.equal(loss_re, loss_ref)
        for name in g_ref:
            assert torch.equal(g_re[name], g_ref[name]), (name, rel(g_re[name], g_ref[name]))
