"""benchmarks/peers.py's pure parts on the CPU: FLOPs, arguments, what runs, the results file and its table.

The GPU side (benchmarks/_stacks.py) runs on the H100 machine only; nothing here imports torch or a peer.
"""

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from ppalli import config as C

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "peers.py"
_SPEC = importlib.util.spec_from_file_location("peers", _PATH)
peers = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("peers", peers)  # dataclasses look their module up there
_SPEC.loader.exec_module(peers)


# --------------------------------------------------------------------------- figures


def test_flops_per_token_matches_benchmarks_md():
    # BENCHMARKS.md: Llama-3.1-8B at s=2048 takes 33.5 GFLOP per token (4*N_matmul + 12*L*d*s + 6*N_lora)
    assert peers.model_flops_per_token(peers.LLAMA_31_8B, 2048) == pytest.approx(33.5e9, rel=0.01)


@pytest.mark.parametrize("model, tokens_per_s, share", [
    ("8b", 15_328, 0.64),  # Unsloth, GC off, 4x2048
    ("8b", 5_865, 0.25),  # HF + PEFT, GC on
    ("1b", 73_615, 0.54),  # Unsloth, GC off, 8x2048
    ("1b", 24_590, 0.18),  # HF + PEFT, GC on
])
def test_share_of_peak_reproduces_the_peer_table(model, tokens_per_s, share):
    flops = peers.model_flops_per_token(peers.MODELS[model][1], 2048)
    assert peers.share_of_peak(tokens_per_s, flops) == pytest.approx(share, abs=0.006)


def test_gpu_slug_and_paths(tmp_path):
    assert peers.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert peers.gpu_slug("NVIDIA H200") == "h200"
    json_path, md_path = peers.result_paths(tmp_path, "2026-11-24", "NVIDIA H100 80GB HBM3", "T1")
    assert json_path == tmp_path / "2026-11-24-h100-80gb-hbm3-t1.json"
    assert md_path.suffix == ".md" and md_path.stem == json_path.stem


# --------------------------------------------------------------------------- arguments and runs


def test_ppalli_setting_parsing():
    assert peers.parse_ppalli_setting("auto") == {"requested": "auto"}
    assert peers.parse_ppalli_setting("offload,micro=2,fast=off,budget=8.5") == {
        "requested": "offload,micro=2,fast=off,budget=8.5", "checkpointing": "offload", "micro": 2,
        "fast": "off", "budget": 8.5}
    assert peers.parse_ppalli_setting("deterministic") == {"requested": "deterministic", "deterministic": True}
    for bad in ("sometimes", "micro=0", "fast=maybe", "budget=-1", "deterministic=no"):
        with pytest.raises(argparse.ArgumentTypeError):
            peers.parse_ppalli_setting(bad)


def test_defaults_and_flags():
    args = peers.parse_args(["--case", "T1"])
    assert (args.steps, args.warmup, args.stacks, args.profile) == (8, 3, list(peers.STACKS), [])
    assert args.ppalli_setting == [{"requested": "auto"}]
    args = peers.parse_args(["--case", "T4", "--stacks", "ppalli,unsloth", "--profile", "--ppalli-setting",
                             "full", "--ppalli-setting", "auto"])
    assert args.stacks == ["ppalli", "unsloth"] and args.profile == ["ppalli"]
    assert [s["requested"] for s in args.ppalli_setting] == ["full", "auto"]
    with pytest.raises(SystemExit):
        peers.parse_args(["--case", "T1", "--stacks", "ppalli,deepspeed"])
    with pytest.raises(SystemExit):
        peers.parse_args(["--case", "T9"])


def _runs(argv):
    return [(s.stack, s.gc) for s in peers.run_specs(peers.parse_args(argv))]


