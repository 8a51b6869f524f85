"""The shared kernel helpers: the optional triton import, device checks and launch settings."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ppalli.errors import PpalliError
from ppalli.kernels import _utils


def test_kernels_import_without_triton_and_fail_clearly_on_use():
    """Blocking `import triton` (sys.modules entry None) must leave every kernel module importable."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None
        import torch
        import ppalli.kernels.geglu, ppalli.kernels.linear_cross_entropy, ppalli.kernels.rope, ppalli.kernels.swiglu
        from ppalli.errors import PpalliError
        from ppalli.kernels.rms_norm import rms_norm
        try:
            rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)
        except PpalliError as exc:
            print("ERROR:", exc)
        """
    )
    repo = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "ERROR: the fused kernels need triton" in out.stdout and "pip install ppalli[fast]" in out.stdout


def test_missing_kernel_raises_on_launch(monkeypatch):
    monkeypatch.setattr(_utils, "triton", None)
    with pytest.raises(PpalliError, match="need triton"):
        _utils.jit(lambda x: x)[(1,)]


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(PpalliError, match="run on CUDA tensors"):
        _utils.check_tensors(torch.ones(2))


def test_launch_settings():
    assert _utils.row_block(123) == 128 and _utils.row_block(4096) == 4096
    assert [_utils.num_warps_for(b) for b in (128, 2048, 8192, 32768)] == [4, 8, 16, 32]
    with pytest.raises(PpalliError, match="wider than"):
        _utils.row_block(_utils.MAX_FUSED_SIZE + 1)
