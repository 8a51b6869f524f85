"""bench/sweep's pure parts: the sweep grid, value splitting, the benchmark config and the ranked table."""

import pytest

from ppalli import config as C
from ppalli.errors import ConfigError
from ppalli.train.bench import bench_config, format_sweep, split_values, sweep_grid


def test_values_split_on_commas_outside_brackets():
    assert split_values("none, selective,full") == ["none", "selective", "full"]
    assert split_values("[q_proj,v_proj],all-linear,{a: 1, b: 2}") == ["[q_proj,v_proj]", "all-linear",
                                                                       "{a: 1, b: 2}"]


def test_grid_is_every_combination_first_key_slowest():
    grid = sweep_grid(["plan.checkpointing=none,full", "train.micro_batch_size=2,4,8"])
    assert len(grid) == 6
    assert grid[0] == ["plan.checkpointing=none", "train.micro_batch_size=2"]
    assert grid[3] == ["plan.checkpointing=full", "train.micro_batch_size=2"]
    for bad in ("plan.checkpointing", "=none", "plan.checkpointing="):
        with pytest.raises(ConfigError, match="expected key=value1,value2"):
            sweep_grid([bad])


def test_bench_config_runs_the_steps_and_cuts_only_the_extras(tmp_path):
    cfg = C.load(None, ["train.batch_size=16", "plan.checkpointing=full", "data.eval_split=0.1"])
    b = bench_config(cfg, steps=7, warmup=2, run_root=tmp_path)
    assert b.train.max_steps == 9 and b.train.log_every == 1 and b.train.save_every == 0
    assert b.data.eval_split == 0 and b.logging.progress == "none" and b.logging.sample_max_new_tokens == 1
    assert b.output_dir == str(tmp_path / "{name}")
    assert (b.train.batch_size, b.plan, b.model, b.lora) == (16, cfg.plan, cfg.model, cfg.lora)  # what is timed
    with pytest.raises(ConfigError, match="--steps must be >= 1"):
        bench_config(cfg, steps=0, warmup=2, run_root=tmp_path)


def _row(sets, tps, events=()):
    plan = {"checkpointing": "none", "micro_batch_size": 4, "grad_accum": 2, "attention": "sdpa"}
    return {"settings": sets, "tokens_per_s": tps, "step_ms": 1e3 / tps, "peak_gib": 10.0, "plan": plan,
            "events": list(events)}


def test_sweep_table_ranks_fastest_first_and_failures_last():
    rows = [_row(["a=1"], 100.0), {"settings": ["a=2"], "error": "out of memory"}, _row(["a=3"], 200.0, ["oom"])]
    lines = format_sweep(rows)
    assert lines[0].startswith("setting")
    assert lines[1].startswith("a=3") and lines[1].endswith("fastest; 1 OOM step-down(s)")
    assert lines[2].startswith("a=1") and lines[2].endswith("2.00x slower")
    assert lines[3].startswith("a=2") and lines[3].endswith("failed: out of memory")
    assert len({line.index("step ms" if i == 0 else line.split()[1]) for i, line in enumerate(lines[:3])}) == 1
