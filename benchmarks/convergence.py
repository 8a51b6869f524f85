"""Per-step losses of two `ppalli train` runs (fast path vs reference path, same seed and data).

    python benchmarks/convergence.py REF.json FAST.json|FAST.log [--rtol 1e-3]

Reads run files written by benchmarks/collect_run.py (or a plain-progress log) and prints the largest and
mean relative difference per step; exits 1 when any step is further apart than --rtol.
"""

import argparse
import json
import re
import sys
from pathlib import Path


def step_losses(path: Path) -> list[float]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return [r["loss"] for r in json.loads(text)["metrics"] if "loss" in r]
    return [float(m.group(1)) for m in re.finditer(r"^step \d+/\d+ loss ([\d.]+)", text, re.M)]


def compare(ref: list[float], fast: list[float]) -> dict:
    if len(ref) != len(fast) or not ref:
        raise SystemExit(f"runs differ in length: {len(ref)} vs {len(fast)} steps")
    rel = [abs(a - b) / abs(a) for a, b in zip(ref, fast)]
    return {"steps": len(rel), "max_rel": max(rel), "mean_rel": sum(rel) / len(rel),
            "worst_step": rel.index(max(rel)) + 1}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ref", type=Path)
    ap.add_argument("fast", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-3)
    args = ap.parse_args()
    out = compare(step_losses(args.ref), step_losses(args.fast))
    print(json.dumps(out))
    return 0 if out["max_rel"] <= args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
