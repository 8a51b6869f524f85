"""Fold one run directory (plan, metrics, samples, events) into a single JSON file for benchmarks/results/."""

import json
import sys
from pathlib import Path


def collect(run_dir: Path) -> dict:
    def read(name):
        p = run_dir / name
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r]
    timed = steps[3:] or steps  # the first steps carry compilation and allocator warm-up
    summary = {}
    if steps:
        summary = {"steps": len(steps), "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
                   "tokens_per_s_median": sorted(r["tokens_per_s"] for r in timed)[len(timed) // 2],
                   "s_per_it_median": sorted(r["s_per_it"] for r in timed)[len(timed) // 2],
                   "peak_gib": max(r.get("peak_gib", 0) for r in steps)}
    return {"run": run_dir.name, "summary": summary, "plan": read("plan.json"), "env": read("env.json"),
            "samples": read("samples.json"), "metrics": rows}


if __name__ == "__main__":
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    data = collect(src)
    dst.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    print(json.dumps({"run": data["run"], **data["summary"]}))
