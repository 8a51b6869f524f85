"""Fused linear + cross entropy against lm_head then F.cross_entropy in fp32: loss, grad of hidden and of
the lm_head weight, with ignored rows, softcapping, both reductions, several chunks and vocab blocks."""

import pytest
import torch
from reference import assert_close, linear_cross_entropy_ref

pytest.importorskip("triton")
import ppalli.kernels.linear_cross_entropy as lce  # noqa: E402
from ppalli.errors import PpalliError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32
N, V, D = 37, 123, 40


def _inputs(train_weight=True, ignore_every=4):
    torch.manual_seed(0)
    hidden = torch.randn(N, D, device=DEVICE, dtype=DTYPE)
    # logits of std ~2: a peaked softmax, and values the softcap of 5 bends noticeably
    weight = (torch.randn(V, D, device=DEVICE, dtype=DTYPE) * 0.3).requires_grad_(train_weight)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[::ignore_every] = -100
    return hidden, weight, labels


def _run(fn, hidden, weight, labels, grad_scale=2.5, **kwargs):
    """loss, grad_hidden, grad_weight of fn, with an upstream gradient that is not 1."""
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_(weight.requires_grad)
    loss = fn(hidden, weight, labels, **kwargs)
    (loss * grad_scale).backward()
    return loss, hidden.grad, weight.grad


def _check(got, want):
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), got, want):
        if b is None:
            assert a is None, f"{name} should be None"
        else:
            assert_close(name, a, b, DTYPE)


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_reference_over_chunks(softcap, reduction):
    hidden, weight, labels = _inputs()
    kwargs = {"softcap": softcap, "reduction": reduction}
    got = _run(lce.linear_cross_entropy, hidden, weight, labels, chunk_size=8, **kwargs)  # 5 chunks, last of 5
    _check(got, _run(linear_cross_entropy_ref, hidden, weight, labels, **kwargs))


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
def test_online_softmax_over_vocab_blocks(monkeypatch, softcap):
    """A vocab block of 32 makes each row walk 4 blocks (the last partial), as V=128k does on the GPU."""
    monkeypatch.setattr(lce, "MAX_BLOCK_V", 32)
    hidden, weight, labels = _inputs()
    got = _run(lce.linear_cross_entropy, hidden, weight, labels, softcap=softcap)
    _check(got, _run(linear_cross_entropy_ref, hidden, weight, labels, softcap=softcap))


def test_frozen_weight_has_no_weight_gradient():
    hidden, weight, labels = _inputs(train_weight=False)
    got = _run(lce.linear_cross_entropy, hidden, weight, labels, reduction="mean")
    _check(got, _run(linear_cross_entropy_ref, hidden, weight, labels, reduction="mean"))


def test_all_ignored_mean_is_zero_not_nan():
    hidden, weight, labels = _inputs(ignore_every=1)
    loss, grad_hidden, grad_weight = _run(lce.linear_cross_entropy, hidden, weight, labels, reduction="mean")
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0


def test_no_grad_gives_the_same_loss():
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        loss = lce.linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    assert_close("loss", loss, linear_cross_entropy_ref(hidden, weight, labels), DTYPE)


def test_chunk_rows_keep_logits_near_budget():
    """Llama-3 (V=128256) in bf16: 1024 rows = 250 MiB of logits a chunk; small N takes one chunk."""
    assert lce._chunk_rows(8192, 128256, 2) == 1024
    assert lce._chunk_rows(8192, 128256, 4) == 512
    assert lce._chunk_rows(37, 123, 4) == 37


def test_rejects_bad_arguments():
    hidden, weight, labels = _inputs()
    with pytest.raises(PpalliError, match="reduction"):
        lce.linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(PpalliError, match="hidden \\(N, d\\)"):
        lce.linear_cross_entropy(hidden, weight.t(), labels)
