"""flash-attn 4 on packed batches of real data: how many kernels it compiles over a whole run, and what that
costs the steps. Its CuTe DSL kernels compile at first use, keyed on a launch config that its heuristics pick
from each call's max_seqlen; a packed SFT run sees a new max_seqlen almost every step, so this reads whether
the compiles stop after a few steps or follow the data.

Runs `ppalli train` in this process (the config's model and data, packing on, the planner's own attention
choice, which is flash-attn 4 on Hopper when it is installed), then prints the entries of each flash-attn 4
JIT cache, every step's time, and the steps slower than 1.5x the median (each one a compile, or a stall).

    python benchmarks/check_fa4_packed.py --out DIR [--steps 60] [--set key=value ...]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from ppalli.cli import main as ppalli_main  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llama-3.2-1b-random-ko-chatbot.yaml"


def jit_cache_sizes() -> dict[str, int]:
    """Entries in each compile cache of flash-attn 4's interface module (empty when it is not installed)."""
    try:
        from flash_attn.cute import interface
    except ImportError:
        return {}
    sizes = {}
    for name in dir(interface):
        cache = getattr(getattr(interface, name), "compile_cache", None)
        if cache is not None:
            sizes[name] = len(getattr(cache, "cache", {}))
    return sizes


def step_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if "loss" in r]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the run and fa4-packed.json")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--set", action="append", default=[], help="more config overrides, key=value")
    args = p.parse_args()
    out = Path(args.out)
    run_dir = out / "fa4-packed-run"
    overrides = [f"train.max_steps={args.steps}", "data.packing=on", "logging.progress=plain",
                 f"output_dir={run_dir}", "logging.sample_max_new_tokens=0", *args.set]
    rc = ppalli_main(["train", args.config, *[a for kv in overrides for a in ("--set", kv)]])
    plan = json.loads((run_dir / "plan.json").read_text(encoding="utf-8"))
    rows = step_rows(run_dir)
    ms = [1e3 * r["s_per_it"] for r in rows]
    median = statistics.median(ms[3:] or ms)
    slow = [(i + 1, round(t, 1)) for i, t in enumerate(ms) if t > 1.5 * median]
    result = {"exit": rc, "attention": plan.get("attention"), "jit_cache_entries": jit_cache_sizes(),
              "steps": len(ms), "step_ms_median": round(median, 1), "slow_steps": slow,
              "step_ms": [round(t, 1) for t in ms], "tokens": [round(r["tokens_per_s"] * r["s_per_it"]) for r in rows]}
    (out / "fa4-packed.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"exit {rc}; attention {result['attention']}; flash-attn 4 JIT entries {result['jit_cache_entries']}")
    print(f"{len(ms)} steps, median {median:.1f} ms; slower than 1.5x median: {slow}")
    print("step ms:", " ".join(f"{t:.0f}" for t in ms))
    return rc


if __name__ == "__main__":
    sys.exit(main())
