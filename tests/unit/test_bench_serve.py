"""benchmarks/bench_serve.py on the CPU, tiny: every client's answer counted, the batches it reports are the server's
(a wrong count would misstate the tokens/s of every serve figure)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_serve  # noqa: E402


def test_a_round_counts_every_clients_tokens_and_the_server_batches():
    run = bench_serve.served_run(None, "cpu")
    one, four = (bench_serve.bench(run, batch_size=b, clients=4, new=3, rounds=2) for b in (1, 4))
    assert one["tokens"] == four["tokens"] == 4 * 3  # no EOS: every answer takes its 3 tokens
    assert one["batches"] == [1] * 8 and sum(four["batches"]) == 8 and max(four["batches"]) <= 4
    assert abs(four["tokens_per_s"] * four["seconds"] - four["tokens"]) < 0.05 * four["tokens"]  # one round
