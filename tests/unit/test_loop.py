"""The training loop's bookkeeping: each step's numbers reach on_step once, in order, as the eager values, and
before that step's evaluation or checkpoint (loop.Readout reads a step while the next one is queued)."""

import pytest
import torch

from ppalli.plan.planner import Plan
from ppalli.train.loop import Hooks, LoopSettings, LoopState, Readout, train_loop


class Squares:
    """A toy objective: sum over the batch's rows of (w . x)^2, normalized by rows."""

    def normalizer(self, batch: dict) -> int:
        return batch["x"].shape[0]

    def __call__(self, model, batch: dict):
        return (model(batch["x"]) ** 2).sum(), {}


PLAN = Plan(device="cpu", precision="fp32", attention="sdpa", quantization="none", checkpointing="none",
            micro_batch_size=2, grad_accum=2, packing=False, fast_path=False, compile=False)


def _data(n: int = 12) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": list(range(3)), "x": torch.randn(4, generator=gen)} for _ in range(n)]


def _collate(samples: list[dict], packed: bool) -> dict:
    x = torch.stack([s["x"] for s in samples])
    return {"x": x, "input_ids": torch.zeros(len(samples), 3, dtype=torch.long)}


def _run(steps: int, *, eval_every: int = 0, save_every: int = 0, on_step=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    settings = LoopSettings(total_steps=steps, batch_size=4, max_grad_norm=1.0, eval_every=eval_every,
                            save_every=save_every, log_every=1, seed=0)
    log: list = []
    hooks = Hooks(collate=_collate,
                  on_step=on_step or (lambda state, out: log.append(("step", state.step, out))),
                  on_eval=lambda state, result: log.append(("eval", state.step, result)),
                  save=lambda state: log.append(("save", state.step, None)))
    state = LoopState()
    train_loop(model, opt, sched, Squares(), _data(), _data(4), PLAN, settings, state, hooks)
    return log, state


def _eager_losses(steps: int) -> list[float]:
    """The same steps written out plainly: the loss read right after each step's backward."""
    from ppalli.train.loop import step_indices

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data, losses = _data(), []
    for step in range(steps):
        x = torch.stack([data[i]["x"] for i in step_indices(step, 4, len(data), 0)])
        loss = (model(x) ** 2).sum() / 4
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_every_step_is_reported_once_in_order_before_its_eval_and_checkpoint():
    log, state = _run(6, eval_every=2, save_every=3)
    assert [(kind, step) for kind, step, _ in log] == [
        ("step", 1), ("step", 2), ("eval", 2), ("step", 3), ("save", 3), ("step", 4), ("eval", 4), ("step", 5),
        ("step", 6), ("save", 6)]
    assert state.step == 6


def test_reported_numbers_are_the_eager_ones_as_python_numbers():
    log, _ = _run(5)
    outs = [out for kind, _, out in log if kind == "step"]
    assert [o["loss"] for o in outs] == pytest.approx(_eager_losses(5), rel=1e-6)
    for o in outs:
        assert type(o["loss"]) is float and type(o["grad_norm"]) is float
        assert o["seconds"] > 0 and o["tokens"] == 2 * 2 * 3 and o["norm"] == 4


def test_an_interrupt_while_reporting_still_reports_and_saves_the_last_finished_step():
    log: list = []

    def stop_at_2(state, out):
        log.append(("step", state.step))
        if state.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(6, on_step=stop_at_2)
    # step 2 is reported once step 3 is queued, so 3 is the last finished step: reported too, then saved
    assert log == [("step", 1), ("step", 2), ("step", 3)]


def test_readout_reads_the_device_scalars_and_leaves_the_rest():
    out = {"loss": torch.tensor(1.5), "grad_norm": torch.tensor(0.25, dtype=torch.float64), "tokens": 7}
    read = Readout(out, start=0.0).read()
    assert read["loss"] == 1.5 and read["grad_norm"] == 0.25 and read["tokens"] == 7
    assert type(read["loss"]) is float and read["seconds"] > 0


def test_loss_rows_are_the_positions_whose_next_label_trains():
    from ppalli.train.objectives import LOSS_ROWS_BELOW, loss_rows

    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])  # (B, T)
    # position t predicts labels[t + 1]: row 0 trains t = 1, 2; row 1 trains t = 0 (flat 5)
    assert loss_rows(labels).tolist() == [1, 2, 5]
    dense = torch.arange(40).reshape(1, 40)  # 39 of 40 positions train: >= LOSS_ROWS_BELOW, nothing to skip
    assert 39 / 40 >= LOSS_ROWS_BELOW and loss_rows(dense) is None
    assert loss_rows(torch.full((2, 3), -100)).tolist() == []


def test_sft_collate_sends_loss_rows_and_preference_collate_does_not():
    from ppalli.train.recipe import make_collate

    class Tok:
        pad_token_id = 0

    samples = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, {"input_ids": [5, 6], "labels": [-100, 6]}]
    for packed in (False, True):
        batch = make_collate(Tok(), "cpu", "sft")(samples, packed)
        targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100).reshape(-1)
        assert batch["loss_rows"].tolist() == (targets != -100).nonzero().squeeze(1).tolist()
        assert batch["loss_rows"].numel() == batch["trained_tokens"] == 3
    pairs = [{"chosen_input_ids": [1, 2], "chosen_labels": [-100, 2], "rejected_input_ids": [1, 3],
              "rejected_labels": [-100, 3]}]
    assert "loss_rows" not in make_collate(Tok(), "cpu", "dpo")(pairs, False)


def test_collate_drops_the_mask_of_right_padded_rows_after_counting_them():
    """The collate's batches are right-padded: their attention mask changes no loss under causal attention, and
    given one, HF's mask builder and the fast path would each read it on the device (a sync a forward). The real
    tokens are counted from it first; a mask that is not right padding is kept."""
    from ppalli.data.collate import right_padded
    from ppalli.train.recipe import make_collate

    class Tok:
        pad_token_id = 0

    samples = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, {"input_ids": [5, 6], "labels": [-100, 6]}]
    batch = make_collate(Tok(), "cpu", "sft")(samples, False)
    assert "attention_mask" not in batch and batch["real_tokens"] == 6 and batch["input_ids"].shape == (2, 4)
    pairs = [{"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3], "rejected_input_ids": [1, 3],
              "rejected_labels": [-100, 3]}]
    batch = make_collate(Tok(), "cpu", "dpo")(pairs, False)
    assert "attention_mask" not in batch and batch["real_tokens"] == 5
    assert right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]])) and right_padded(torch.ones(2, 3))
    assert not right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]])) and not right_padded(torch.tensor([[1, 0, 1]]))