def test_cases_hold_ppalli_and_their_peers():
    assert _runs(["--case", "T1"]) == [("ppalli", "plan"), ("unsloth", "off"), ("unsloth", "unsloth"),
                                       ("hf", "on"), ("liger", "on")]
    assert _runs(["--case", "T4", "--stacks", "unsloth"]) == [("unsloth", "off"), ("unsloth", "unsloth")]
    t2 = peers.run_specs(peers.parse_args(["--case", "T2"]))
    assert [(s.stack, s.gc, s.mem_cap_gib) for s in t2] == [("ppalli", "plan", 24.0), ("unsloth", "unsloth", 24.0)]
    t3 = peers.run_specs(peers.parse_args(["--case", "T3"]))
    assert {s.quant for s in t3} == {"nf4"} and [s.needs_folder for s in t3] == [False, True, True]
    t4 = peers.run_specs(peers.parse_args(["--case", "T4"]))[0]
    assert (t4.model, t4.batch, t4.seq, t4.model_config["num_hidden_layers"]) == ("1b", 8, 2048, 16)


def test_gc_override_and_custom():
    # --gc replaces the case's modes (and dedupes); HF has no offloaded mode, so "unsloth" reads as on there
    assert _runs(["--case", "T1", "--gc", "unsloth"]) == [("ppalli", "plan"), ("unsloth", "unsloth"), ("hf", "on"),
                                                          ("liger", "on")]
    assert _runs(["--case", "custom", "--stacks", "hf", "--gc", "off", "--batch", "2"]) == [("hf", "off")]
    spec = peers.run_specs(peers.parse_args(["--case", "custom", "--model", "1b", "--batch", "2", "--seq", "512",
                                             "--quant", "nf4", "--mem-cap-gib", "12"]))[0]
    assert (spec.model, spec.batch, spec.seq, spec.quant, spec.mem_cap_gib) == ("1b", 2, 512, "nf4", 12.0)


def test_ppalli_config_is_a_valid_config_with_the_pins():
    spec = peers.run_specs(peers.parse_args(["--case", "T2", "--ppalli-setting", "offload,micro=2"]))[0]
    spec.config_path = "/tmp/x/config.json"
    cfg = C.from_dict(peers.ppalli_config({**spec.__dict__}))
    assert (cfg.plan.checkpointing, cfg.train.micro_batch_size, cfg.plan.memory_budget_gib) == ("offload", 2, 24.0)
    assert (cfg.train.batch_size, cfg.data.max_seq_len, cfg.data.packing, cfg.plan.quantization) == (
        4, 2048, "off", "none")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, len(cfg.lora.targets)) == (16, 16, 0.0, 7)
    auto = peers.run_specs(peers.parse_args(["--case", "T1"]))[0]
    auto.config_path = "/tmp/x/config.json"
    cfg = C.from_dict(peers.ppalli_config(auto.__dict__))
    assert (cfg.plan.checkpointing, cfg.train.micro_batch_size, cfg.plan.memory_budget_gib) == ("auto", None, None)
    assert not cfg.plan.deterministic
    det = peers.run_specs(peers.parse_args(["--case", "T4", "--ppalli-setting", "deterministic"]))[0]
    det.config_path = "/tmp/x/config.json"
    assert C.from_dict(peers.ppalli_config(det.__dict__)).plan.deterministic


def test_place_files_names_profiles_per_stack(tmp_path):
    specs = peers.run_specs(peers.parse_args(["--case", "T1", "--ppalli-setting", "auto", "--ppalli-setting",
                                              "full"]))
    peers.place_files(specs, tmp_path / "scratch", tmp_path, "2026-11-24", ["ppalli"])
    assert [Path(s.profile).name for s in specs if s.profile] == [
        "2026-11-24-{gpu}-t1-profile-ppalli-1.txt", "2026-11-24-{gpu}-t1-profile-ppalli-2.txt"]
    assert specs[1].config_path.endswith("configs/llama-3.1-8b.json")
    assert specs[2].folder.endswith("models/llama-3.1-8b-seed0")


# --------------------------------------------------------------------------- results


def test_child_output_parsing():
    text = "Unsloth: patching...\nPEERS_RESULT {\"a\": 1}\nnoise\nPEERS_RESULT {\"tokens_per_s\": 2.0}\n"
    assert peers.parse_child_output(text) == {"tokens_per_s": 2.0}
    assert peers.parse_child_output("Traceback ...\nCUDA out of memory") is None


