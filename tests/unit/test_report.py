"""The run report from a hand-made run directory: loss plot, summary, plan, events, samples side by side."""

import json

from ppalli.report import read_metrics, write_report

BEFORE = [{"prompt": "한국의 수도는 어디인가요?", "output": "뷁뷁 | 알 수 없음"},
          {"prompt": "What is 2 plus 3?", "output": "zzz"}]
AFTER = [{"prompt": "한국의 수도는 어디인가요?", "output": "한국의 수도는 서울입니다."},
         {"prompt": "What is 2 plus 3?", "output": "2 plus 3 is 5.\nDone."}]
PLAN = ["precision: fp32 (CPU: no half-precision matmuls)", "micro_batch_size: 8 (fits with room to spare)"]
EVENTS = ["step 12: out of memory at micro-batch 8; stepped down to 4 (grad_accum 2)"]


def _write_metrics(run, torn_tail: bool = True):
    lines = [json.dumps({"step": s, "loss": 8.0 - 0.3 * s, "lr": 1e-3}) for s in range(1, 21)]
    lines.insert(10, json.dumps({"step": 10, "eval_loss": 5.5}))
    lines.append(json.dumps({"step": 20, "eval_loss": 2.25}))
    text = "\n".join(lines) + "\n"
    (run / "metrics.jsonl").write_text(text + ('{"step": 21, "lo' if torn_tail else ""), encoding="utf-8")


def _report(run, summary=None):
    return write_report(run, plan_lines=PLAN, summary=summary or {"model": "demo", "data": "demo.jsonl", "steps": 20,
                        "time_s": 75.0, "tokens_per_s": 1234.5, "peak_memory_gib": 0.5},
                        samples_before=BEFORE, samples_after=AFTER, events=EVENTS)


def test_report_and_plot_are_written(tmp_path):
    _write_metrics(tmp_path)
    text = _report(tmp_path).read_text(encoding="utf-8")
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert "![loss curve](loss.png)" in text
    assert "| Model | demo |" in text and "| Time | 1 min 15 s |" in text and "| Tokens/s | 1,234 |" in text
    assert "| Final train loss | 2.0000 |" in text and "| Final eval loss | 2.2500 |" in text  # from the metrics
    assert all(f"- {line}" in text for line in PLAN + EVENTS)


def test_samples_side_by_side_keep_korean(tmp_path):
    _write_metrics(tmp_path)
    text = _report(tmp_path).read_text(encoding="utf-8")
    assert "| 한국의 수도는 어디인가요? | 뷁뷁 \\| 알 수 없음 | 한국의 수도는 서울입니다. |" in text
    assert "| What is 2 plus 3? | zzz | 2 plus 3 is 5.<br>Done. |" in text  # one row per sample, even multi-line


def test_given_losses_win_and_extra_fields_show(tmp_path):
    _write_metrics(tmp_path)
    text = _report(tmp_path, {"final_train_loss": 1.5, "adapter": "adapter/"}).read_text(encoding="utf-8")
    assert "| Final train loss | 1.5000 |" in text and "| adapter | adapter/ |" in text


def test_torn_metrics_line_is_skipped(tmp_path):
    _write_metrics(tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 22 and rows[-1] == {"step": 20, "eval_loss": 2.25}


def test_no_metrics_means_no_plot(tmp_path):
    text = write_report(tmp_path, plan_lines=[], summary={}, samples_before=[], samples_after=[],
                        events=[]).read_text(encoding="utf-8")
    assert not (tmp_path / "loss.png").exists()
    assert "_No losses were logged._" in text and "_No samples were generated._" in text
    assert "_None: the run went as planned._" in text


def test_preference_runs_report_their_eval_reward_accuracy(tmp_path):
    rows = [{"step": 1, "loss": 0.69, "reward_margin": 0.0, "reward_accuracy": 0.0},
            {"step": 2, "eval_loss": 0.51, "eval_reward_margin": 0.5035, "eval_reward_accuracy": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    text = _report(tmp_path).read_text(encoding="utf-8")
    assert "| Final eval reward accuracy | 80.0% |" in text and "| Final eval reward margin | 0.5035 |" in text
    _write_metrics(tmp_path)  # SFT: no such rows
    assert "reward" not in _report(tmp_path).read_text(encoding="utf-8")
