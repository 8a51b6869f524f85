"""Progress: a rich bar on a terminal, plain lines otherwise (CI logs, pipes, notebooks)."""

from __future__ import annotations

import sys
import time


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def describe_step(row: dict, total: int, eta_s: float) -> str:
    mem = f" mem {row['peak_gib']:.1f}GiB" if row.get("peak_gib") else ""
    pairs = f" reward acc {row['reward_accuracy']:.2f}" if "reward_accuracy" in row else ""  # ORPO, DPO
    return (f"step {row['step']}/{total} loss {row['loss']:.4f}{pairs} lr {row['lr']:.2e} "
            f"{row['s_per_it']:.2f}s/it {row['tokens_per_s']:.0f} tok/s{mem} eta {_fmt_eta(eta_s)}")


class Progress:
    def __init__(self, total: int, start: int, mode: str = "auto", print_fn=print):
        self.total, self.start = total, start
        self.t0 = time.perf_counter()
        self.print_fn = print_fn
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode
        self._bar = None
        if mode == "rich":
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                     TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def eta(self, step: int) -> float:
        done = step - self.start
        if done <= 0:
            return 0.0
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def update(self, row: dict) -> None:
        eta = self.eta(row["step"])
        if self._bar is not None:
            info = describe_step(row, self.total, eta).split(" ", 2)[2]
            self._bar.update(self._task, completed=row["step"], info=info)
        elif self.mode == "plain":
            self.print_fn(describe_step(row, self.total, eta))

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif self.mode != "none":
            self.print_fn(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
