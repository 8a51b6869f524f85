"""What the kernel-setting sweeps (bench_lora_glu.py, bench_lora_add_rms_norm.py, bench_lora_b_bwd.py,
bench_rope.py) and the attention benchmarks share: the timer, one setting's row, one forward + backward row,
and a main that times each shape, prints the rows and writes them as JSON with the versions that produced
them."""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.testing


def median_ms(fn: Callable) -> float:
    """Median of triton.testing.do_bench over ~60 ms of repeats, in ms."""
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def rel_err(got, ref) -> float:
    """The largest ||got - ref|| / ||ref|| over a tensor or tuples of them, to 3 digits."""
    pairs = zip(got, ref) if isinstance(got, tuple) else [(got, ref)]
    return float(f"{max(((g.float() - r.float()).norm() / r.float().norm()).item() for g, r in pairs):.2e}")


def setting_row(blocks: tuple, run: Callable, ref, nbytes: int) -> dict:
    """One launch setting of a sweep: run(blocks) timed, its error against ref, nbytes moved as GB/s."""
    ms = median_ms(lambda: run(blocks))
    return {"blocks": list(blocks), "ms": round(ms, 4), "gbps": round(nbytes / ms / 1e6, 1),
            "rel_err": rel_err(run(blocks), ref)}


def fwd_bwd_row(label: str, run: Callable, inputs: tuple, truth: torch.Tensor) -> dict:
    """run(*inputs)'s forward + backward: median time, the memory it adds over its inputs, and the output's
    error against truth; an out-of-memory error becomes the row's "error"."""
    out = run(*inputs)
    dout = torch.randn_like(out)
    err = ((out.float() - truth).norm() / truth.norm()).item()

    def step():
        for t in inputs:
            t.grad = None
        run(*inputs).backward(dout)

    try:
        ms = median_ms(step)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    except torch.OutOfMemoryError as exc:
        return {"kernel": label, "error": str(exc).splitlines()[0][:160]}
    return {"kernel": label, "fwd_bwd_ms": round(ms, 3), "extra_gib": round(extra, 2), "rel_err": float(f"{err:.2e}")}


def fwd_bwd_text(row: dict) -> str:
    """A fwd_bwd_row as one line's tail."""
    return row.get("error") or f"fwd+bwd {row['fwd_bwd_ms']:.3f} ms, +{row['extra_gib']} GiB, rel err {row['rel_err']}"


def print_settings(label: str, settings: list[dict]) -> None:
    """setting_row rows, fastest first."""
    for x in sorted(settings, key=lambda x: x["ms"]):
        print(f"  {label} {x['blocks']}: {x['ms']:.4f} ms, {x['gbps']} GB/s, rel err {x['rel_err']}")


def main(doc: str, shapes: dict, bench_shape: Callable[..., dict], report: Callable[[dict], None]) -> None:
    """--out FILE: bench_shape(name, *shape) for each of shapes, report(row) prints it; all rows to FILE."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    args = parser.parse_args()
    rows = [bench_shape(name, *shape) for name, shape in shapes.items()]
    for row in rows:
        report(row)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "triton": triton.__version__, "rows": rows}, indent=1))
