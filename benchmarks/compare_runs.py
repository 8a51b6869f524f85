"""Two run directories side by side: are their per-step losses and saved adapters equal bit for bit?

    python benchmarks/compare_runs.py RUN_A RUN_B [--out FILE]

Prints (and writes as JSON) the steps whose losses differ, the worst relative loss difference, and the
adapter tensors that are not bitwise equal with their largest absolute difference. For plan.deterministic's
check (benchmarks/gpu_train_runs.sh det1b det1b2, against fast20 fast20b in the default mode).
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def compare(a: Path, b: Path) -> dict:
    la, lb = losses(a), losses(b)
    wa, wb = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (a, b))
    unequal = {k: float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if not torch.equal(wa[k], wb[k])}
    return {"runs": [a.name, b.name], "steps": [len(la), len(lb)],
            "loss_steps_differing": [i + 1 for i, (x, y) in enumerate(zip(la, lb)) if x != y],
            "worst_rel_loss_diff": max((abs(x - y) / abs(y) for x, y in zip(la, lb)), default=0.0),
            "adapter_tensors": len(wa), "adapter_tensors_differing": len(unequal),
            "worst_abs_weight_diff": max(unequal.values(), default=0.0)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = compare(args.a, args.b)
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
