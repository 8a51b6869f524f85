"""Run a ppalli command and print a line each time Triton compiles a kernel (its name, options and the types and
specializations of its arguments), in order with the command's own output: a compile printed after "step 17"
belongs to step 18. What a slow step in the middle of a run compiled shows here.

    python benchmarks/trace_compiles.py train configs/llama-3.2-1b-random-ko-chatbot.yaml --set ...
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002, ANN001, ARG001
    shown = " ".join(repr.split())  # an argument's type may print over several lines
    print(f"[triton compile {time.strftime('%H:%M:%S')}] {shown} key={key}", flush=True)
    return None  # compile as usual


def main() -> int:
    from triton import knobs

    from ppalli.cli import main as ppalli_main

    knobs.runtime.jit_cache_hook = _hook
    return ppalli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
