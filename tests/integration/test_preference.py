"""ORPO, DPO and SimPO through the real recipe on Korean preference pairs (ko_preference_rlhf), tiny model, CPU."""

import json
import math

import pytest

from ppalli.train import recipe


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
def test_preference_objectives_train(make_cfg, shared_data, objective):
    cfg = make_cfg(name=objective, train__objective=objective, train__max_steps=4, train__batch_size=4,
                   data__path=str(shared_data / "ko_preference_rlhf" / "step2_yitingxie_ko.jsonl"),
                   data__columns={}, data__max_seq_len=256, data__packing="off")
    result = recipe.train(cfg, print_fn=lambda *a: None)
    losses = _losses(result.run_dir)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(0 <= r["reward_accuracy"] <= 1 and math.isfinite(r["reward_margin"]) for r in rows)
    if objective == "dpo":
        # LoRA starts with B = 0: the policy equals the reference, every margin is 0, the loss is log 2
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
        assert rows[0]["reward_margin"] == 0 and rows[0]["reward_accuracy"] == 0  # no pair is won yet
        assert losses[-1] < losses[0]  # the policy moves towards the chosen answers
        assert rows[-1]["reward_margin"] > 0
    if objective == "simpo":  # the policy's own length-normalized margin moves towards the chosen answers
        assert rows[-1]["reward_margin"] > rows[0]["reward_margin"] and losses[-1] < losses[0]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_packed_pairs_train_as_padded_ones(make_cfg, shared_data, objective):
    """Padding-free pairs (the plan's default for ORPO/DPO) give the padded batches' per-step losses (fp32).
    SGD: AdamW's first step divides each gradient by its own size, so float noise in a near-zero gradient
    becomes a whole step of lr (AdamW runs differed by 1.2e-3 relative at step 2)."""
    runs = {}
    for packing in ("auto", "off"):
        cfg = make_cfg(name=f"{objective}-{packing}", train__objective=objective, train__max_steps=3,
                       train__batch_size=4, train__optimizer="sgd", train__lr=0.1, data__packing=packing,
                       data__path=str(shared_data / "ko_preference_rlhf" / "step2_yitingxie_ko.jsonl"),
                       data__columns={}, data__max_seq_len=256)
        result = recipe.train(cfg, print_fn=lambda *a: None)
        plan = json.loads((result.run_dir / "plan.json").read_text())
        runs[packing] = (plan["packing"], _losses(result.run_dir))
    assert runs["auto"][0] is True and runs["off"][0] is False
    # fp32: a 256-token sequence's LoRA gradients differ by up to 1.5e-5 relative between the two forms (sums in
    # another order), and step 2's loss by 1.4e-5
    assert runs["auto"][1] == pytest.approx(runs["off"][1], rel=5e-5, abs=1e-6)
