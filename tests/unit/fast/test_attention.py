"""`attend`: packed rows (cu_seqlens) equal each sample attended alone, on every path the CPU runs (the
block-diagonal SDPA mask, the eager softcap path, samples of one length as a dense batch); sliding windows
and padding follow HF's rules."""

import pytest
import torch
import torch.nn.functional as F
from fast_reference import assert_close

from ppalli.errors import PpalliError
from ppalli.models import attention
from ppalli.models.attention import attend, causal_mask, packed_mask, resolve_backend

LENGTHS = [5, 1, 9, 3]  # a one-token sample and uneven lengths: 18 tokens in one row


def _qkv(total, hq=4, hk=2, d=8, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, h, total, d, generator=g) for h in (hq, hk, hk))


def _alone(q, k, v, lengths, **kw):
    """Each sample of a (1, H, T, D) row attended on its own -> (1, T, Hq, D)."""
    outs, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        outs.append(attend(q[:, :, s], k[:, :, s], v[:, :, s], **kw))
        start += n
    return torch.cat(outs, dim=1)


def _reference(q, k, v, window=None, softcap=None):
    """Causal attention written out (GQA by repeat, fp32 softmax) -> (B, T, Hq, D)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    t = q.shape[2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    return (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "eager"])
@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_packed_row_equals_samples_attended_alone(backend, window):
    q, k, v = _qkv(sum(LENGTHS))
    kw = dict(backend=backend, window=window)
    packed = attend(q, k, v, cu_seqlens=_cu(LENGTHS), max_seqlen=max(LENGTHS), **kw)
    assert packed.shape == (1, sum(LENGTHS), 4, 8)
    assert_close("packed vs alone", packed, _alone(q, k, v, LENGTHS, **kw), "block")


def test_packing_actually_isolates_samples():
    """The same row without cu_seqlens differs: the comparison above could not pass by accident."""
    q, k, v = _qkv(sum(LENGTHS))
    packed = attend(q, k, v, backend="sdpa", cu_seqlens=_cu(LENGTHS))
    plain = attend(q, k, v, backend="sdpa")
    assert (packed[:, LENGTHS[0]:] - plain[:, LENGTHS[0]:]).abs().max() > 1e-2
    assert_close("first sample", packed[:, :LENGTHS[0]], plain[:, :LENGTHS[0]], "block")


def test_softcapped_packed_row_equals_samples_alone():
    q, k, v = _qkv(sum(LENGTHS))
    q = q * 4  # logits well past the cap of 2, where softcapping changes the result
    kw = dict(backend="sdpa", softcap=2.0)
    packed = attend(q, k, v, cu_seqlens=_cu(LENGTHS), **kw)
    assert_close("packed vs alone", packed, _alone(q, k, v, LENGTHS, **kw), "block")
    assert_close("vs written out", packed[:, :5], _reference(q[:, :, :5], k[:, :, :5], v[:, :, :5], softcap=2.0),
                 "block")


def _flex_on_the_cpu(monkeypatch):
    """Route softcap to flex_attention as on a GPU, through its unfused version (the kernels need CUDA)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(attention, "_can_flex", lambda q: True)
    monkeypatch.setattr(attention, "_flex_compiled", attention._flex_attention)
    calls = []
    real = attention._flex
    monkeypatch.setattr(attention, "_flex", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_softcap_through_flex_equals_the_eager_path(monkeypatch, window):
    """Gemma-2's softcap: flex's score_mod and block mask give the eager path's output, in a dense batch and in a
    packed row of uneven samples (no attention across them). Flex has no backward on the CPU: gradients are
    checked on the GPU (tests/gpu/test_fast_gpu.py)."""
    q, k, v = _qkv(sum(LENGTHS), batch=1)
    q = q * 4  # logits well past the cap
    kw = dict(softcap=2.0, window=window, scale=0.3)
    want = [attend(q, k, v, backend="eager", **kw), attend(q, k, v, backend="eager", cu_seqlens=_cu(LENGTHS), **kw)]
    calls = _flex_on_the_cpu(monkeypatch)
    got = [attend(q, k, v, backend="sdpa", **kw), attend(q, k, v, backend="sdpa", cu_seqlens=_cu(LENGTHS), **kw)]
    assert len(calls) == 2
    for name, g, w in zip(("dense", "packed"), got, want):
        assert_close(name, g, w, "block")
    assert (got[0] - got[1]).abs().max() > 1e-2  # the packed row's samples did not see each other


def test_packed_batch_of_rows_flattens_tokens():
    """cu_seqlens over B*T tokens (HF's flattened convention) with B = 2 rows of 9."""
    q, k, v = _qkv(9, batch=2)
    lengths = [4, 5, 2, 7]  # the third sample ends row 0, the fourth fills row 1
    out = attend(q, k, v, backend="sdpa", cu_seqlens=_cu(lengths))
    flat = [x.transpose(0, 1).reshape(1, x.shape[1], 18, 8) for x in (q, k, v)]
    assert_close("batch vs flat", out.reshape(1, 18, 4, 8), _alone(*flat, lengths, backend="sdpa"), "block")


def _no_block_mask(monkeypatch):
    """Fail if the block-diagonal mask is built: equal-length samples must go through dense attention."""
    def refuse(*args, **kwargs):
        raise AssertionError("packed_mask built for samples of one length")
    monkeypatch.setattr(attention, "packed_mask", refuse)


@pytest.mark.parametrize("backend,softcap", [("sdpa", None), ("sdpa_math", None), ("eager", None), ("sdpa", 2.0)])
@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_samples_of_one_length_attend_as_a_dense_batch(monkeypatch, backend, softcap, window):
    """4 samples of 6 tokens in one row, q/k/v as the fast path hands them (transposed (B, T, H, D) views):
    the same as each sample alone, without the block-diagonal mask or a varlen kernel."""
    _no_block_mask(monkeypatch)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _qkv(24))
    q = q * 4  # past the softcap, where it changes the result
    kw = dict(backend=backend, window=window, softcap=softcap)
    packed = attend(q, k, v, cu_seqlens=_cu([6] * 4), max_seqlen=6, **kw)
    assert packed.shape == (1, 24, 4, 8)
    assert_close("packed vs alone", packed, _alone(q, k, v, [6] * 4, **kw), "block")


