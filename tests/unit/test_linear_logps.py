"""linear_logps (ppalli/train/linear_logps.py) and the preference objectives' sequence_logps through it: the
values and gradients of log softmax(h W^T)[target] from full fp32 logits, chunked or not, softcapped or not."""

import math

import pytest
import torch
from fast.fast_reference import CPU_TIER, tiny_lora_model

import ppalli.train.linear_logps as linear_logps_module
from ppalli.data.collate import preference_collate, preference_pack_collate
from ppalli.kernels._utils import interpreting
from ppalli.models.fast import apply_fast_path, fully_swapped
from ppalli.train.linear_logps import linear_logps
from ppalli.train.objectives import DPO, ORPO, SimPO, make_objective, sequence_logps


def _full_logps(h, w, t, softcap=None):
    z = h @ w.t()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z.float().log_softmax(-1).gather(1, t[:, None]).squeeze(1)


def _kernel_route(monkeypatch, on: bool) -> None:
    """Send frozen heads through the fused cross entropy's Triton kernel (CPU interpreter) or torch's ops."""
    if on:
        pytest.importorskip("triton")
        if not interpreting():
            pytest.skip("the kernel route on CPU tensors needs Triton's interpreter (tests/gpu covers CUDA)")
    monkeypatch.setattr(linear_logps_module, "_use_kernel", lambda h, w: on)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("rows", [3, 1024])  # 3: seven chunks, the last one short
# frozen: d logp / d h made in the forward (torch's ops or the Triton kernel); trained: recompute in the backward
@pytest.mark.parametrize("train_weight,kernel", [(False, False), (False, True), (True, False)])
def test_values_and_gradients_match_full_logits(softcap, rows, train_weight, kernel, monkeypatch):
    _kernel_route(monkeypatch, kernel)
    torch.manual_seed(0)
    h = torch.randn(20, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=train_weight)  # logits of ~4: the softcap of 2 bends them
    t = torch.randint(0, 50, (20,))
    g = torch.randn(20)
    inputs = (h, w) if train_weight else (h,)
    ref = _full_logps(h, w, t, softcap)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    got = linear_logps(h, w, t, softcap, rows=rows)
    grads = torch.autograd.grad(got, inputs, g)
    # fp32 on both sides, the same operations per row; log-softmax sums in another order: a few ulps
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for d, d_ref in zip(grads, ref_grads):
        torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)


def test_under_no_grad_it_returns_values_without_a_graph():
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(10, 8)
    with torch.no_grad():
        out = linear_logps(h, w, torch.randint(0, 10, (6,)))
    assert out.grad_fn is None and out.shape == (6,)


def _pairs():
    """2 chosen rows, then 2 rejected, prompts unlabeled, one row padded."""
    torch.manual_seed(3)
    ids = torch.randint(3, 256, (4, 15))
    mask = torch.ones_like(ids)
    mask[3, 10:] = 0
    labels = ids.clone()
    labels[:, :6] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "num_pairs": 2}


def _full_sequence_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    tgt = batch["labels"][:, 1:]
    keep = tgt != -100
    logp = logits.log_softmax(-1).gather(2, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * keep).sum(-1), keep.sum(-1)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("objective", [DPO(0.1), ORPO(0.1), SimPO(2.0, 1.0)])
