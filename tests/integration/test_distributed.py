"""Issue 7 on the CPU: 2 data-parallel ranks (gloo, launched by `ppalli train --nproc 2` through torchrun)
give the adapter of 1 process with twice the accumulation, with whole or FSDP2-sharded base weights."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_config

from ppalli import config as C
from ppalli.cli import main
from ppalli.train import recipe


def _cfg_dict(tmp_path, shared_data) -> dict:
    model_json = tmp_path / "config.json"
    model_json.write_text(json.dumps(tiny_config("llama")))
    return {"output_dir": str(tmp_path / "runs" / "{name}"),
            "model": {"name_or_path": str(model_json), "tokenizer": str(shared_data / "tokenizer_qwen2.5")},
            "lora": {"r": 8, "alpha": 16},
            "data": {"path": str(shared_data / "ko_chatbot_qa" / "ChatbotData.csv"), "limit": 16,
                     "columns": {"question": "Q", "answer": "A"}, "template": "chatml", "eval_split": 0,
                     "max_seq_len": 64, "num_proc": 1, "packing": "off", "cache_dir": str(tmp_path / "cache")},
            "train": {"max_steps": 3, "batch_size": 8, "micro_batch_size": 4, "lr": 5e-3, "warmup_steps": 1,
                      "seed": 7, "save_every": 2},
            "plan": {"device": "cpu", "fast_path": "off"},
            "logging": {"progress": "none", "sample_max_new_tokens": 2}}


@pytest.mark.parametrize("sharding", ["off", "fsdp"])
def test_two_gloo_ranks_equal_one_process_with_double_accumulation(tmp_path, shared_data, sharding):
    data = _cfg_dict(tmp_path, shared_data)
    single = recipe.train(C.from_dict(dict(data, name="single")), print_fn=lambda *a: None)

    path = tmp_path / "ddp.yaml"
    multi = dict(data, name="ddp", plan=dict(data["plan"], sharding=sharding))
    path.write_text(yaml.safe_dump(multi, allow_unicode=True))
    assert main(["train", str(path), "--nproc", "2"]) == 0
    ddp_dir = tmp_path / "runs" / "ddp"

    a = load_file(str(single.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(ddp_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # fp32 sums in another order, seen through AdamW (measured: max 1.8e-7 on values up to 0.13)
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    rows = [json.loads(x) for x in (ddp_dir / "metrics.jsonl").read_text().splitlines() if x]
    single_rows = [json.loads(x) for x in (single.run_dir / "metrics.jsonl").read_text().splitlines() if x]
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx([r["loss"] for r in single_rows if "loss" in r],
                                                                       rel=1e-5)
    # rank 0 alone wrote the run; its checkpoint resumes on any number of ranks
    assert (ddp_dir / "checkpoints" / "step-3").is_dir() and (ddp_dir / "report.md").is_file()
    plan = json.loads((ddp_dir / "plan.json").read_text())
    assert plan["sharding"] == sharding


@pytest.mark.parametrize("sharding", ["off", "fsdp"])
def test_a_one_process_checkpoint_resumes_on_two_ranks(tmp_path, shared_data, monkeypatch, sharding):
    """Checkpoints hold no per-rank state, so a run stopped on 1 process goes on with --nproc 2, exactly, with
    the base weights whole or sharded."""
    data = dict(_cfg_dict(tmp_path, shared_data), name="cut")
    data["train"] = dict(data["train"], max_steps=4, save_every=2)
    full = recipe.train(C.from_dict(dict(data, name="full")), print_fn=lambda *a: None)

    original = recipe.MetricsLog.write

    def stop_after_step_2(self, row):
        original(self, row)
        if row.get("step") == 2 and "loss" in row:
            raise KeyboardInterrupt

    monkeypatch.setattr(recipe.MetricsLog, "write", stop_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        recipe.train(C.from_dict(data), print_fn=lambda *a: None)
    monkeypatch.setattr(recipe.MetricsLog, "write", original)

    cut = tmp_path / "runs" / "cut"
    assert main(["train", "--resume", str(cut), "--nproc", "2", "--set", f"plan.sharding={sharding}"]) == 0
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3, 4]
    assert json.loads((cut / "plan.json").read_text())["sharding"] == sharding
