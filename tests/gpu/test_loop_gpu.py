"""The training step on CUDA never waits for the device: collate counts on the host, the loss, the gradient norm
and the clipping stay on the device, and train_loop reads a step through loop.Readout once the next is queued.
A read in the step (a .item(), a device count) would drain the queue and leave the device idle while the host
collates and launches the next step; torch's sync debug mode turns any such read into an error here."""

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from fast.fast_reference import tiny_lora_model  # noqa: E402

from ppalli.models.fast import apply_fast_path, fully_swapped  # noqa: E402
from ppalli.models.fast_loss import fast_causal_lm_loss  # noqa: E402
from ppalli.plan.planner import Plan  # noqa: E402
from ppalli.train.loop import Hooks, LoopSettings, LoopState, Readout, run_step, train_loop  # noqa: E402
from ppalli.train.objectives import SFT  # noqa: E402
from ppalli.train.optim import make_optimizer  # noqa: E402
from ppalli.train.recipe import make_collate  # noqa: E402

CUDA = torch.device("cuda")
PLAN = Plan(device="cuda", precision="bf16", attention="sdpa", quantization="none", checkpointing="none",
            micro_batch_size=4, grad_accum=1, packing=True, fast_path=True, compile=False)


class _Tokenizer:
    pad_token_id = 0


def _samples(n: int = 16) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 200, (int(torch.randint(20, 60, (1,), generator=gen)),), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 5 + ids[5:]})
    return out


def _setup():
    model = tiny_lora_model("llama").to("cuda")
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)  # bf16 base, fp32 adapters, as PEFT makes them
    model.train()
    apply_fast_path(model, attention_backend="auto")
    assert fully_swapped(model)

    def lm_loss(m, batch):
        return fast_causal_lm_loss(m, batch["input_ids"], batch["labels"], position_ids=batch.get("position_ids"),
                                   cu_seqlens=batch.get("cu_seqlens"), max_seqlen=batch.get("max_seqlen"))

    opt = make_optimizer(model.parameters(), name="adamw", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999),
                         device=CUDA)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    settings = LoopSettings(total_steps=4, batch_size=8, max_grad_norm=1.0, eval_every=0, save_every=0,
                            log_every=1, seed=0, max_seq_len=128, device=CUDA)
    return model, opt, sched, SFT(lm_loss), settings, Hooks(collate=make_collate(_Tokenizer(), CUDA, "sft"))


def test_a_training_step_never_waits_for_the_device():
    model, opt, sched, objective, settings, hooks = _setup()
    samples = _samples()
    run_step(model, opt, sched, objective, samples[:8], PLAN, settings, LoopState(), hooks)  # warm: autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = run_step(model, opt, sched, objective, samples[8:], PLAN, settings, LoopState(), hooks)
        readout = Readout(out, start=torch.cuda.Event(enable_timing=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.is_tensor(out["loss"]) and out["loss"].is_cuda and torch.is_tensor(out["grad_norm"])
    assert readout.keys and readout.host.is_pinned()


def test_the_loop_reports_each_step_with_its_loss():
    model, opt, sched, objective, settings, _ = _setup()
    rows: list = []
    hooks = Hooks(collate=make_collate(_Tokenizer(), CUDA, "sft"), on_step=lambda s, o: rows.append((s.step, o)))
    train_loop(model, opt, sched, objective, _samples(), [], PLAN, settings, LoopState(), hooks)
    assert [s for s, _ in rows] == [1, 2, 3, 4]
    for _, o in rows:
        assert type(o["loss"]) is float and 4.0 < o["loss"] < 7.0  # ~ln(vocab) for a random tiny model
        assert o["seconds"] > 0 and o["grad_norm"] > 0