def _t1_doc(ppalli_tps=18_000.0, ppalli_peak=44.0):
    args = peers.parse_args(["--case", "T1"])
    specs = {(s.stack, s.gc): s for s in peers.run_specs(args)}
    flops = peers.model_flops_per_token(peers.LLAMA_31_8B, 2048)
    child = {("ppalli", "plan"): {"tokens_per_s": ppalli_tps, "peak_gib": ppalli_peak, "loss_first": 11.77,
                                  "loss_last": 11.70, "step_ms": 455.1, "setting": "plan: checkpointing none"},
             ("unsloth", "off"): {"tokens_per_s": 15_328.0, "peak_gib": 45.9, "loss_first": 11.77, "loss_last": 11.7,
                                  "step_ms": 534.4, "setting": "use_gradient_checkpointing=False"},
             ("unsloth", "unsloth"): {"tokens_per_s": 10_700.0, "peak_gib": 17.8, "loss_first": 11.77,
                                      "loss_last": 11.7, "step_ms": 765.6},
             ("hf", "on"): {"error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"},
             ("liger", "on"): {"error": "timed out after 420 s (log x.log)"}}
    runs = [peers.run_record(specs[k], child[k], flops) for k in child]
    return peers.results_doc("T1", "NVIDIA H100 80GB HBM3", "2026-11-24", {"torch": "2.11.0", "unsloth": None},
                             runs, flops)


def test_results_json_has_benchmarks_md_fields():
    doc = json.loads(json.dumps(_t1_doc()))  # JSON-clean
    assert (doc["device"], doc["date"], doc["versions"]["torch"]) == ("NVIDIA H100 80GB HBM3", "2026-11-24", "2.11.0")
    first = doc["runs"][0]
    for key in ("case", "stack", "setting", "model", "batch", "seq", "tokens_per_s", "peak_gib", "loss_first",
                "loss_last", "share_of_peak", "step_ms"):
        assert key in first, key
    assert (first["model"], first["batch"], first["seq"]) == ("llama-3.1-8b", 4, 2048)
    assert first["share_of_peak"] == pytest.approx(18_000 * 33.49e9 / 798e12, rel=1e-3)
    hf = doc["runs"][3]
    assert hf["error"].startswith("OutOfMemoryError") and "tokens_per_s" not in hf
    assert doc["runs"][2]["setting"] == "unsloth (gc=unsloth)"  # the subprocess named none: the run's label


def test_markdown_ratios_and_target():
    md = peers.markdown(_t1_doc())
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| ")}
    unsloth_off = next(line for line in md.splitlines() if "use_gradient_checkpointing=False" in line)
    assert "15,328" in unsloth_off and "1.17x" in unsloth_off and "0.96x" in unsloth_off  # 18000/15328, 44/45.9
    assert "failed: OutOfMemoryError" in md and "failed: timed out" in md
    assert "1.00x" in rows["plan: checkpointing none"]
    assert "Target T1: met - 1.17x Unsloth (use_gradient_checkpointing=False), target >= 1.17x; peak 44.0 GiB" in md
    missed = peers.markdown(_t1_doc(ppalli_tps=16_000.0, ppalli_peak=61.0))
    assert "Target T1: NOT met" in missed


