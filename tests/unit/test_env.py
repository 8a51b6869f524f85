import json
import subprocess
import sys
from types import SimpleNamespace

import torch

from ppalli.env import GPU, Environment, _gpu, probe, version_tuple


def test_probe_reads_this_machine():
    env = probe()
    assert env.python == ".".join(map(str, sys.version_info[:3]))
    assert env.torch == torch.__version__
    assert len(env.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert env.cpu_count >= 1
    # the venv has both hard dependencies; their versions come from installed metadata
    assert version_tuple(env.version("transformers")) >= (5,)
    assert version_tuple(env.version("peft")) >= (0, 21)


def test_environment_round_trips_through_json():
    env = Environment(os="Linux", python="3.11.7", torch="2.11.0", cuda="13.0",
                      gpus=(GPU("NVIDIA H100 80GB HBM3", (9, 0), 85_045_510_144, True),),
                      cpu_count=16, ram_bytes=128 * 2**30, packages={"triton": "3.6.0"})
    back = Environment.from_dict(json.loads(json.dumps(env.to_dict())))
    assert back == env
    assert back.gpus[0].capability == (9, 0)


def test_hand_built_environment_answers_questions():
    env = Environment(gpus=(GPU("Tesla T4", (7, 5), 15_843_721_216, False),), packages={"bitsandbytes": "0.50.2"})
    assert env.has("bitsandbytes") and not env.has("triton")
    assert env.version("bitsandbytes") == "0.50.2" and env.version("triton") is None
    assert env.gpu(0).capability_str == "7.5"
    assert env.gpu(1) is None
    assert round(env.gpu(0).total_memory_gib, 1) == 14.8


def _fake_torch(major, minor, emulated_bf16=True):
    props = SimpleNamespace(name="Tesla T4", major=major, minor=minor, total_memory=16 * 2**30)
    cuda = SimpleNamespace(get_device_properties=lambda i: props, is_bf16_supported=lambda **kw: emulated_bf16)
    return SimpleNamespace(cuda=cuda, version=SimpleNamespace(cuda="12.8", hip=None))


def test_bf16_comes_from_capability_not_from_torch_emulation():
    # torch.cuda.is_bf16_supported() says True on a T4 (emulation); loading bf16 there fails in cuBLAS
    assert _gpu(_fake_torch(7, 5), 0).bf16 is False
    assert _gpu(_fake_torch(8, 0), 0).bf16 is True
    assert _gpu(_fake_torch(8, 6), 0).bf16 is True


def test_version_tuple():
    assert version_tuple("5.24.0.dev0") == (5, 24, 0)
    assert version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert version_tuple("1.0rc1") == (1, 0)
    assert version_tuple("2026.10.9") == (2026, 10, 9)
    assert version_tuple(None) == () and version_tuple("unknown") == ()


def test_importing_the_planner_has_no_side_effects():
    code = ("import sys, ppalli.env, ppalli.plan.planner, ppalli.plan.whatif, ppalli.doctor; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
