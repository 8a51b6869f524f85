import os
from pathlib import Path

import pytest

# Triton decides at decoration time whether a kernel is interpreted, so the switch must be set before
# any ppalli.kernels module is imported: on a machine without CUDA every Triton kernel runs in the
# interpreter (small shapes only).
try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # torch missing: every test that needs it fails on import anyway
    HAS_CUDA = False
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The GPU machine gets the working tree without ../shared: benchmarks/gpu_train_runs.sh's carried copy
# (.gpu-data, the same files) stands in there.
CARRIED = Path(__file__).resolve().parents[1] / ".gpu-data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if SHARED.is_dir():
        return SHARED
    if CARRIED.is_dir():
        return CARRIED
    pytest.skip(f"shared data not found at {SHARED} (nor a carried copy at {CARRIED})")


def pytest_collection_modifyitems(config, items):
    has_cuda = HAS_CUDA
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}gpu{os.sep}" in path:
            item.add_marker(pytest.mark.gpu)
            if not has_cuda:
                item.add_marker(skip_gpu)
        elif f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
