"""Streaming keeps memory flat: a JSONL of more than 500 MB goes through read -> normalize -> render (every row)
-> tokenize (the first rows) in a child process whose peak RSS stays under 1 GiB.

The bound means something: the child starts at ~300 MiB (transformers, torch, the Qwen tokenizer), and the
file's text alone, held as Python strings, would take more than the remaining ~700 MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TARGET_BYTES = 520 * 2**20
PEAK_LIMIT_KIB = 2**20  # 1 GiB, as /proc/self/status's VmHWM reports it (KiB)
TOKENIZED_ROWS = 64  # long rows (~10 KB of Korean each): enough to pass several chunks through the tokenizer

CHILD = textwrap.dedent("""
    import itertools, json, sys
    from ppalli.data.pipeline import SourceSpec, iter_examples
    from ppalli.data.templates import resolve_template
    from ppalli.data.tokenize import EncodeSettings, encode_stream, example_texts
    from ppalli.models.tokenizer import load_tokenizer

    def peak_kib():  # this process's own high-water mark: VmHWM starts afresh at exec, while ru_maxrss keeps
        # the parent's RSS at fork (a pytest that had grown to 1.1 GiB made this child "peak" at 1,125 MiB)
        line = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
        return int(line.split()[1])

    path, tokenizer_dir, tokenized_rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tok = load_tokenizer(tokenizer_dir)
    tpl = resolve_template("auto", tok)
    settings = EncodeSettings(max_seq_len=4096)
    baseline = peak_kib()
    examples = iter_examples([SourceSpec(path)], seed=0, streaming=True)
    head = list(itertools.islice(examples, tokenized_rows))
    train, _, stats = encode_stream(((False, ex) for ex in head), tok, tpl, settings, num_proc=1)
    rows, chars = len(head), 0
    for ex in examples:  # the rest: read, normalized and rendered one at a time, nothing kept
        rows += 1
        chars += sum(len(text) for text, _ in example_texts(ex, tpl, settings))
    print(json.dumps({"rows": rows, "chars": chars, "samples": len(train), "trained": stats.trained_tokens,
                      "baseline_kib": baseline, "peak_kib": peak_kib()}))
""")


def _write_big_jsonl(path: Path) -> int:
    """Repeat one ~5 MB block of long Korean/English alpaca rows until the file passes TARGET_BYTES."""
    answer = ("화성을 식민지화하면 지구에는 다양한 영향이 있을 것입니다. " * 60 + "Mars needs water. " * 40)
    rows = [json.dumps({"instruction": f"질문 {i}: 화성 식민지의 영향은?", "input": None, "output": f"{i} {answer}"},
                       ensure_ascii=False) for i in range(500)]
    block = ("\n".join(rows) + "\n").encode("utf-8")
    repeats = -(-TARGET_BYTES // len(block))
    with open(path, "wb") as f:
        for _ in range(repeats):
            f.write(block)
    return repeats * len(rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_streaming_a_500mb_jsonl_keeps_peak_rss_under_1gib(tmp_path, shared_data):
    big = tmp_path / "big.jsonl"
    try:
        expected_rows = _write_big_jsonl(big)
        assert big.stat().st_size >= 500 * 2**20
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        child = subprocess.run([sys.executable, "-c", CHILD, str(big), str(shared_data / "tokenizer_qwen2.5"),
                                str(TOKENIZED_ROWS)], capture_output=True, text=True, env=env, timeout=300)
        assert child.returncode == 0, child.stderr[-3000:]
        result = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        big.unlink(missing_ok=True)
    assert result["rows"] == expected_rows
    assert result["chars"] > 500 * 2**20 // 3  # every row was rendered (UTF-8 Korean is 3 bytes a character)
    assert result["samples"] == TOKENIZED_ROWS and result["trained"] > 0
    assert result["peak_kib"] < PEAK_LIMIT_KIB, f"peak RSS {result['peak_kib'] / 1024:.0f} MiB"
