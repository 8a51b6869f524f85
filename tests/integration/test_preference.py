"""ORPO and DPO through the real recipe on Korean preference pairs (ko_preference_rlhf), tiny model, CPU."""

import json
import math

import pytest

from ppalli.train import recipe


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_objectives_train(make_cfg, shared_data, objective):
    cfg = make_cfg(name=objective, train__objective=objective, train__max_steps=4, train__batch_size=4,
                   data__path=str(shared_data / "ko_preference_rlhf" / "step2_yitingxie_ko.jsonl"),
                   data__columns={}, data__max_seq_len=256, data__packing="off")
    result = recipe.train(cfg, print_fn=lambda *a: None)
    losses = _losses(result.run_dir)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    if objective == "dpo":
        # LoRA starts with B = 0: the policy equals the reference, every margin is 0, the loss is log 2
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
        assert losses[-1] < losses[0]  # the policy moves towards the chosen answers
