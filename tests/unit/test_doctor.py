from ppalli.config import from_dict
from ppalli.doctor import doctor_report, known_bad_combinations
from ppalli.env import GPU, Environment, probe

T4 = GPU("Tesla T4", (7, 5), 15_843_721_216, False)
H100 = GPU("NVIDIA H100 80GB HBM3", (9, 0), 85_045_510_144, True)
GOOD = {"transformers": "5.24.0", "peft": "0.21.2", "triton": "3.6.0", "bitsandbytes": "0.50.2"}


def env(gpus=(H100,), cuda="13.0", **packages):
    return Environment(torch="2.11.0", cuda=cuda, gpus=gpus, packages={**GOOD, **packages})


def problems(e, cfg=None):
    return [(f.severity, f.problem) for f in known_bad_combinations(e, cfg)]


def test_a_good_machine_has_no_problems():
    assert problems(env(flash_attn_4="4.0.0b40")) == []
    statuses = [status for _, _, status in doctor_report(env(flash_attn_4="4.0.0b40"))]
    assert set(statuses) == {"ok"}


def test_t4_warns_about_bf16_and_a_bf16_pin_is_bad():
    assert problems(env(gpus=(T4,)))[0][0] == "warn"
    pinned = from_dict({"plan": {"precision": "bf16"}})
    severity, problem = problems(env(gpus=(T4,)), pinned)[0]
    assert severity == "bad" and "no bf16" in problem and "CUBLAS_STATUS_NOT_SUPPORTED" in problem


def test_bitsandbytes_without_cuda():
    found = problems(env(gpus=(), cuda=None))
    assert ("warn", "bitsandbytes is installed but there is no CUDA GPU") in found


def test_versions_outside_the_tested_ranges():
    assert problems(env(transformers="4.57.1"))[0][0] == "bad"
    assert problems(env(peft="0.17.0"))[0][0] == "bad"
    assert problems(env(transformers="6.1.0"))[0][0] == "warn"
    assert any("peft is not installed" in p for _, p in problems(Environment(packages={"transformers": "5.24"})))


def test_flash_attn_below_capability_8_is_bad_and_fine_above():
    assert ("bad", "flash-attn is installed but FlashAttention 2 needs compute capability 8.0+") in problems(
        env(gpus=(T4,), flash_attn="2.7.4"))
    assert problems(env(flash_attn="2.7.4", flash_attn_4="4.0.0b40")) == []
    assert ("warn", "flash-attn 4 is installed but needs compute capability 8.0+") in problems(
        env(gpus=(T4,), flash_attn_4="4.0.0b40"))
    assert problems(env(flash_attn_4="4.0.0b40")) == []


def test_hopper_without_flash_attn_4_is_told_how_to_install_it():
    (severity, fix), = [(f.severity, f.fix) for f in known_bad_combinations(env()) if "flash-attn 4" in f.problem]
    assert severity == "warn" and "pip install 'ppalli[fa4]'" in fix
    assert not [p for _, p in problems(env(flash_attn_3="3.0.0")) if "flash-attn 4" in p]  # FA3 runs first there
    assert not [p for _, p in problems(env(gpus=(T4,))) if "flash-attn 4" in p]


def test_missing_triton_matters_only_with_a_gpu():
    cpu = Environment(packages={"transformers": "5.24.0", "peft": "0.21.2"})
    assert not any("triton" in p for _, p in problems(cpu))
    gpu = Environment(torch="2.11.0", cuda="13.0", gpus=(H100,), packages={"transformers": "5.24.0", "peft": "0.21"})
    assert any("triton" in p for _, p in problems(gpu))


def test_cuda_build_without_a_gpu_and_unsloth():
    found = problems(env(gpus=(), unsloth="2026.10.9"))
    assert found[0] == ("bad", "torch is a CUDA 13.0 build but sees no GPU")  # bad sorts first
    assert any("unsloth" in p for _, p in found)


def test_pinned_nf4_without_bitsandbytes():
    e = Environment(torch="2.11.0", cuda="13.0", gpus=(H100,), packages={"transformers": "5.24.0", "peft": "0.21"})
    found = problems(e, from_dict({"plan": {"quantization": "nf4"}}))
    assert found[0][0] == "bad" and "bitsandbytes" in found[0][1]


def test_fp8_needs_hopper():
    fp8 = from_dict({"plan": {"fp8": True}})
    found = problems(env(gpus=(T4,)), fp8)
    assert ("bad", "plan.fp8=true needs a GPU of compute capability 9.0+ (row-wise fp8 GEMMs); best here: 7.5") in found
    assert problems(env(flash_attn_4="4.0.0b40"), fp8) == []


def test_report_rows_are_checks_values_and_statuses():
    rows = doctor_report(env(gpus=(T4,), transformers="5.3.0"))
    assert all(len(r) == 3 and all(isinstance(x, str) and "\n" not in x for x in r) for r in rows)
    status = dict((check, s) for check, _, s in rows)
    assert status["transformers"].startswith("bad: transformers 5.3.0 is older")
    assert status["GPU 0"].startswith("warn")
    assert any(check == "problem" and "no bf16" in value for check, value, _ in rows)
    for _, _, s in doctor_report(probe()):
        assert s == "ok" or s.startswith(("warn: ", "bad: "))
