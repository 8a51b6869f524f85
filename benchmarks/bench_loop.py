"""`ppalli train`'s loop as a user runs it: the wall time between consecutive steps' reports.

    PYTHONPATH=TREE python benchmarks/bench_loop.py CONFIG [--set key=value ...] --out FILE.json

The peers' harness (benchmarks/_stacks.py) times the fused model's steps on their own; this times the whole
recipe loop around them (data order, collate, the host copy, clipping, the optimizer, the metrics log), in
whichever ppalli is first on PYTHONPATH, so two trees compare on the same machine. The clock is the host's, read
each time the loop hands a step to its on_step hook, so both a loop that syncs after every step and one that reads
a step late (loop.Readout) are timed the same way: in a steady state each report lands one step after the last.
Prints and writes the median of those intervals after the warm-up steps, with the loop's own s_per_it.
"""

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="a YAML config; none: the embedded demo default")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median (autotuning, allocator)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    from ppalli import config as C
    from ppalli.train import recipe

    stamps: list[tuple[int, float]] = []
    rows: list[dict] = []
    make_hooks = recipe._hooks

    def timed_hooks(*a, **kw):
        hooks = make_hooks(*a, **kw)
        on_step = hooks.on_step

        def stamped(state, out):
            stamps.append((state.step, time.perf_counter()))
            rows.append({"step": state.step, "loss": float(out["loss"]), "s_per_it": float(out["seconds"])})
            on_step(state, out)

        hooks.on_step = stamped
        return hooks

    recipe._hooks = timed_hooks
    cfg = C.load(args.config, args.overrides)
    t0 = time.perf_counter()
    result = recipe.train(cfg, print_fn=lambda *x, **k: None)
    wall = time.perf_counter() - t0
    gaps = [b - a for (_, a), (_, b) in zip(stamps, stamps[1:])][args.warmup:]
    own = [r["s_per_it"] for r in rows[args.warmup + 1:]]
    doc = {"config": args.config, "overrides": args.overrides, "steps": len(rows), "warmup": args.warmup,
           "report_interval_s_median": statistics.median(gaps) if gaps else None,
           "report_interval_s_mean": statistics.fmean(gaps) if gaps else None,
           "loop_s_per_it_median": statistics.median(own) if own else None,
           "run_wall_s": round(wall, 2), "losses": [r["loss"] for r in rows], "intervals_s": gaps,
           "run_dir": str(result.run_dir)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    print(f"{args.out.stem}: report interval median {doc['report_interval_s_median']:.4f} s "
          f"(mean {doc['report_interval_s_mean']:.4f}), loop's own s/it {doc['loop_s_per_it_median']:.4f}, "
          f"{len(rows)} steps, losses {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}")


if __name__ == "__main__":
    main()
