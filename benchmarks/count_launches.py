"""Kernel launches of one fast-path train step, counted where they are dispatched: each aten op that reaches
a backend (views and allocations excluded) and each Triton kernel launch, for a tiny random Llama with PEFT
LoRA on all seven projections. Run with 1 and 2 layers, the difference is one decoder layer's launches.

    python benchmarks/count_launches.py [--layers 1 2] [--device cpu|cuda]

On the CPU the Triton kernels run interpreted (TRITON_INTERPRET=1 is set when there is no GPU); ops inside an
interpreted launch (the interpreter copies each argument) are not counted. A count is what the step asks
for, not a timing: small launches cost a few microseconds each on an H200 (profiles in benchmarks/results).
2026-12-02 on the CPU: 83 a layer before the factor cache, 65 after (9 of them the factor-gradient casts
that torch's out_dtype removes on CUDA); 2026-12-03: 64 at a71a6fa, 57 with lora_b_bwd and rope_lora_fwd.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_NO_KERNEL = ("view", "t.", "transpose", "slice", "as_strided", "_reshape_alias", "expand", "empty", "select",
              "unsqueeze", "squeeze", "permute", "alias", "detach", "_unsafe_view", "split", "unbind",
              "lift_fresh", "_local_scalar_dense", "is_same_size", "new_empty", "set_", "resolve",
              "_record_function")


def count_step(layers: int, device: str) -> collections.Counter:
    """Launches of the second train step (the first one warms the caches) of a tiny fast-path Llama."""
    import torch
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as compiled
    from torch.utils._python_dispatch import TorchDispatchMode

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this tree's ppalli, not an installed one (another checkout)
    from train_alike import lora_llama

    from ppalli.models.fast import apply_fast_path
    from ppalli.models.fast_loss import fast_causal_lm_loss

    model = lora_llama(300, torch.bfloat16, device=device, layers=layers, rank=16)
    handle = apply_fast_path(model, log=lambda line: None)
    fused = device == "cuda"  # as the trainer's AdamW; on the CPU foreach, not a loop per parameter
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused,
                            foreach=not fused)
    ids = torch.randint(0, 300, (2, 16), device=device)
    counts: collections.Counter = collections.Counter()
    inside = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and not func.__name__.startswith(_NO_KERNEL):
                counts[func.__name__] += 1
            return func(*args, **(kwargs or {}))

    def counting(real):
        def run(self, *args, **kwargs):  # a Triton launch: counted; what an interpreted one runs inside is not
            counts["triton:" + self.fn.__name__] += 1
            inside[0] += 1
            try:
                return real(self, *args, **kwargs)
            finally:
                inside[0] -= 1
        return run

    real_runs = {cls: cls.run for cls in (interpreter.InterpretedFunction, compiled.JITFunction)}

    def step():
        loss, n = fast_causal_lm_loss(model, ids, ids)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for cls, real in real_runs.items():
        cls.run = counting(real)
    try:
        step()
        counts.clear()
        with Count():
            step()
    finally:
        for cls, real in real_runs.items():
            cls.run = real
        handle.revert()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default=None, help="cuda when there is one, else cpu (interpreted)")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    totals = {}
    for layers in args.layers:
        counts = count_step(layers, device)
        totals[layers] = sum(counts.values())
        print(f"{layers} layer(s): {totals[layers]} launches")
        for name, n in counts.most_common():
            print(f"  {n:5d} {name}")
    if len(totals) > 1:
        (a, ta), (b, tb) = sorted(totals.items())[:2]
        print(f"a decoder layer: {(tb - ta) / (b - a):g} launches")


if __name__ == "__main__":
    main()
