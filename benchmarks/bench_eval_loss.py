"""The held-out loss of a trained run through the reference loss (full (B, T, V) logits) and through
chunked_lm_loss (the head over 2048 trained tokens at a time): both values, seconds and peak GPU memory.

    python benchmarks/bench_eval_loss.py RUN_DIR [--micro-batch 4] --out results.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from ppalli.eval.runner import _Batches, eval_rows  # noqa: E402
from ppalli.models.load import load_run  # noqa: E402
from ppalli.train.loop import evaluate  # noqa: E402
from ppalli.train.objectives import SFT, chunked_lm_loss, reference_lm_loss  # noqa: E402
from ppalli.train.recipe import make_collate  # noqa: E402


def measure(run, rows, lm_loss, micro_batch: int) -> dict:
    collate = make_collate(run.tokenizer, run.model.device, "sft")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss = evaluate(run.model, SFT(lm_loss), rows, _Batches(micro_batch), collate)["loss"]
    torch.cuda.synchronize()
    return {"loss": loss, "seconds": round(time.perf_counter() - start, 2),
            "peak_gib_over_model": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run = load_run(args.run_dir)
    rows, source = eval_rows(args.run_dir, run.tokenizer, [], None)
    result = {"run": str(args.run_dir), "rows": source, "micro_batch": args.micro_batch,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn in (("reference", reference_lm_loss), ("chunked", chunked_lm_loss)):
        measure(run, rows[: args.micro_batch], fn, args.micro_batch)  # warm-up: kernels picked, caches filled
        result[name] = measure(run, rows, fn, args.micro_batch)
        print(name, result[name])
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
