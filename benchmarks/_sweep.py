"""What the kernel-setting sweeps (bench_lora_glu.py, bench_lora_add_rms_norm.py) share: the timer and a
main that times each shape, prints the rows and writes them as JSON with the versions that produced them."""

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