def test_power_summary_gives_energy_per_token_and_a_table():
    args = peers.parse_args(["--case", "T4"])
    spec = next(s for s in peers.run_specs(args) if s.stack == "ppalli")
    clocks = {"sm_mhz": [1654, 1650, None], "power_w": [600.0, 610.0, None], "power_capped": [1.0, 0.5, None]}
    child = {"tokens_per_s": 90_000.0, "peak_gib": 17.5, "step_ms": 180.0, "step_ms_all": [180.0, 182.0, 179.0],
             "step_detail": {"clocks": clocks}, "setting": "plan"}
    run = peers.run_record(spec, child, peers.model_flops_per_token(peers.LLAMA_32_1B, 2048))
    tokens = 8 * 2048
    # the step with no sample is left out; medians of two values are their mean
    assert run["power"]["mj_per_token"] == pytest.approx((600 * 180 + 610 * 182) / 2 / tokens, rel=1e-3)
    assert (run["power"]["sm_mhz"], run["power"]["power_w"], run["power"]["power_capped"]) == (1652, 605.0, 0.75)
    doc = peers.results_doc("T4", "NVIDIA H200", "2026-12-02", {}, [run], 1.0)
    assert "| ppalli | plan | 1652 | 605 | - | - | 75% | 6.68 |" in peers.markdown(doc)
    assert "Timing: ppalli 3 warm-up steps, then 8 timed." in peers.markdown(doc)
    # with the instant power logged, the energy comes from it (the 1 s average lags a step) and both are shown
    clocks.update(power_instant_w=[690.0, 700.0, None], temp_c=[60.0, 62.0, None])
    run = peers.run_record(spec, {**child, "warmup_steps": 57}, 1.0)
    assert run["power"]["mj_per_token"] == pytest.approx((690 * 180 + 700 * 182) / 2 / tokens, rel=1e-3)
    assert (run["power"]["power_instant_w"], run["power"]["temp_c"]) == (695.0, 61.0)
    md = peers.markdown({**doc, "runs": [run]})
    assert "| ppalli | plan | 1652 | 605 | 695 | 61 | 75% | 7.68 |" in md
    assert "ppalli 57 warm-up steps, then 8 timed" in md
    del child["step_detail"]
    bare = peers.run_record(spec, child, 1.0)
    assert "power" not in bare and "energy" not in peers.markdown({**doc, "runs": [bare]})


def test_warmup_seconds_need_warmup_batches_and_reach_the_runs():
    args = peers.parse_args(["--case", "T4", "--warmup", "5", "--warmup-s", "20", "--steps", "100"])
    assert {(s.warmup, s.warmup_s, s.steps) for s in peers.run_specs(args)} == {(5, 20.0, 100)}
    run = peers.run_record(peers.run_specs(args)[0], {"warmup_steps": 111}, 1.0)
    assert run["timing"] == {"warmup_steps": 111, "warmup_s": 20.0, "timed_steps": 100}
    assert "ppalli 111 warm-up steps, held to 20 s, then 100 timed" in peers.timing_line([run])
    for bad in (["--warmup", "0", "--warmup-s", "5"], ["--warmup-s", "-1"]):
        with pytest.raises(SystemExit):
            peers.parse_args(["--case", "T4", *bad])


def test_target_needs_both_runs():
    doc = _t1_doc()
    doc["runs"] = [r for r in doc["runs"] if r["stack"] != "unsloth"]
    assert "not read" in peers.target_line("T1", doc["runs"])
    assert peers.target_line("custom", doc["runs"]) is None


def test_write_results_and_append(tmp_path):
    doc = _t1_doc()
    json_path, md_path = peers.write_results(doc, tmp_path)
    assert json.loads(json_path.read_text())["runs"] == doc["runs"] and md_path.read_text().startswith("# T1")
    later = {**_t1_doc(), "device": "unknown", "runs": []}
    peers.set_device(later, {"device": doc["device"], "cuda": "13.0"}, tmp_path, append=True)
    assert later["runs"] == doc["runs"] and later["cuda"] == "13.0"


def test_the_results_name_the_commit_they_measure(monkeypatch):
    monkeypatch.setenv("PPALLI_COMMIT", "abc1234")
    assert peers.source_commit() == "abc1234"  # the device command's, over the checkout's git
    monkeypatch.delenv("PPALLI_COMMIT")
    here = peers.source_commit()
    assert here is None or len(here) >= 7  # this checkout's HEAD where git and .git are there
    answers = {"rev-parse": "abc1234", "status": " M ppalli/kernels/rope.py"}
    monkeypatch.setattr(peers, "_git", lambda *args: answers[args[0]])
    assert peers.source_commit() == "abc1234+changes"  # files that are not the commit's say so
    answers["status"] = ""
    assert peers.source_commit() == "abc1234"
    doc = _t1_doc()
    assert "ppalli at" not in peers.markdown(doc)
    doc["commit"] = "abc1234"
    assert "ppalli at abc1234." in peers.markdown(doc)


