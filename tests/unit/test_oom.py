import pytest
import torch

from ppalli.plan.planner import Plan
from ppalli.train.oom import explain_cuda_error, is_oom, step_down


def plan(micro=8, accum=1, checkpointing="none", pinned=()):
    return Plan(device="cuda", precision="bf16", attention="sdpa", quantization="none", checkpointing=checkpointing,
                micro_batch_size=micro, grad_accum=accum, packing=True, fast_path=True, compile=False,
                reasons={"micro_batch_size": "the whole batch of 8 fits in one pass"}, pinned=pinned,
                predicted_peak_gib=61.2, budget_gib=75.2, est_tokens_per_s=15000)


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, ...)`"),
    RuntimeError("CUDA error: unknown error\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions."),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"),
])
def test_is_oom_recognises_oom_and_what_hides_it(exc):
    assert is_oom(exc)


@pytest.mark.parametrize("exc", [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmStridedBatchedEx`"),
    ValueError("out of memory in my own parser"),  # not a RuntimeError: not CUDA's
    KeyError("x"),
])
def test_is_oom_rejects_other_errors(exc):
    assert not is_oom(exc)


def test_is_oom_follows_the_cause_chain():
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except RuntimeError as inner:
            raise KeyError("wrapped") from inner
    except KeyError as outer:
        assert is_oom(outer)


@pytest.mark.parametrize("message,words", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB", ["ran out of memory", "micro_batch_size"]),
    ("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`", ["out of memory", "CUDA_LAUNCH"]),
    ("CUDA error: unknown error", ["out of memory", "nvidia-smi"]),
    ("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx`", ["bf16", "fp16"]),
    ("CUDA error: device-side assert triggered", ["vocabulary", "tokenizer"]),
    ("CUDA error: no kernel image is available for execution on the device", ["arch"]),
    ("CUDA error: an illegal memory access was encountered", ["plan.fast_path=off"]),
    ("CUDA error: misaligned address", ["CUDA_LAUNCH_BLOCKING=1"]),
])
def test_explain_cuda_error_says_what_it_means_and_what_to_do(message, words):
    text = explain_cuda_error(RuntimeError(message))
    assert "\n" not in text
    for word in words:
        assert word in text


def test_step_down_halves_the_micro_batch_then_adds_recompute():
    steps, current = [], plan()
    while current is not None:
        steps.append(current)
        current = step_down(current)
    shapes = [(p.micro_batch_size, p.grad_accum, p.checkpointing) for p in steps]
    assert shapes == [(8, 1, "none"), (4, 2, "none"), (2, 4, "none"), (1, 8, "none"),
                      (1, 8, "selective"), (1, 8, "full"), (1, 8, "offload")]
    assert all(p.micro_batch_size * p.grad_accum == 8 for p in steps)
    assert steps[1].reasons["micro_batch_size"].startswith("stepped down after OOM at micro-batch 8")
    assert steps[4].reasons["checkpointing"].startswith("stepped down after OOM with none checkpointing")
    assert steps[1].predicted_peak_gib is None and "61.2" in steps[1].reasons["memory"]
    assert steps[4].est_tokens_per_s is None


def test_step_down_shrinks_a_packed_pass_capped_by_the_data():
    # 8 pairs of the data hold at most 6,462 tokens, under the 16,384 a pass of 8 could: halving the micro-batch
    # alone would leave the pass at 6,462 (loop._split), so the cap halves with it
    import dataclasses

    packed = dataclasses.replace(plan(), pass_tokens=6462)
    stepped = step_down(packed)
    assert (stepped.micro_batch_size, stepped.pass_tokens) == (4, 3231)
    assert step_down(plan()).pass_tokens is None


def test_step_down_keeps_the_batch_when_the_micro_batch_is_odd():
    stepped = step_down(plan(micro=3, accum=4))
    assert (stepped.micro_batch_size, stepped.grad_accum) == (1, 12)
    stepped = step_down(plan(micro=12, accum=1))
    assert (stepped.micro_batch_size, stepped.grad_accum) == (6, 2)


def test_step_down_moves_pins_last():
    stepped = step_down(plan(pinned=("micro_batch_size",)))
    assert (stepped.micro_batch_size, stepped.checkpointing) == (8, "selective")
    # with everything pinned, a smaller pinned micro-batch still beats dying; the reason says so
    stepped = step_down(plan(pinned=("micro_batch_size", "checkpointing")))
    assert (stepped.micro_batch_size, stepped.checkpointing) == (4, "none")
    assert "pinned, but it did not fit" in stepped.reasons["micro_batch_size"]