def test_samples_of_one_length_across_rows(monkeypatch):
    """3 samples of 6 over 2 rows of 9 (the middle one spans both rows, HF's flattened B*T convention)."""
    _no_block_mask(monkeypatch)
    q, k, v = _qkv(9, batch=2)
    out = attend(q, k, v, backend="sdpa", cu_seqlens=_cu([6, 6, 6]), max_seqlen=6)
    flat = [x.transpose(0, 1).reshape(1, x.shape[1], 18, 8) for x in (q, k, v)]
    assert_close("rows vs flat", out.reshape(1, 18, 4, 8), _alone(*flat, [6, 6, 6], backend="sdpa"), "block")


def test_samples_of_several_lengths_keep_the_block_mask(monkeypatch):
    built = []
    monkeypatch.setattr(attention, "packed_mask", lambda *a: built.append(a) or packed_mask(*a))
    q, k, v = _qkv(sum(LENGTHS))
    attend(q, k, v, backend="sdpa", cu_seqlens=_cu(LENGTHS), max_seqlen=max(LENGTHS))
    assert len(built) == 1


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [None, 4])
def test_unpacked_matches_written_out_attention(backend, window):
    q, k, v = _qkv(11, hq=6, hk=3, batch=2)
    assert_close("attend", attend(q, k, v, backend=backend, window=window), _reference(q, k, v, window), "block")


def test_padding_mask_keeps_real_tokens_exact_and_padding_finite():
    q, k, v = _qkv(8, batch=2)
    valid = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    out = attend(q, k, v, backend="sdpa", attention_mask=valid)
    ref = _reference(q, k, v)
    assert_close("row 0", out[0], ref[0], "block")
    assert_close("row 1 real tokens", out[1, :5], ref[1, :5], "block")
    assert torch.isfinite(out).all()  # padding queries keep their own key: no empty softmax row


def test_left_padding_hides_padding_keys():
    q, k, v = _qkv(6)
    valid = torch.tensor([[0, 0, 1, 1, 1, 1]])
    out = attend(q, k, v, backend="sdpa", attention_mask=valid)
    assert_close("real tokens", out[:, 2:], _reference(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:]), "block")


def test_masks_follow_hf_sliding_window_rule():
    """HF: key j visible from query i iff j <= i and j > i - window (masking_utils.sliding_window_overlay)."""
    t, w = 7, 3
    expected = torch.tensor([[j <= i and j > i - w for j in range(t)] for i in range(t)])
    assert torch.equal(causal_mask(t, "cpu", w)[0, 0], expected)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    doc = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    assert torch.equal(packed_mask(cu, t, w)[0, 0], expected & (doc[:, None] == doc[None, :]))


def test_hf_style_4d_masks_are_used_as_given():
    q, k, v = _qkv(6)
    keep = causal_mask(6, "cpu", 2)
    additive = torch.zeros(1, 1, 6, 6).masked_fill(~keep, torch.finfo(torch.float32).min)
    ref = _reference(q, k, v, window=2)
    assert_close("bool mask", attend(q, k, v, backend="sdpa", attention_mask=keep), ref, "block")
    assert_close("float mask", attend(q, k, v, backend="eager", attention_mask=additive), ref, "block")


