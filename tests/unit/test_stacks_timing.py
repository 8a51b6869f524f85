"""benchmarks/_stacks.py's per-step timing detail on the CPU: host time and Python's garbage collections
per step, the figures that tell a host stall from a slow device step in the GPU runs, and the nvidia-smi
clock/power log aligned to the steps (with a stand-in nvidia-smi)."""

import gc
import os
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


SMI_LINES = """2026/11/25 19:10:29.692, 1980, 119.64, 0x0000000000000000
2026/11/25 19:10:29.742, 1755, 699.10, 0x0000000000000004
2026/11/25 19:10:29.792, [N/A], [N/A], [N/A]
2026/11/25 19:10:29.842, 1845, 690.00, 0x0000000000000004
2026/12/02 19:10:29.892, 1600, 650.00, 0x0000000000000004, 701.25, 71, [N/A]
"""


def test_nvidia_smi_samples_are_parsed_and_unfilled_lines_skipped(tmp_path):
    log = _stacks.ClockLog(tmp_path / "smi.csv")
    log.path.write_text(SMI_LINES, encoding="utf-8")
    samples = log.samples()
    none3 = (None, None, None)  # the lines logged without SMI_EXTRA
    assert [s[1:] for s in samples] == [(1980.0, 119.64, 0, *none3), (1755.0, 699.1, 4, *none3),
                                        (1845.0, 690.0, 4, *none3), (1600.0, 650.0, 4, 701.25, 71.0, None)]
    assert abs((samples[1][0] - samples[0][0]) - 0.05) < 1e-6


def _sample(t, mhz, w, reasons, instant=None, temp=None):
    return (t, mhz, w, reasons, instant, temp, None)


def test_each_step_gets_the_clocks_of_the_samples_inside_it():
    samples = [_sample(10.00, 1980, 500.0, 0), _sample(10.05, 1980, 520.0, 0), _sample(10.10, 1755, 700.0, 4),
               _sample(10.15, 1845, 690.0, 4), _sample(10.20, 1980, 600.0, 0)]
    out = _stacks.per_step_clocks([(9.99, 10.06), (10.07, 10.21), (11.0, 11.1)], samples)
    assert out["sm_mhz"] == [1980, round((1755 + 1845 + 1980) / 3), None]
    assert out["power_w"] == [510.0, round((700 + 690 + 600) / 3, 1), None]
    assert out["power_capped"] == [0.0, 0.67, None]
    assert "power_instant_w" not in out and "temp_c" not in out  # nothing logged them
    samples[2:4] = [_sample(10.10, 1755, 700.0, 4, 710.0, 70.0), _sample(10.15, 1845, 690.0, 4, None, 72.0)]
    out = _stacks.per_step_clocks([(9.99, 10.06), (10.07, 10.21)], samples)
    assert out["power_instant_w"] == [None, 710.0] and out["temp_c"] == [None, 71.0]


def test_the_trace_keeps_one_sample_per_period_from_the_start():
    samples = [_sample(100.0 + 0.05 * i, 1900 - i, 600.0 + i, 4, 690.0 if i % 2 else None, 60.0) for i in range(40)]
    trace = _stacks.clock_trace(samples, start=100.2)
    assert trace["s"] == [0.0, 0.5, 1.0, 1.5]  # samples 4, 14, 24, 34: the first at or after each half second
    assert trace["sm_mhz"] == [1896, 1886, 1876, 1866]
    assert trace["power_w"] == [604.0, 614.0, 624.0, 634.0]  # the 1 s average where no instant reading came
    assert trace["temp_c"] == [60.0] * 4 and trace["hbm_temp_c"] == [None] * 4


def test_warm_up_runs_each_batch_then_goes_round_until_the_seconds_pass():
    calls = []

    def step(x):
        calls.append(x)
        time.sleep(0.01)
        return x

    losses, n = _stacks.warm_up(step, [(1,), (2,), (3,)])
    assert (losses, n, calls) == ([1, 2, 3], 3, [1, 2, 3])
    calls.clear()
    synced = []
    losses, n = _stacks.warm_up(step, [(1,), (2,), (3,)], seconds=0.1, sync=lambda: synced.append(len(calls)))
    assert losses == [1, 2, 3] and n == len(calls) >= 3 + 9 and calls[:6] == [1, 2, 3, 1, 2, 3]
    assert synced == [3]  # the held seconds start once the first round (compiles, autotuning) is done


def test_step_windows_come_from_the_events_back_from_the_final_sync():
    class Event:  # elapsed_time(other) in ms from this event to `other`, as torch.cuda.Event gives it
        def __init__(self, t):
            self.t = t

        def elapsed_time(self, other):
            return other.t - self.t

    events = [(Event(0.0), Event(180.0)), (Event(181.0), Event(380.0))]
    windows = _stacks._step_windows(events, end_wall=100.0)
    assert windows == [(100.0 - 0.38, 100.0 - 0.2), (100.0 - 0.199, 100.0)]


def test_the_sampler_runs_beside_the_block_and_stops_after(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"  # prints one sample line per 20 ms, like `nvidia-smi -lms`
    fake.parent.mkdir()
    fake.write_text(FAKE_SMI)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    log = _stacks.ClockLog(tmp_path / "smi.csv")
    with log.active():
        time.sleep(0.2)
    n = len(log.samples())
    assert n >= 3 and all(s[1:] == (1980.0, 650.5, 4, 700.0, 65.0, 70.0) for s in log.samples())
    time.sleep(0.1)
    assert len(log.samples()) == n  # the sampler stopped with the block


def test_an_nvidia_smi_without_the_extra_fields_still_logs_the_clocks(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"  # refuses any query naming power.draw.instant, as an old driver does
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\ncase "$*" in *instant*) echo "Field is not a valid field" >&2; exit 2;; esac\n'
                    + FAKE_SMI.split("\n", 1)[1])
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    log = _stacks.ClockLog(tmp_path / "smi.csv")
    with log.active():
        time.sleep(0.2)
    assert len(log.samples()) >= 3 and all(s[1:] == (1980.0, 650.5, 4, None, None, None) for s in log.samples())


# A stand-in nvidia-smi: with -lms, one sample line per 20 ms (the extra fields when the query asked for them);
# without, one line and exit (the probe).
FAKE_SMI = """#!/bin/sh
line() { case "$*" in *instant*) echo "$(date '+%Y/%m/%d %H:%M:%S.%3N'), 1980, 650.5, 0x4, 700.0, 65, 70";;
                      *) echo "$(date '+%Y/%m/%d %H:%M:%S.%3N'), 1980, 650.5, 0x4";; esac; }
case "$*" in *-lms*) while true; do line "$*"; sleep 0.02; done;; *) line "$*";; esac
"""


def test_without_nvidia_smi_the_sampler_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(_stacks.shutil, "which", lambda name: None)
    log = _stacks.ClockLog(tmp_path / "smi.csv")
    with log.active():
        pass
    assert log.samples() == [] and not log.path.exists()
