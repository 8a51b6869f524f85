"""Tokenizing a dataset (`ppalli.data.prepare`): one process against process pools of several sizes, whole runs.

Why: on the 16-core H100 host a pool of 15 workers once took 96.9 s to start (each worker imported transformers and
torch to unpickle the tokenizer); workers now load the fast tokenizer's Rust core from its JSON, and encoding runs in
this process for its first `tokenize.SERIAL_S` seconds before any pool starts. This times both on the machine at
hand: `SERIAL_S` 0 (the pool from the first chunk on, so its start shows) for each `--procs`, and the default path
(num_proc 0: one worker a core but one, after SERIAL_S here).

    python benchmarks/bench_tokenize.py --data ../shared/data/ko_chatbot_qa/ChatbotData.csv \
        --tokenizer ../shared/data/tokenizer_llama3 --repeat 8 --procs 1,2,4,8,15 --out results.json

--repeat writes the data that many times over into one temporary file (a bigger dataset, the same rows).
Each run reads, renders, tokenizes and masks every row, its cache in its own empty folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppalli.config import DataConfig  # noqa: E402
from ppalli.data import tokenize  # noqa: E402
from ppalli.data.pipeline import prepare  # noqa: E402
from ppalli.models.tokenizer import load_tokenizer  # noqa: E402


def _repeated(src: Path, times: int, folder: Path) -> Path:
    """src written `times` over into one file (a CSV keeps one header)."""
    out = folder / f"data{src.suffix}"
    lines = [line.rstrip("\r\n") + "\n" for line in src.read_text(encoding="utf-8").splitlines()]
    head, body = (lines[:1], lines[1:]) if src.suffix in (".csv", ".tsv") else ([], lines)
    out.write_text("".join(head + body * times), encoding="utf-8")
    return out


def _run(path: Path, tok, num_proc: int, serial_s: float, folder: Path) -> dict:
    tokenize.SERIAL_S = serial_s
    cfg = DataConfig(path=str(path), eval_split=0.0, num_proc=num_proc, max_seq_len=4096,
                     cache_dir=tempfile.mkdtemp(dir=folder))
    start = time.perf_counter()
    prepared = prepare(cfg, tok, seed=0)
    seconds = time.perf_counter() - start
    rows = len(prepared.train)
    return {"num_proc": num_proc, "serial_s": serial_s, "rows": rows, "tokens": prepared.stats["tokens"],
            "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--out")
    args = parser.parse_args()
    tok = load_tokenizer(args.tokenizer)
    default_serial = tokenize.SERIAL_S
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = _repeated(Path(args.data), args.repeat, folder)
        for procs in [int(p) for p in args.procs.split(",")]:
            runs.append(_run(path, tok, procs, 0.0 if procs > 1 else default_serial, folder))
            print(json.dumps(runs[-1]), flush=True)
        runs.append({**_run(path, tok, 0, default_serial, folder), "default": True,
                     "resolved_procs": tokenize.resolve_num_proc(0)})
        print(json.dumps(runs[-1]), flush=True)
    facts = {"cpus": os.cpu_count(), "data": args.data, "repeat": args.repeat, "tokenizer": args.tokenizer}
    if args.out:
        Path(args.out).write_text(json.dumps({"facts": facts, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