def test_scale_is_applied():
    q, k, v = _qkv(5)
    out = attend(q, k, v, backend="sdpa", scale=0.125)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True,
                                         scale=0.125)
    assert_close("scale", out, ref.transpose(1, 2), "block")


def test_resolve_backend_on_cpu_and_pins():
    assert resolve_backend("auto", "cpu")[0] == "sdpa"
    assert resolve_backend("flash_attention_2", "cpu")[0] == "sdpa"
    assert resolve_backend("sdpa_cudnn", "cpu") == ("sdpa_cudnn", "pinned")
    assert resolve_backend("eager", "cpu") == ("eager", "pinned")


def test_unknown_backend_is_refused():
    q, k, v = _qkv(3)
    with pytest.raises(PpalliError, match="not one of"):
        attend(q, k, v, backend="xformers")


def test_sdpa_backend_orders_name_real_kernels():
    """Every CUDA order builds its sdpa_kernel context (the SDPBackend names exist in this torch); the math
    order also runs on the CPU."""
    from ppalli.models.attention import _SDPA_ORDER, _sdpa_backends

    q, k, v = _qkv(4, hq=2, hk=2)
    for backend in _SDPA_ORDER:
        with _sdpa_backends(backend):
            pass
    with _sdpa_backends("sdpa_math"):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close("math", out.transpose(1, 2), _reference(q, k, v), "block")


def test_flex_is_left_under_deterministic_algorithms(monkeypatch):
    """Flex's backward was not measured for bit-repeatability: under torch's deterministic mode softcap takes the
    eager path (checked with a stand-in CUDA tensor: the rule reads is_cuda, dtype and the capability only)."""
    import types

    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device="cuda")
    assert attention._can_flex(q)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not attention._can_flex(q)
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_pads_lengths_to_its_bucket_without_changing_the_result(monkeypatch):
    """Compiled, flex runs T padded up to FLEX_BUCKET (one compile per bucket, not per batch length): a batch of 2
    rows with a sliding window, and a packed row, equal the unpadded run."""
    _flex_on_the_cpu(monkeypatch)
    q, k, v = _qkv(37, batch=2)
    for kw in (dict(window=5), dict(doc=attention._doc_ids(_cu([30, 7]), 37))):
        qs, ks, vs = (x[:1] for x in (q, k, v)) if "doc" in kw else (q, k, v)
        padded = attention._flex(qs * 4, ks, vs, 0.3, kw.get("window"), 2.0, kw.get("doc"), compiled=True)
        plain = attention._flex(qs * 4, ks, vs, 0.3, kw.get("window"), 2.0, kw.get("doc"), compiled=False)
        assert padded.shape == plain.shape == (qs.shape[0], 37, 4, 8)
        assert_close(str(kw), padded, plain, "block")


@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_dense_sliding_window_goes_to_a_block_skipping_kernel(monkeypatch, kernel):
    """A window shorter than the rows runs WINDOW_KERNEL (each row one varlen sample, or flex), not SDPA with a
    (T, T) mask; not when the window covers the rows, with a softcap, eagerly or under deterministic mode. The
    kernels are stand-ins here (CUDA only); tests/gpu checks them against fp32."""
    calls = []
    monkeypatch.setattr(attention, "WINDOW_KERNEL", kernel)
    monkeypatch.setattr(attention, "_can_torch_varlen", lambda q: True)
    monkeypatch.setattr(attention, "_can_flex", lambda q: True)
    monkeypatch.setattr(attention, "_softcap_in_flex", lambda *a: False)  # softcap: the eager path here

    def fake_varlen(q, k, v, scale, window, cu, max_len):
        calls.append(("varlen", cu.tolist(), max_len, window))
        return _reference(q, k, v, window)

    def fake_flex(q, k, v, scale, window, softcap):
        calls.append(("flex", window, softcap))
        return _reference(q, k, v, window)

    monkeypatch.setattr(attention, "_varlen_torch", fake_varlen)
    monkeypatch.setattr(attention, "_flex", fake_flex)
    q, k, v = _qkv(11, hq=6, hk=3, batch=2)
    out = attend(q, k, v, backend="sdpa", window=4)
    assert calls == ([("varlen", [0, 11, 22], 11, 4)] if kernel == "varlen" else [("flex", 4, None)])
    assert_close("windowed", out, _reference(q, k, v, 4), "block")
    attend(q, k, v, backend="sdpa", window=11)  # the window covers every row: plain causal
    attend(q, k, v, backend="sdpa", window=4, softcap=2.0)
    attend(q, k, v, backend="eager", window=4)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        attend(q, k, v, backend="sdpa", window=4)
    finally:
        torch.use_deterministic_algorithms(before)
    assert len(calls) == 1


