"""`ppalli bench` and `ppalli sweep` end to end on a tiny Qwen2 with the real tokenizer and ko_chatbot_qa rows."""

import json
import tempfile
from pathlib import Path

import yaml

from ppalli.cli import main
from ppalli.train.bench import bench


def _left_behind() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("ppalli-bench-*"))


def test_bench_times_the_steps_after_warmup_and_leaves_nothing(make_cfg, quiet, tmp_path):
    before = _left_behind()
    cfg = make_cfg("qwen2", train__batch_size=4, train__micro_batch_size=2)
    r = bench(cfg, steps=3, warmup=2, print_fn=quiet)
    assert (r.steps, r.warmup, r.device, r.peak_gib) == (3, 2, "cpu", None)
    assert 0 < r.step_ms_min <= r.step_ms <= r.step_ms_max
    assert r.tokens_per_s > r.trained_tokens_per_s > 0  # responses-only loss: prompts are not trained
    assert (r.plan["micro_batch_size"], r.plan["grad_accum"]) == (2, 2) and r.events == []
    assert _left_behind() == before and not (tmp_path / "runs").exists()


def test_cli_bench_json_and_out_file(make_cfg, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(make_cfg("qwen2").to_dict(), allow_unicode=True))
    out = tmp_path / "bench.json"
    assert main(["bench", str(config), "--steps", "2", "--warmup", "1", "--json", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) and printed["steps"] == 2


def test_cli_sweep_ranks_the_settings_and_keeps_going_past_a_failure(make_cfg, tmp_path, capsys, shared_data):
    """Each setting in its own process: a tokenizer that is not there fails its two settings with the loader's own
    message, the other two are timed and ranked, and the exit status says something failed."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(make_cfg("qwen2").to_dict(), allow_unicode=True))
    out = tmp_path / "sweep.jsonl"
    good = shared_data / "tokenizer_qwen2.5"
    code = main(["sweep", str(config), "--steps", "1", "--warmup", "0", "--out", str(out),
                 "--over", "train.micro_batch_size=4,8", "--over", f"model.tokenizer={good},{tmp_path / 'none'}"])
    assert code == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["settings"][0] for r in rows] == ["train.micro_batch_size=4"] * 2 + ["train.micro_batch_size=8"] * 2
    failed = [r for r in rows if "error" in r]
    assert len(failed) == 2 and all("none" in r["error"] and "tokenizer" in r["error"] for r in failed)
    timed = [r for r in rows if "error" not in r]
    assert sorted(r["plan"]["micro_batch_size"] for r in timed) == [4, 8]
    table = capsys.readouterr().out.splitlines()[-5:]
    assert table[0].startswith("setting") and "fastest" in table[1] and "slower" in table[2]
    assert all("failed:" in line for line in table[3:])
