"""Every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80) on this CPU-only machine, with the
argument types and constants its launchers pass, through Triton's bundled ptxas (compile_cuda.py). The
interpreter runs the kernels' arithmetic; this catches what only a GPU compile sees, before a GPU does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def _has_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception:  # noqa: BLE001 - any failure here means no CUDA backend in this Triton
        return False
    for args in ((90,), ()):  # triton 3.9 takes the arch; older releases take nothing
        try:
            return get_ptxas(*args) is not None
        except TypeError:
            continue
        except Exception:  # noqa: BLE001 - no ptxas found
            return False
    return False


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton build has no CUDA backend / ptxas")
def test_every_kernel_compiles_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[3])  # the checkout: ppalli imports without `pip install -e .`
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    script = Path(__file__).with_name("compile_cuda.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join(done.stdout.splitlines()[-30:]) + done.stderr[-3000:]
    assert done.returncode == 0, tail
    assert " 0 failed" in done.stdout, tail


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton build has no CUDA backend / ptxas")
def test_sass_census_reads_the_glu_loops_at_t1_shapes():
    # benchmarks/sass_census.py: lora_glu's loops on sm_90 use the PTX sigmoid (2 MUFU an element, none of
    # tl.sigmoid's compares: FSETP) and spill nothing.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "sass_census.py"), "--only", "lora_glu"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = [block for block in done.stdout.split("\n\n") if "lora_glu" in block]
    assert len(kernels) == 2, done.stdout  # the forward with h Ad^T and the backward with its sums
    for block in kernels:
        assert " 0 B stack" in block and "MUFU" in block and "FSETP" not in block, block
