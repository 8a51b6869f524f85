"""The run report: RUN/report.md with the summary, the plan and its reasons, the loss curve (RUN/loss.png),
events such as OOM step-downs, and sample answers before and after training side by side.

It reads RUN/metrics.jsonl: one JSON object per logged step with ``step``, and ``loss`` (train) and/or
``eval_loss``. Text is written as UTF-8 exactly as given, so Korean answers read as they were generated.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """The logged rows; a torn last line (a run killed while writing) is skipped, not fatal."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(row.get("step", i + 1), row[key]) for i, row in enumerate(rows) if row.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_loss(rows: list[dict], out_png: Path) -> bool:
    """Train loss per step as a line, eval loss as points; False (and no file) when nothing was logged."""
    train, evals = _series(rows, "loss"), _series(rows, "eval_loss")
    if not train[0] and not evals[0]:
        return False
    # The Agg canvas is bound to this figure only: no pyplot, so the global backend (a notebook's, say)
    # is never switched, and no display is needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train[0]:
        ax.plot(*train, label="train loss", linewidth=1.2)
    if evals[0]:
        ax.plot(*evals, "o", label="eval loss", markersize=5)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    return True


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s"


# (summary key, label, formatter); keys not listed here are shown after these, as given
_SUMMARY_FIELDS = [
    ("model", "Model", str),
    ("data", "Data", str),
    ("steps", "Steps", str),
    ("time_s", "Time", _duration),
    ("tokens_per_s", "Tokens/s", "{:,.0f}".format),
    ("peak_memory_gib", "Peak memory", "{:.2f} GiB".format),
    ("final_train_loss", "Final train loss", "{:.4f}".format),
    ("final_eval_loss", "Final eval loss", "{:.4f}".format),
    ("final_eval_reward_accuracy", "Final eval reward accuracy", "{:.1%}".format),  # preference pairs
    ("final_eval_reward_margin", "Final eval reward margin", "{:.4f}".format),
]


def _format_value(value, formatter) -> str:
    try:
        return formatter(value)
    except (ValueError, TypeError):  # a field given as text ("n/a") is shown as text
        return str(value)


def _with_final_losses(summary: dict, rows: list[dict]) -> dict:
    """Fill the final losses from the metrics when the caller did not give them."""
    out = dict(summary)
    for key, metric in (("final_train_loss", "loss"), ("final_eval_loss", "eval_loss"),
                        ("final_eval_reward_accuracy", "eval_reward_accuracy"),
                        ("final_eval_reward_margin", "eval_reward_margin")):
        values = _series(rows, metric)[1]
        if out.get(key) is None and values:
            out[key] = values[-1]
    return out


def _summary_lines(summary: dict) -> list[str]:
    lines = ["| | |", "|---|---|"]
    known = {key for key, _, _ in _SUMMARY_FIELDS}
    for key, label, formatter in _SUMMARY_FIELDS:
        if summary.get(key) is not None:
            lines.append(f"| {label} | {_cell(_format_value(summary[key], formatter))} |")
    for key, value in summary.items():
        if key not in known and value is not None:
            lines.append(f"| {_cell(key)} | {_cell(value)} |")
    return lines


def _cell(value) -> str:
    """Text safe inside a Markdown table cell: pipes escaped, line breaks kept as <br>."""
    return str(value).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def _sample_lines(before: list[dict], after: list[dict]) -> list[str]:
    if not before and not after:
        return ["_No samples were generated._"]
    lines = ["| Prompt | Before training | After training |", "|---|---|---|"]
    for i in range(max(len(before), len(after))):
        b = before[i] if i < len(before) else {}
        a = after[i] if i < len(after) else {}
        prompt = b.get("prompt") or a.get("prompt", "")
        lines.append(f"| {_cell(prompt)} | {_cell(b.get('output', ''))} | {_cell(a.get('output', ''))} |")
    return lines


def _bullets(items: list[str], empty: str) -> list[str]:
    return [f"- {item}" for item in items] if items else [empty]


def write_report(run_dir: str | Path, *, plan_lines: list[str], summary: dict, samples_before: list[dict],
                 samples_after: list[dict], events: list[str]) -> Path:
    """Write RUN/loss.png and RUN/report.md; returns the report's path.

    `summary` takes the keys of `_SUMMARY_FIELDS` (others are listed as given); samples are
    ``{"prompt", "output"}`` dicts paired by position.
    """
    run = Path(run_dir)
    rows = read_metrics(run / "metrics.jsonl")
    has_plot = plot_loss(rows, run / "loss.png")
    summary = _with_final_losses(summary, rows)
    loss = "![loss curve](loss.png)" if has_plot else "_No losses were logged._"
    parts = [f"# ppalli run: {run.resolve().name}", "", "## Summary", "", *_summary_lines(summary), "",
             "## Plan", "", *_bullets(plan_lines, "_No plan recorded._"), "", "## Loss", "", loss, "",
             "## Events", "", *_bullets(events, "_None: the run went as planned._"), "",
             "## Samples", "", *_sample_lines(samples_before, samples_after), ""]
    report = run / "report.md"
    report.write_text("\n".join(parts), encoding="utf-8")
    return report