def _fa_window(t, causal, window_size):
    """flash-attn's visibility rule for (left, right) window sizes: key j seen from query i when
    i - left <= j <= i + right; a negative or None side is unbounded; causal makes right 0."""
    left, right = window_size
    left = None if left is None or left < 0 else left
    right = 0 if causal else (None if right is None or right < 0 else right)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    seen = torch.ones(t, t, dtype=torch.bool)
    if left is not None:
        seen &= j >= i - left
    if right is not None:
        seen &= j <= i + right
    return seen


class _FakeFlash:
    """A flash-attn module written out on the CPU: (B, T, H, D) in and out, native GQA, softcap, windows; the
    varlen signature of flash-attn 4 (its fourth positional parameter is qv, so a caller passing cu_seqlens
    by position would land there); returns (out, lse) as flash-attn 3 and some 4 builds do."""

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, qv=None, softmax_scale=None, causal=False, window_size=(None, None),
                        softcap=0.0, deterministic=False):
        assert qv is None
        self.calls.append(("dense", window_size, softcap, deterministic))
        return self._attend(q, k, v, softmax_scale, causal, window_size, softcap), None

    def flash_attn_varlen_func(self, q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                               max_seqlen_k=None, softmax_scale=None, causal=False, window_size=(None, None),
                               softcap=0.0, deterministic=False):
        assert qv is None and cu_seqlens_q is not None and torch.equal(cu_seqlens_q, cu_seqlens_k)
        self.calls.append(("varlen", cu_seqlens_q.tolist(), max_seqlen_q, window_size))
        cu = cu_seqlens_q.tolist()
        outs = [self._attend(*(x[None, a:b] for x in (q, k, v)), softmax_scale, causal, window_size, softcap)[0]
                for a, b in zip(cu[:-1], cu[1:])]
        return torch.cat(outs), None  # (total, Hq, D)

    @staticmethod
    def _attend(q, k, v, scale, causal, window_size, softcap):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~_fa_window(q.shape[2], causal, window_size), float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2)  # (B, T, Hq, D)


@pytest.mark.parametrize("backend", ["flash_attention_2", "flash_attention_3", "flash_attention_4"])
def test_flash_attn_backends_get_their_layout_windows_and_varlen_by_name(monkeypatch, backend):
    """attend hands a flash-attn module (B, T, H, D) views, HF's window as (window - 1, 0), the softcap, and
    packed rows of uneven lengths through its varlen function by keyword; its output is (B, T, Hq, D). A
    stand-in module here (the kernels are CUDA only); tests/gpu times and checks flash-attn 4 itself."""
    fake = _FakeFlash()
    monkeypatch.setattr(attention, "_import_flash", lambda name: (fake, ""))
    monkeypatch.setattr(attention, "_can_flash_attn", lambda q, b: b in attention._FLASH_MODULES)
    q, k, v = _qkv(11, hq=6, hk=3, batch=2)
    for kw in (dict(), dict(window=4), dict(window=4, softcap=2.0), dict(scale=0.2)):
        out = attend(q, k, v, backend=backend, **kw)
        ref = _reference(q * (0.2 * 8 ** 0.5 if "scale" in kw else 1), k, v, kw.get("window"), kw.get("softcap"))
        assert_close(str(kw), out, ref, "block")
    assert [c[1] for c in fake.calls] == [(-1, -1), (3, 0), (3, 0), (-1, -1)]
    q, k, v = _qkv(sum(LENGTHS))
    packed = attend(q, k, v, backend=backend, cu_seqlens=_cu(LENGTHS), max_seqlen=max(LENGTHS), window=3)
    assert fake.calls[-1] == ("varlen", [0, 5, 6, 15, 18], 9, (2, 0))
    assert_close("varlen", packed, _alone(q, k, v, LENGTHS, backend="sdpa_math", window=3), "block")


def test_flash_attn_4_alone_does_not_pass_for_flash_attn_2(monkeypatch):
    """flash-attn 4's wheel installs `flash_attn` as a bare namespace (only flash_attn.cute): pinning
    flash_attention_2 then says so instead of failing at the first attention call."""
    import types

    monkeypatch.setattr(attention.importlib, "import_module", lambda name: types.ModuleType(name))
    attention._import_flash.cache_clear()
    try:
        module, why = attention._import_flash("flash_attention_2")
        assert module is None and "no flash_attn_func" in why
    finally:
        attention._import_flash.cache_clear()
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        m.setattr(attention, "_import_flash", lambda name: (None, "flash_attn.cute is not installed"))
        name, why = resolve_backend("flash_attention_4", "cuda")
    assert name.startswith("sdpa_") and why.startswith("flash_attention_4 asked but flash_attn.cute is not installed")
