"""metrics.jsonl (always), TensorBoard and Weights & Biases (when asked and installed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("ppalli")


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a crash loses at most the line being written."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None, tensorboard: bool = False,
                 wandb: bool = False, wandb_project: str = "ppalli", config: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = _tensorboard(run_dir) if tensorboard else None
        self._wandb = _wandb(wandb_project, run_dir, config) if wandb else None

    def _truncate_after(self, step: int) -> None:
        """Drop rows of steps after the checkpoint being resumed: they will be run again."""
        from ppalli.report import read_metrics

        keep = [row for row in read_metrics(self.path) if row.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")

    def write(self, row: dict) -> None:
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        step = row.get("step", 0)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("logging.tensorboard is on but tensorboard is not installed (pip install tensorboard)")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _wandb(project: str, run_dir: Path, config: dict | None):
    try:
        import wandb
    except ImportError:
        log.warning("logging.wandb is on but wandb is not installed (pip install wandb)")
        return None
    return wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config)