@pytest.mark.parametrize("kernel", [False, True])
def test_preference_losses_and_lora_gradients_match_full_logits(family, objective, kernel, monkeypatch):
    import ppalli.train.objectives as objectives

    _kernel_route(monkeypatch, kernel)

    model = tiny_lora_model(family, attn="eager" if family == "gemma2" else "sdpa").train()
    with torch.no_grad():  # logits of a few units would pass gemma2's cap of 3.0 unchanged
        model.get_output_embeddings().weight.mul_(200)
    batch = _pairs()
    sums, counts = sequence_logps(model, batch)
    ref_sums, ref_counts = _full_sequence_logps(model, batch)
    assert counts.tolist() == ref_counts.tolist() == [9, 9, 9, 4]
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-3)  # sums of ~10 terms of ~100 in fp32

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss, _ = objective(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = _loss_and_grads(model, objective, batch)
    monkeypatch.setattr(objectives, "sequence_logps", _full_sequence_logps)
    ref_loss, ref_grads = _loss_and_grads(model, objective, batch)
    _assert_same(loss, grads, ref_loss, ref_grads)


def _loss_and_grads(model, objective, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = objective(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(loss, grads, ref_loss, ref_grads):
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, ref in ref_grads.items():  # fp32 both ways; summed in another order: ~1e-6 of the largest value
        diff, top = (grads[name] - ref).abs().max().item(), ref.abs().max().item()
        assert diff <= 1e-5 * top, f"{name}: max diff {diff:.3e}, largest value {top:.3e}"


def _pair_samples():
    """Three preference pairs of unequal lengths (prompt, chosen, rejected tokens), prompts unlabeled."""
    gen = torch.Generator().manual_seed(5)
    pairs = []
    for n_prompt, n_chosen, n_rejected in [(5, 6, 3), (4, 2, 7), (6, 5, 5)]:
        prompt, chosen, rejected = (torch.randint(3, 256, (n,), generator=gen).tolist()
                                    for n in (n_prompt, n_chosen, n_rejected))
        pairs.append({"chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * n_prompt + chosen,
                      "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * n_prompt + rejected})
    return pairs


@pytest.mark.parametrize("objective", [DPO(0.1), ORPO(0.1), SimPO(2.0, 1.0)])
# HF's layers (masks from position_ids) / ppalli's (varlen; tests/gpu/test_preference_gpu.py on CUDA)
@pytest.mark.parametrize("fast", [False, pytest.param(True, marks=CPU_TIER)])
def test_packed_pairs_give_the_padded_batchs_logps_losses_and_gradients(objective, fast):
    model = tiny_lora_model("llama").train()
    with torch.no_grad():  # B = 0 at init: give the adapters a value so DPO's margin is not 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    if fast:
        apply_fast_path(model, attention_backend="auto")
        assert fully_swapped(model)
    pairs = _pair_samples()
    packed, padded = preference_pack_collate(pairs), preference_collate(pairs, pad_id=0)
    tokens = sum(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs)
    assert packed["input_ids"].shape == (1, tokens) and padded["input_ids"].numel() == 6 * 11  # no padding
    sums, counts = sequence_logps(model, packed)
    ref_sums, ref_counts = sequence_logps(model, padded)
    assert counts.tolist() == ref_counts.tolist() == [6, 2, 5, 3, 7, 5]  # chosen answers' tokens, then rejected
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-4)
    loss, grads = _loss_and_grads(model, objective, packed)
    ref_loss, ref_grads = _loss_and_grads(model, objective, padded)
    _assert_same(loss, grads, ref_loss, ref_grads)


def test_simpo_is_the_papers_loss_on_length_normalized_log_likelihoods(monkeypatch):
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta / |y_w| log p(y_w) - beta / |y_l| log p(y_l) - gamma),
    by hand for two pairs; no reference pass; beta None takes 2.0."""
    import ppalli.train.objectives as objectives

    lp_c, lp_r = torch.tensor([-6.0, -2.0]), torch.tensor([-4.0, -9.0])
    n_c, n_r = torch.tensor([3, 2]), torch.tensor([1, 3])
    monkeypatch.setattr(objectives, "_pair_logps", lambda model, batch: (lp_c, lp_r, n_c, n_r))
    loss, stats = SimPO(2.5, 1.25)(None, {"num_pairs": 2})
    margins = [2.5 * (-6 / 3 - -4 / 1), 2.5 * (-2 / 2 - -9 / 3)]  # 5.0, 5.0
    want = sum(math.log1p(math.exp(-(m - 1.25))) for m in margins)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert stats["pairs"] == 2 and stats["margin_sum"].item() == pytest.approx(sum(margins))
    simpo = make_objective("simpo", beta=None, gamma=0.5)
    assert (simpo.beta, simpo.gamma) == (2.0, 0.5) and make_objective("dpo", beta=None).beta == 0.1
