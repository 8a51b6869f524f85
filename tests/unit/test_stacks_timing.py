"""benchmarks/_stacks.py's per-step timing detail on the CPU: host time and Python's garbage collections
per step, the figures that tell a host stall from a slow device step in the GPU runs."""

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _stacks  # noqa: E402


def test_each_step_gets_its_host_time_and_its_collections():
    def step(x, collect):
        time.sleep(0.002 * x)
        if collect:
            gc.collect()  # a full collection, as one falling inside a training step would be
        return x

    losses, ms, seconds, detail = _stacks.timed_steps(step, [(1, False), (5, True), (1, False)], "cpu")
    assert losses == [1, 5, 1] and len(ms) == 3 and seconds >= sum(ms) / 1e3 * 0.99
    assert detail["host_ms"][1] > detail["host_ms"][0] and detail["host_ms"][1] >= 10
    assert detail["gc_full"][1] >= 1 and detail["gc_ms"][1] > 0
    assert detail["gc_full"][0] == 0 == detail["gc_full"][2]
    assert "alloc" not in detail  # the allocator counters are CUDA's
    assert _stacks.GCTimer not in [type(cb) for cb in gc.callbacks]  # the callback is removed afterwards
