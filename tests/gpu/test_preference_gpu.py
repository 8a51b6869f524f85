"""The preference objectives on CUDA: log p of target tokens through the fused cross entropy's Triton kernel
(bf16, Llama 3's vocabulary) against fp32 full logits, and packed pairs against padded ones on the fast path
(ppalli's varlen decoder against HF's padded batch), DPO's, SimPO's and ORPO's losses and LoRA gradients included.

Errors are relative norms ||a - t|| / ||t|| (tests/gpu/test_fast_gpu.py says why): bf16 logits round at
~4e-3 of their size, so a token's log p moves by ~1e-2 of a logit of ~2 and the sums over a sequence keep that.
"""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from fast.fast_reference import tiny_lora_model  # noqa: E402

import ppalli.train.linear_logps as linear_logps_module  # noqa: E402
from ppalli.data.collate import preference_collate, preference_pack_collate  # noqa: E402
from ppalli.models.fast import apply_fast_path, fully_swapped  # noqa: E402
from ppalli.train.linear_logps import linear_logps  # noqa: E402
from ppalli.train.objectives import DPO, ORPO, SimPO, sequence_logps  # noqa: E402

BF16 = torch.bfloat16


def rel(a: torch.Tensor, truth: torch.Tensor) -> float:
    a, truth = a.detach().float(), truth.detach().float()
    return ((a - truth).norm() / truth.norm().clamp(min=1e-30)).item()


def _truth(h, w, t):
    """log p[t] and d sum(g log p) / d h from fp32 full logits of the bf16 values."""
    h32 = h.detach().float().requires_grad_(True)
    logp = (h32 @ w.float().t()).log_softmax(-1).gather(1, t[:, None]).squeeze(1)
    return logp, h32


@pytest.mark.parametrize("route", ["kernel", "torch"])
def test_linear_logps_bf16_llama3_head(route, monkeypatch):
    if route == "torch":
        monkeypatch.setattr(linear_logps_module, "_use_kernel", lambda h, w: False)
    else:
        assert linear_logps_module._use_kernel(torch.empty(1, device="cuda", dtype=BF16),
                                               torch.empty(1, device="cuda", dtype=BF16))
    torch.manual_seed(0)
    n, d, vocab = 4096, 2048, 128256  # Llama-3.2-1B's head
    h = torch.randn(n, d, device="cuda", dtype=BF16, requires_grad=True)
    w = torch.randn(vocab, d, device="cuda", dtype=BF16) * 2 / d**0.5  # logits of std ~2
    t = torch.randint(0, vocab, (n,), device="cuda")
    g = torch.randn(n, device="cuda")
    got = linear_logps(h, w, t)
    (dh,) = torch.autograd.grad(got, h, g)
    ref, h32 = _truth(h, w, t)
    (dh_ref,) = torch.autograd.grad(ref, h32, g)
    print(f"{route}: log p {rel(got, ref):.2e}, d/dh {rel(dh, dh_ref):.2e}")
    assert rel(got, ref) < 1e-2 and rel(dh, dh_ref) < 2e-2, (rel(got, ref), rel(dh, dh_ref))


def _pairs(n_pairs: int = 6):
    gen = torch.Generator().manual_seed(5)
    pairs = []
    for i in range(n_pairs):
        n_prompt, n_chosen, n_rejected = 20 + 7 * i, 30 + 11 * (i % 3), 15 + 13 * (i % 4)
        prompt, chosen, rejected = (torch.randint(3, 256, (k,), generator=gen).tolist()
                                    for k in (n_prompt, n_chosen, n_rejected))
        pairs.append({"chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * n_prompt + chosen,
                      "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * n_prompt + rejected})
    return pairs


def _on_cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.parametrize("objective", [DPO(0.1), SimPO(2.0, 1.0), ORPO(0.1)], ids=["dpo", "simpo", "orpo"])
def test_packed_pairs_match_padded_on_the_fast_path(objective):
    model = tiny_lora_model("llama").to("cuda")
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(BF16)  # bf16 base, fp32 adapters, as PEFT makes them
        elif "lora_B" in name:
            p.data.normal_(0, 0.05)  # B = 0 at init would make DPO's margin 0
    model.train()
    apply_fast_path(model, attention_backend="auto")
    assert fully_swapped(model)
    pairs = _pairs()
    packed, padded = _on_cuda(preference_pack_collate(pairs)), _on_cuda(preference_collate(pairs, pad_id=0))
    with torch.no_grad():
        sums, counts = sequence_logps(model, packed)
        ref_sums, ref_counts = sequence_logps(model, padded)
    assert counts.tolist() == ref_counts.tolist()
    assert rel(sums, ref_sums) < 1e-2, rel(sums, ref_sums)

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        loss, _ = objective(model, batch)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    (loss, grads), (ref_loss, ref_grads) = loss_and_grads(packed), loss_and_grads(padded)
    print(f"packed against padded: sums {rel(sums, ref_sums):.2e}, loss {rel(loss, ref_loss):.2e}, "
          f"LoRA gradients {rel(grads, ref_grads):.2e}")
    assert rel(loss, ref_loss) < 1e-2 and rel(grads, ref_grads) < 3e-2, (rel(loss, ref_loss), rel(grads, ref_grads))
