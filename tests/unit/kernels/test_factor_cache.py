"""FactorCache: the fused blocks' bf16 copies of fp32 LoRA factors follow every change of the parameters, and
all stale copies are refreshed by one multi-tensor copy."""

import weakref

import pytest
import torch
from torch import nn

from ppalli.kernels.factor_cache import FactorCache, factor_cast, factor_stack, using_factor_cache
from ppalli.kernels.lora_linear import grad_mm


def _params(*shapes):
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


class _CountCopies:
    """Counts torch._foreach_copy_ calls (the refresh) while active."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = torch._foreach_copy_

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, "_foreach_copy_", counted)


def test_a_group_is_the_cast_row_stack():
    a, b = _params((4, 8), (2, 8))
    cache = FactorCache()
    torch.testing.assert_close(cache.get((a,), torch.bfloat16), a.detach().to(torch.bfloat16), rtol=0, atol=0)
    stacked = cache.get((a, b), torch.bfloat16)
    assert stacked.shape == (6, 8) and stacked.dtype == torch.bfloat16 and stacked.is_contiguous()
    torch.testing.assert_close(stacked, torch.cat([a, b]).detach().to(torch.bfloat16), rtol=0, atol=0)


def _forward(cache, layers, factors):
    """What a forward pass of `layers` fused layers reads: each layer's groups, in order."""
    out = []
    for i in range(layers):
        cache.start_layer(i)
        out.append([cache.get(group, torch.bfloat16) for group in factors])
    return out


def test_one_copy_a_pass_made_whatever_wrote_the_parameters(monkeypatch):
    a, b, c = _params((4, 8), (2, 8), (8, 4))
    groups = [(a, b), (c,)]
    cache = FactorCache()
    first = _forward(cache, 2, groups)  # the first pass copies each group as it meets it
    assert first[0][0] is first[1][0], "later layers of the pass read the same copy"
    copies = _CountCopies(monkeypatch)
    with torch.no_grad():
        a.data.add_(1.0)  # through .data, as a raw-pointer optimizer writes: no version counter moves
    second = _forward(cache, 2, groups)
    assert copies.calls == 1, "every group of a later pass in one multi-tensor copy"
    torch.testing.assert_close(second[0][0], torch.cat([a, b]).detach().to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(second[0][1], c.detach().to(torch.bfloat16), rtol=0, atol=0)
    assert first[0][0] is not second[0][0] and not torch.equal(first[0][0], second[0][0]), (
        "a new buffer each pass: the last pass's copies, which a graph may still hold, stay as they were")


def test_a_recompute_reads_its_pass_copies():
    (a,) = _params((4, 8))
    cache = FactorCache()
    made = _forward(cache, 3, [(a,)])
    # a recompute inside the backward calls no start_layer (the fused layer checks is_recomputing) and reads
    assert cache.get((a,), torch.bfloat16) is made[2][0]


def test_load_state_dict_and_data_assignment_are_seen_by_the_next_pass():
    layer = nn.Linear(8, 4, bias=False)
    cache = FactorCache()
    _forward(cache, 1, [(layer.weight,)])
    layer.load_state_dict({"weight": torch.full((4, 8), 3.0)})  # copy_ into the parameter
    assert (_forward(cache, 1, [(layer.weight,)])[0][0] == 3.0).all()
    layer.weight.data = torch.full((4, 8), 5.0)  # a new storage
    assert (_forward(cache, 1, [(layer.weight,)])[0][0] == 5.0).all()


def test_without_a_cache_or_for_a_plain_tensor_the_helpers_cast():
    (a,) = _params((4, 8))
    plain = a.detach().clone()
    assert factor_cast(a, torch.float32) is a  # no cast needed: the parameter itself
    cache = FactorCache()
    with using_factor_cache(cache):
        assert factor_cast(plain, torch.bfloat16).dtype == torch.bfloat16 and len(cache) == 0
        assert factor_cast(a, torch.bfloat16) is cache.get((a,), torch.bfloat16)
        assert factor_stack([a, a], torch.bfloat16) is cache.get((a, a), torch.bfloat16)
    assert factor_cast(a, torch.bfloat16) is not cache.get((a,), torch.bfloat16)  # outside: a fresh cast
    torch.testing.assert_close(factor_stack([a, plain], torch.bfloat16), torch.cat([a, plain]).detach().bfloat16())


def test_the_fast_path_handle_owns_the_cache_and_revert_drops_it():
    pytest.importorskip("triton")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from train_alike import fast_step, lora_llama

    from ppalli.models.fast import apply_fast_path

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU the kernels run interpreted (conftest)
    model = lora_llama(64, torch.bfloat16, device=device, hidden=32, layers=1, heads=2, kv_heads=1, rank=4)
    handle = apply_fast_path(model, log=lambda line: None)
    # two forwards before one backward (a preference loss's chosen and rejected passes): the second pass's
    # copies are new buffers, so the first graph's saved copies are intact for its backward
    first, _ = fast_step(model, [([1, 2, 3], [1, 2, 3])])
    second, _ = fast_step(model, [([4, 5, 6, 7], [4, 5, 6, 7])])
    (first + second).backward()
    # one layer: [Aq; Ak; Av], Bq, Bk, Bv, Ao, Bo, [Ag; Au], Bg, Bu, Ad, Bd
    assert len(handle.factors) == 11
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads), "adapter gradients in fp32"
    handle.revert()
    assert len(handle.factors) == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_grad_mm_gives_the_scaled_product_in_the_asked_dtype(device):
    gen = torch.Generator().manual_seed(1)
    m1 = torch.randn(16, 256, generator=gen).to(device, torch.bfloat16)
    m2 = torch.randn(256, 8, generator=gen).to(device, torch.bfloat16)
    want = 0.5 * (m1.float() @ m2.float())
    got = grad_mm(m1, m2, torch.float32, 0.5)
    assert got.dtype == torch.float32 and got.shape == (16, 8)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 rounding at most (CPU path)
    assert grad_mm(m1, m2, torch.bfloat16).dtype == torch.bfloat16


def test_a_deleted_parameter_is_not_kept_alive_and_its_group_goes():
    a, b = _params((4, 8), (2, 8))
    cache = FactorCache()
    _forward(cache, 1, [(a,), (b,)])
    gone = weakref.ref(a)
    del a
    assert gone() is None, "the cache holds its parameters weakly"
    cache.start_layer(0)  # a new pass: its first read walks the groups and drops the dead one
    cache.get((b,), torch.bfloat16)
    assert len(cache) == 1
