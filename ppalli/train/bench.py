"""`ppalli bench` and `ppalli sweep`: how fast a config trains on this machine, measured, not guessed.

bench runs the config exactly as `ppalli train` would (the same plan, model, fast path, data order and OOM
step-down) for a few warm-up and then timed optimizer steps, in a run directory it deletes afterwards, and sets
the measured step time, tokens/s and peak memory beside what the plan predicted. Only the run's extras are cut:
no eval split, one-token sample answers, no progress bar.

sweep benches every combination of a few settings (`--over plan.checkpointing=none,selective`), each in a process
of its own: a fresh CUDA context gives each setting its own peak memory, and a setting that fails (out of memory
with no smaller plan left, a bad value) becomes a row of the table with its error instead of ending the sweep.
"""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ppalli import config as C
from ppalli.errors import ConfigError


@dataclass
class BenchResult:
    device: str  # "cuda (NVIDIA H200)", "cpu"
    steps: int  # timed optimizer steps
    warmup: int  # steps run before them, untimed
    step_ms: float  # median over the timed steps
    step_ms_min: float
    step_ms_max: float
    tokens_per_s: float  # the timed steps' tokens over their summed time
    trained_tokens_per_s: float  # the same, counting only the tokens the loss trains on
    peak_gib: float | None  # torch.cuda.max_memory_allocated over the whole run; None off CUDA
    plan: dict  # the plan the last timed step ran (after any out-of-memory step-down)
    events: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # the overrides that make this setting (sweep's row)

    def to_dict(self) -> dict:
        return asdict(self)


