"""plan.deterministic's switch (ppalli/train/determinism.py) and what reads it on the CPU: the mode is set and
restored around a run, and the flash-attn arguments ask for the repeatable backward only in that mode.
Bit-repeatability itself is measured on the GPU (tests/gpu/test_deterministic_gpu.py)."""

import os

import pytest
import torch

from ppalli.models.attention import _flash_kwargs
from ppalli.train.determinism import CUBLAS_WORKSPACE, deterministic, set_deterministic


@pytest.fixture(autouse=True)
def _restore_mode():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_the_block_turns_the_mode_on_and_restores_it_even_on_error(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    with pytest.raises(RuntimeError, match="boom"), deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
        raise RuntimeError("boom")
    assert not torch.are_deterministic_algorithms_enabled()


def test_off_leaves_a_mode_the_caller_set_and_the_users_cublas_setting_stays(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    with deterministic(False):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    before = set_deterministic(True)
    assert before == (True, True) and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_flash_attn_asks_for_its_repeatable_backward_only_in_the_mode():
    torch.use_deterministic_algorithms(False)
    assert "deterministic" not in _flash_kwargs(None, None, None)
    with deterministic(True):
        assert _flash_kwargs(0.125, 4096, 50.0) == dict(softmax_scale=0.125, causal=True, window_size=(4095, 0),
                                                        softcap=50.0, deterministic=True)
