"""The plain progress line of a step (CI logs, pipes)."""

from ppalli.train.progress import describe_step

ROW = {"step": 3, "loss": 0.5123, "lr": 2e-4, "s_per_it": 0.158, "tokens_per_s": 13817.0, "peak_gib": 6.33}


def test_a_step_line_says_loss_speed_memory_and_eta():
    line = describe_step(ROW, 20, 65)
    assert line == "step 3/20 loss 0.5123 lr 2.00e-04 0.16s/it 13817 tok/s mem 6.3GiB eta 1:05"


def test_preference_steps_show_their_reward_accuracy():
    line = describe_step(ROW | {"reward_accuracy": 0.75, "reward_margin": 0.45}, 20, 65)
    assert "loss 0.5123 reward acc 0.75 lr" in line