def bench_config(cfg: C.Config, steps: int, warmup: int, run_root: Path) -> C.Config:
    """`cfg` cut to a benchmark: warmup + steps optimizer steps, a metrics row each, no eval or checkpoints on
    the way, one-token sample answers, no progress bar, written under run_root."""
    if steps < 1 or warmup < 0:
        raise ConfigError(f"bench: --steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    train = replace(cfg.train, max_steps=warmup + steps, log_every=1, eval_every=0, save_every=0)
    data = replace(cfg.data, eval_split=0, eval_path=None)
    logging = replace(cfg.logging, progress="none", sample_max_new_tokens=1, tensorboard=False, wandb=False)
    return replace(cfg, train=train, data=data, logging=logging, output_dir=str(run_root / "{name}"), name="bench")


def bench(cfg: C.Config, *, steps: int = 20, warmup: int = 5, print_fn=print) -> BenchResult:
    """Train `cfg` for warmup + steps optimizer steps and time the last `steps` of them."""
    from ppalli.train.recipe import train

    root = Path(tempfile.mkdtemp(prefix="ppalli-bench-"))
    try:
        result = train(bench_config(cfg, steps, warmup, root), print_fn=print_fn)
        rows = _step_rows(result.run_dir / "metrics.jsonl")
        env = json.loads((result.run_dir / "env.json").read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    timed = rows[warmup:]
    if len(timed) < steps:
        raise ConfigError(f"bench: {len(rows)} steps ran, fewer than the {warmup} + {steps} asked")
    ms = [1e3 * r["s_per_it"] for r in timed]
    seconds = sum(r["s_per_it"] for r in timed)
    plan = result.plan.to_dict()
    peak = rows[-1]["peak_gib"] if plan["device"].startswith("cuda") else None
    return BenchResult(device=_device(plan, env), steps=steps, warmup=warmup, step_ms=statistics.median(ms),
                       step_ms_min=min(ms), step_ms_max=max(ms),
                       tokens_per_s=sum(r["tokens_per_s"] * r["s_per_it"] for r in timed) / seconds,
                       trained_tokens_per_s=sum(r["trained_tokens"] for r in timed) / seconds,
                       peak_gib=peak, plan=plan, events=list(result.events))


def _step_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "s_per_it" in r]


def _device(plan: dict, env: dict) -> str:
    gpu = plan.get("gpu") or (env.get("gpus") or [{}])[0].get("name")
    return f"{plan['device']} ({gpu})" if gpu and plan["device"].startswith("cuda") else plan["device"]


def format_bench(r: BenchResult) -> list[str]:
    p = r.plan
    on = {True: "on", False: "off"}
    choices = (f"{p['precision']}, attention {p['attention']}, quantization {p['quantization']}, checkpointing "
               f"{p['checkpointing']}, micro-batch {p['micro_batch_size']} x {p['grad_accum']}, fast path "
               f"{on[p['fast_path']]}, compile {on[p['compile']]}")
    guess = f"; the plan guessed {p['est_tokens_per_s']:,.0f}" if p.get("est_tokens_per_s") else ""
    lines = [f"bench: {r.steps} timed steps after {r.warmup} warm-up, on {r.device}",
             f"  plan:      {choices}",
             f"  step:      {r.step_ms:,.1f} ms median (min {r.step_ms_min:,.1f}, max {r.step_ms_max:,.1f})",
             f"  tokens/s:  {r.tokens_per_s:,.0f} ({r.trained_tokens_per_s:,.0f} trained){guess}"]
    if r.peak_gib is not None:
        predicted = p.get("predicted_peak_gib")
        lines.append(f"  peak:      {r.peak_gib:.2f} GiB"
                     + (f"; the plan predicted {predicted:.2f} GiB" if predicted else ""))
    lines += [f"  event:     {e}" for e in r.events]
    return lines


# --------------------------------------------------------------------------- sweep


def split_values(text: str) -> list[str]:
    """'a,b,[c,d]' -> ['a', 'b', '[c,d]']: commas inside brackets or braces belong to the value."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [v.strip() for v in out + [cur] if v.strip()]


def sweep_grid(over: list[str]) -> list[list[str]]:
    """['plan.checkpointing=none,selective', 'train.micro_batch_size=2,4'] -> every combination as --set items,
    the first key varying slowest."""
    axes = []
    for item in over:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not split_values(values):
            raise ConfigError(f"--over {item!r}: expected key=value1,value2, e.g. --over plan.checkpointing=none,full")
        axes.append([f"{key.strip()}={v}" for v in split_values(values)])
    return [list(combo) for combo in itertools.product(*axes)]


def sweep(config: str | None, base: list[str], over: list[str], *, steps: int, warmup: int, print_fn=print,
          out: Path | None = None) -> list[dict]:
    """Bench each combination of `over` (on top of the `base` overrides) in its own process; rows in grid order,
    each the bench's result or {"settings", "error"}."""
    grid = sweep_grid(over)
    for sets in grid:  # a typo fails here, before any model loads, not after the first settings ran
        C.load(config, [*base, *sets])
    rows = []
    with tempfile.TemporaryDirectory(prefix="ppalli-sweep-") as tmp:
        for i, sets in enumerate(grid):
            print_fn(f"[{i + 1}/{len(grid)}] {' '.join(sets)}")
            rows.append(_bench_in_child(config, [*base, *sets], sets, steps, warmup, Path(tmp) / f"{i}.json"))
            if out is not None:
                out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def _bench_in_child(config, overrides, sets, steps, warmup, result_file: Path) -> dict:
    cmd = [sys.executable, "-m", "ppalli.cli", "bench", *([config] if config else []),
           *(f"--set={o}" for o in overrides), f"--steps={steps}", f"--warmup={warmup}", f"--out={result_file}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode == 0 and result_file.is_file():
        return {**json.loads(result_file.read_text(encoding="utf-8")), "settings": sets}
    lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("error:")] or lines[-1:] or [f"exit status {done.returncode}"]
    return {"settings": sets, "error": said[-1].removeprefix("error:").strip()}


def format_sweep(rows: list[dict]) -> list[str]:
    """A table, fastest first; failed settings last with their error."""
    ok = sorted((r for r in rows if "error" not in r), key=lambda r: -r["tokens_per_s"])
    header = ["setting", "step ms", "tokens/s", "peak GiB", "plan", "note"]
    table = []
    for i, r in enumerate(ok):
        p = r["plan"]
        shown = f"ckpt {p['checkpointing']}, micro {p['micro_batch_size']}x{p['grad_accum']}, {p['attention']}"
        note = "fastest" if i == 0 else f"{ok[0]['tokens_per_s'] / r['tokens_per_s']:.2f}x slower"
        if r["events"]:
            note += f"; {len(r['events'])} OOM step-down(s)"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        table.append([" ".join(r["settings"]), f"{r['step_ms']:,.1f}", f"{r['tokens_per_s']:,.0f}", peak, shown,
                      note])
    table += [[" ".join(r["settings"]), "-", "-", "-", "-", f"failed: {r['error']}"] for r in rows if "error" in r]
    widths = [max(len(row[c]) for row in [header, *table]) for c in range(len(header) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in [header, *table]]