def _fake_tree(root: Path) -> Path:
    """A source tree whose _stacks.py answers with its own path and the payload's tokens/s."""
    script = root / "benchmarks" / "_stacks.py"
    script.parent.mkdir(parents=True)
    script.write_text("import json, sys\npayload = json.loads(sys.argv[1])\n"
                      "print('PEERS_RESULT ' + json.dumps({'tokens_per_s': 9.0, 'from': __file__, "
                      "'requested': payload['ppalli']['requested']}))\n", encoding="utf-8")
    return root


def test_baseline_runs_an_older_tree_beside_the_own_plan(tmp_path, monkeypatch):
    """--baseline adds one ppalli run from another source tree, in the same call; it is never the run the
    ratios are read against, and its subprocess is that tree's _stacks.py."""
    with pytest.raises(SystemExit):
        peers.parse_args(["--case", "T4", "--baseline", str(tmp_path)])  # no _stacks.py there
    tree = _fake_tree(tmp_path / "base")
    specs = peers.run_specs(peers.parse_args(["--case", "T4", "--stacks", "ppalli,unsloth", "--baseline", str(tree)]))
    assert [(s.stack, s.ppalli.get("requested", "auto"), bool(s.tree)) for s in specs] == [
        ("ppalli", "auto", False), ("ppalli", "baseline base", True), ("unsloth", "auto", False),
        ("unsloth", "auto", False)]
    base = specs[1]
    assert base.stacks_py() == tree.resolve() / "benchmarks" / "_stacks.py" and specs[0].stacks_py() == peers.STACKS_PY
    monkeypatch.setattr(peers, "SCRATCH", tmp_path)  # the subprocesses' working folder
    child = peers.run_child({"role": "run", **peers.asdict(base)}, tmp_path / "logs" / "base.log", dict(os.environ),
                            60, base.stacks_py())
    assert child["from"] == str(base.stacks_py()) and child["requested"] == "baseline base"
    runs = [peers.run_record(specs[0], {"tokens_per_s": 10.0, "setting": "plan: x"}, 1.0),
            peers.run_record(base, child | {"setting": "plan: x"}, 1.0)]
    assert runs[1]["setting"] == f"plan: x (source tree {tree.resolve()})" and runs[1]["tree"] == str(tree.resolve())
    assert peers.reference_ppalli(runs) is runs[0]
    md = peers.markdown(peers.results_doc("T4", "GPU", "2026-12-03", {}, runs, 1.0))
    assert "1.11x" in next(line for line in md.splitlines() if "source tree" in line)  # 10 / 9: new over baseline


# --------------------------------------------------------------------------- the environment


def test_peer_site_is_unpacked_once_and_put_first_on_the_path(tmp_path, monkeypatch):
    import tarfile

    from _peers_env import child_env, ensure_peer_site  # benchmarks/ is on sys.path once peers is loaded

    packed = tmp_path / "packed" / "peer-site"
    packed.mkdir(parents=True)
    (packed / "unsloth_stub.py").write_text("")
    tgz = tmp_path / "site.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(packed, arcname="peer-site")
    site = tmp_path / "unpacked" / "peer-site"
    site.parent.mkdir()
    assert ensure_peer_site(site, tmp_path / "missing.tgz") is None  # nothing to unpack
    assert ensure_peer_site(site, tgz) == site and (site / "unsloth_stub.py").is_file()
    assert ensure_peer_site(site, tmp_path / "missing.tgz") == site  # already there: not unpacked again
    monkeypatch.setenv("PYTHONPATH", "/earlier")
    env = child_env(site, tmp_path / "scratch")
    assert env["PYTHONPATH"] == os.pathsep.join([str(site), "/earlier"])
    assert env["HF_HUB_OFFLINE"] == "1" and env["UNSLOTH_COMPILE_LOCATION"].startswith(str(tmp_path / "scratch"))
    assert child_env(None, tmp_path)["PYTHONPATH"] == "/earlier"  # no site: the path as it was
