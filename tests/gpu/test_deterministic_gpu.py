"""plan.deterministic on CUDA: two trainings from one seed give the same per-step losses and the same adapter,
bit for bit, on the fast path (a dense batch: SDPA's flash kernel; packed rows: torch's varlen kernel) and on
the reference path (HF + PEFT through torch's SDPA dispatch, which skips cuDNN in that mode).

The model is a random Llama with Llama-3.2-1B's head size (16 heads of 64, 4 kv heads), LoRA r=16 on every
projection, so the kernels that sum in a varying order by default run as in the real case: cuDNN's attention
backward (which refuses the mode: results/2026-12-03-h200-determinism.txt) and lora_b_bwd's atomic adds.
Whether two default-mode runs differ is printed, not asserted: it depends on scheduling.
"""

import pytest
import torch

pytest.importorskip("triton")
from train_alike import fast_step, lora_llama, reference_step, samples, train  # noqa: E402

from ppalli.models.attention import resolve_backend  # noqa: E402
from ppalli.models.fast import apply_fast_path  # noqa: E402
from ppalli.models.fast_loss import fast_causal_lm_loss  # noqa: E402
from ppalli.train.determinism import deterministic  # noqa: E402

DEVICE = "cuda"
SIZE = dict(hidden=1024, layers=2, heads=16, kv_heads=4, rank=16)
STEPS, LR = 4, 1e-3
VOCAB = 32000


def dense_step(model, ids):
    return fast_causal_lm_loss(model, ids, ids)


def run(vocab: int, steps, step_fn, fast: bool):
    """(per-step losses, the trained adapter's weights, the fast path's log) of one training from seed 0."""
    model = lora_llama(vocab, torch.bfloat16, DEVICE, **SIZE)
    lines: list[str] = []
    handle = apply_fast_path(model, attention_backend="auto", log=lines.append) if fast else None
    losses = train(model, steps, step_fn, LR)
    if handle is not None:
        handle.revert()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, weights, lines


def differs(a, b) -> list[str]:
    """What two runs disagree on: 'losses' and the names of adapter weights not equal bit for bit."""
    out = ["losses"] if a[0] != b[0] else []
    return out + [n for n in a[1] if not torch.equal(a[1][n], b[1][n])]


def twice(vocab, steps, step_fn, fast: bool, on: bool):
    with deterministic(on):
        first, second = run(vocab, steps, step_fn, fast), run(vocab, steps, step_fn, fast)
    return first, differs(first, second)


def random_batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 1024), generator=gen).to(DEVICE) for _ in range(STEPS)]


def test_fast_path_dense_batches_are_bit_repeatable():
    batches = random_batches()
    first, diff = twice(VOCAB, batches, dense_step, fast=True, on=True)
    assert not diff, f"deterministic runs differ in {diff[:5]}"
    assert "attention sdpa_flash" in first[2][0], first[2][0]
    _, default_diff = twice(VOCAB, batches, dense_step, fast=True, on=False)
    print(f"default mode: two runs differ in {len(default_diff)} of {len(first[1]) + 1} (losses + weights)")


def test_fast_path_packed_rows_and_reference_path_are_bit_repeatable(shared_data):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(shared_data / "tokenizer_qwen2.5")))
    rows = samples(shared_data, STEPS * 8, 64)
    steps = [rows[i:i + 8] for i in range(0, len(rows), 8)]
    for step_fn, fast in ((fast_step, True), (reference_step, False)):
        _, diff = twice(vocab, steps, step_fn, fast=fast, on=True)
        assert not diff, f"{'fast' if fast else 'reference'} path: deterministic runs differ in {diff[:5]}"


def test_the_mode_picks_flash_and_leaves_cudnn_after():
    with deterministic(True):
        assert resolve_backend("auto", DEVICE)[0] == "sdpa_flash"
    if torch.cuda.get_device_capability()[0] >= 9:
        assert resolve_backend("auto", DEVICE)[0] == "sdpa_cudnn"
