"""FactorCache: the fused blocks' bf16 copies of fp32 LoRA factors follow every change of the parameters, and
all stale copies are refreshed by one multi-tensor copy."""

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
    assert stacked.shape == (6, 8) and stacked.dtype == torch.bfloat16
    torch.testing.assert_close(stacked, torch.cat([a, b]).detach().to(torch.bfloat16), rtol=0, atol=0)


def test_an_optimizer_step_refreshes_every_stale_group_in_one_copy(monkeypatch):
    a, b, c = _params((4, 8), (2, 8), (8, 4))
    cache = FactorCache()
    first = cache.get((a, b), torch.bfloat16)
    cache.get((c,), torch.bfloat16)
    copies = _CountCopies(monkeypatch)
    assert cache.get((a, b), torch.bfloat16) is first and copies.calls == 0  # unchanged: no copy
    opt = torch.optim.SGD([a, b, c], lr=0.5)
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt.step()  # in place: each parameter's _version moves
    again = cache.get((c,), torch.bfloat16)
    assert copies.calls == 1, "the first read after the step refreshes all groups"
    assert cache.get((a, b), torch.bfloat16) is first and copies.calls == 1, "already refreshed with c"
    torch.testing.assert_close(first, torch.cat([a, b]).detach().to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(again, c.detach().to(torch.bfloat16), rtol=0, atol=0)


def test_load_state_dict_and_data_assignment_are_seen():
    layer = nn.Linear(8, 4, bias=False)
    cache = FactorCache()
    cache.get((layer.weight,), torch.bfloat16)
    layer.load_state_dict({"weight": torch.full((4, 8), 3.0)})  # copy_ into the parameter
    assert (cache.get((layer.weight,), torch.bfloat16) == 3.0).all()
    layer.weight.data = torch.full((4, 8), 5.0)  # a new storage, the version counter may not move
    assert (cache.get((layer.weight,), torch.bfloat16) == 5.0).all()


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
    loss, count = fast_step(model, [([1, 2, 3], [1, 2, 3])])
    (loss / count).backward()
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
