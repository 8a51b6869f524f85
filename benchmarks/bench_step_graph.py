"""How much of a training step is the host's: ppalli's eager step against the same step replayed as one CUDA graph
(forward, backward and fused AdamW captured together), side by side in one process on one GPU.

    python benchmarks/bench_step_graph.py --model 1b --batch 8 --seq 2048 --out results.json

The shape and model are peers.py's (T4 by default), ppalli's own plan, random tokens. The graph is checked before
it is timed: from the same weights and a fresh optimizer state it must give the eager steps' losses. Timing
alternates blocks of eager and graph steps after a warm-up, so a capped GPU's drifting clock falls on both.
A profiler pass over eager steps adds the device's kernel time per step, CUPTI's overhead records left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stacks import build_ppalli, make_batches, train_step  # noqa: E402
from peers import LR, MODELS  # noqa: E402


def spec_for(model: str, batch: int, seq: int, folder: Path) -> dict:
    name, config = MODELS[model]
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return {"case": "custom", "stack": "ppalli", "gc": "plan", "model": model, "batch": batch, "seq": seq,
            "quant": "none", "seed": 0, "ppalli": {}, "model_config": config, "config_path": str(path),
            "mem_cap_gib": None}


class GraphStep:
    """The whole optimizer step as one CUDA graph: inputs are copied into static tensors, then it is replayed."""

    def __init__(self, built, params, ids, labels):
        self.built, self.params = built, params
        self.lr = torch.tensor(LR, device="cuda")
        self.opt = torch.optim.AdamW(params, lr=self.lr, fused=True, capturable=True)
        self.ids, self.labels = ids.clone(), labels.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        self.lr.fill_(0.0)  # warm-up steps on the side stream (as capture needs) leave the weights as they are
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._step(zero=False)
        self.reset_state()
        self.lr.fill_(LR)

    def _step(self, zero: bool = True) -> torch.Tensor:
        loss = self.built.loss_fn(self.ids, self.labels, self.labels[:, 1:].numel())
        loss.backward()
        self.opt.step()
        if zero:
            self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def reset_state(self) -> None:
        """A fresh AdamW state, in place (the graph holds these tensors' addresses)."""
        for state in self.opt.state.values():
            for t in state.values():
                t.zero_()

    def __call__(self, ids, labels) -> torch.Tensor:
        self.ids.copy_(ids)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.loss.clone()


def timed(step, batches) -> list[float]:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in batches]
    for (a, b), batch in zip(events, batches):
        a.record()
        step(*batch)
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in events]


def kernel_ms_per_step(step, batches) -> dict:
    """Device time of the kernels (union of their intervals) per step, the window, and per kernel name its
    launches and ms a step, under the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for b in batches:
            step(*b)
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
                   and "Command Buffer" not in e.name)
    busy, end = 0.0, spans[0][0]
    for s, e, _ in spans:
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    n = len(batches)
    kernels: dict[str, list[float]] = {}
    for s, e, name in spans:
        kernels.setdefault(name, []).append(e - s)
    table = sorted(([name[:90], len(us) / n, sum(us) / 1e3 / n] for name, us in kernels.items()),
                   key=lambda row: -row[2])
    return {"kernel_ms": round(busy / 1e3 / n, 2), "window_ms": round((end - spans[0][0]) / 1e3 / n, 2),
            "kernels": [[name, calls, round(ms, 3)] for name, calls, ms in table]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1b", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup-s", type=float, default=15.0)
    p.add_argument("--block", type=int, default=15, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=3, help="eager/graph block pairs")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        built = build_ppalli(spec_for(a.model, a.batch, a.seq, Path(tmp)), "cuda")
    params = [q for q in built.model.parameters() if q.requires_grad]
    start = [q.detach().clone() for q in params]
    batches = make_batches({"seed": 0, "batch": a.batch, "seq": a.seq, "model_config": MODELS[a.model][1]},
                           "cuda", a.block)
    eager_opt = torch.optim.AdamW(params, lr=LR, fused=True)
    eager = lambda ids, labels: train_step(built, eager_opt, ids, labels)  # noqa: E731
    first = [float(eager(*b)) for b in batches[:3]]  # from `start`, fresh state

    graph = GraphStep(built, params, *batches[0])
    with torch.no_grad():
        for q, s in zip(params, start):
            q.copy_(s)
    replayed = [float(graph(*b)) for b in batches[:3]]
    worst = max(abs(x - y) / abs(x) for x, y in zip(first, replayed))
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": MODELS[a.model][0],
           "batch": a.batch, "seq": a.seq, "setting": built.setting, "eager_losses": first,
           "graph_losses": replayed, "worst_rel_diff": worst}
    print(json.dumps(out), flush=True)

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < a.warmup_s:
        eager(*batches[0])
        torch.cuda.synchronize()
    rows = {"eager": [], "graph": []}
    for _ in range(a.rounds):
        rows["eager"] += timed(eager, batches)
        rows["graph"] += timed(graph, batches)
    for k, ms in rows.items():
        out[f"{k}_ms_median"] = round(statistics.median(ms), 2)
        out[f"{k}_ms"] = [round(x, 2) for x in ms]
    out["eager_profile"] = kernel_ms_per_step(eager, batches[:4])
    out["graph_profile"] = kernel_ms_per_step(graph, batches[:4])
    print(json.dumps({k: v for k, v in out.items() if not k.endswith("_ms") and not k.endswith("profile")}),
          flush=True)
    for k in ("eager_profile", "graph_profile"):
        print(k, {x: y for x, y in out[k].items() if x != "kernels"}, flush=True)
    if a.out:
        a.out.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
