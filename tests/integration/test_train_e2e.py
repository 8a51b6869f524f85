"""Issue 2 acceptance on the CPU: loss falls, exact resume, plain-PEFT logits, accumulation invariance."""

import pytest
import torch
from safetensors.torch import load_file

from ppalli.train import recipe


def read_metrics(run_dir):
    import json

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if "loss" in r]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loss_falls_by_half_on_memorizable_subset(make_cfg, quiet, arch):
    cfg = make_cfg(arch, train__max_steps=60, train__lr=1e-2, lora__r=16)
    result = recipe.train(cfg, print_fn=quiet)
    losses = [r["loss"] for r in read_metrics(result.run_dir)]
    assert len(losses) == 60
    assert losses[-1] <= 0.5 * losses[0], f"{arch}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert (result.run_dir / "report.md").is_file() and (result.run_dir / "loss.png").stat().st_size > 0
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_resume_gives_the_same_losses_and_adapter(make_cfg, quiet, monkeypatch):
    full = recipe.train(make_cfg(name="full", train__max_steps=6, train__save_every=2), print_fn=quiet)

    cfg = make_cfg(name="cut", train__max_steps=6, train__save_every=2)
    original = recipe.MetricsLog.write

    def stop_after_step_3(self, row):
        original(self, row)
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run: the loop saves step 3 and leaves

    monkeypatch.setattr(recipe.MetricsLog, "write", stop_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        recipe.train(cfg, print_fn=quiet)
    monkeypatch.setattr(recipe.MetricsLog, "write", original)
    cut_dir = full.run_dir.parent / "cut"
    # step 3 is reported once step 4 is queued (loop.Readout), so 4 is the last finished step: its row is
    # written and its checkpoint saved before the loop leaves
    assert [r["step"] for r in read_metrics(cut_dir)] == [1, 2, 3, 4]
    assert (cut_dir / "checkpoints" / "step-4").is_dir()
    resumed = recipe.train(cfg, resume=cut_dir, print_fn=quiet)

    a = [r["loss"] for r in read_metrics(full.run_dir)]
    b = [r["loss"] for r in read_metrics(resumed.run_dir)]
    assert [r["step"] for r in read_metrics(resumed.run_dir)] == [1, 2, 3, 4, 5, 6]
    assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    wa = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    wb = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_saved_adapter_gives_same_logits_in_plain_peft(make_cfg, quiet):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ppalli.models.load import read_model_config

    cfg = make_cfg(train__max_steps=3)
    result = recipe.train(cfg, print_fn=quiet)
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    ours = result.model.eval()(input_ids=ids).logits

    torch.manual_seed(cfg.train.seed)  # random base weights are rebuilt from the run's seed
    base = AutoModelForCausalLM.from_config(read_model_config(cfg.model.name_or_path), dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_a_loaded_run_prompts_as_training_did_its_system_prompt_included(make_cfg, quiet, shared_data):
    """chat, generate and serve render prompts through load_run's render_prompt: the tokens before a trained row's
    answer, data.system_prompt in front (a conversation's own system turn kept instead)."""
    import csv

    from ppalli.data.masking import prompt_and_reference
    from ppalli.data.pipeline import prepare
    from ppalli.models.load import load_run

    system = "너는 친절한 한국어 상담원이야."
    cfg = make_cfg(name="system", train__max_steps=1, data__system_prompt=system, data__limit=2)
    run = load_run(recipe.train(cfg, print_fn=quiet).run_dir)
    with (shared_data / "ko_chatbot_qa" / "ChatbotData.csv").open(encoding="utf-8") as f:
        question = next(csv.DictReader(f))["Q"]
    trained = prepare(cfg.data, run.tokenizer, seed=cfg.train.seed).train
    prompts = [prompt_and_reference(s)[0] for s in trained]
    asked = run.tokenizer(run.render_prompt([{"role": "user", "content": question}]), add_special_tokens=False)
    assert asked["input_ids"] in prompts and system in run.render_prompt([{"role": "user", "content": question}])
    own = run.render_prompt([{"role": "system", "content": "짧게 답해."}, {"role": "user", "content": question}])
    assert "짧게 답해." in own and system not in own


@pytest.mark.parametrize("packing", ["off", "on"])
def test_micro_batch_split_gives_the_same_update(make_cfg, quiet, packing):
    """1 x 8 and 8 x 1 over rows of unequal length: the loss is normalized over the whole step's tokens."""
    one = recipe.train(make_cfg(name="m1", train__max_steps=2, train__micro_batch_size=1,
                                data__packing=packing), print_fn=quiet)
    eight = recipe.train(make_cfg(name="m8", train__max_steps=2, train__micro_batch_size=8,
                                  data__packing=packing), print_fn=quiet)
    wa = load_file(str(one.adapter_dir / "adapter_model.safetensors"))
    wb = load_file(str(eight.adapter_dir / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)  # fp32 sums in another order
    la = [r["loss"] for r in read_metrics(one.run_dir)]
    lb = [r["loss"] for r in read_metrics(eight.run_dir)]
    assert la == pytest.approx(lb, rel=1e-5)


def test_injected_oom_steps_down_to_the_same_adapter(make_cfg, quiet, monkeypatch):
    """Issue 4: an OOM at micro-batch 8 redoes the step at 4 x 2; the adapter equals a run planned at 4 x 2."""
    from ppalli.train import objectives

    planned = recipe.train(make_cfg(name="planned4", train__max_steps=3, train__micro_batch_size=4,
                                    data__packing="off"), print_fn=quiet)

    real = objectives.reference_lm_loss

    def oom_at_eight(model, batch):
        if batch["n_samples"] == 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(model, batch)

    monkeypatch.setattr(recipe, "_reference_loss", lambda: oom_at_eight)
    stepped = recipe.train(make_cfg(name="oom8", train__max_steps=3, data__packing="off"), print_fn=quiet)
    report = (stepped.run_dir / "report.md").read_text()
    assert "out of memory at micro-batch 8" in report
    assert [r["micro_batch_size"] for r in read_metrics(stepped.run_dir)] == [4, 4, 4]
    wa = load_file(str(planned.adapter_dir / "adapter_model.safetensors"))
    wb = load_file(str(stepped.adapter_dir / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["selective", "full", "offload"])
def test_every_recompute_mode_trains_to_the_same_adapter(make_cfg, quiet, mode):
    """`ppalli train` with each plan.checkpointing (reference path, 2 decoder layers): the recompute wrappers
    sit on the recipe's model, and the losses and adapter equal a run without recompute."""
    base = recipe.train(make_cfg(name="none", train__max_steps=3, plan__checkpointing="none"), print_fn=quiet)
    run = recipe.train(make_cfg(name=mode, train__max_steps=3, plan__checkpointing=mode), print_fn=quiet)
    plan = (run.run_dir / "plan.json").read_text()
    assert f'"checkpointing": "{mode}"' in plan
    assert [r["loss"] for r in read_metrics(run.run_dir)] == pytest.approx(
        [r["loss"] for r in read_metrics(base.run_dir)], rel=1e-6)
    wa = load_file(str(base.adapter_dir / "adapter_model.safetensors"))
    wb = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-8)


def test_compiled_layers_with_recompute_train_like_eager(make_cfg, quiet):
    """plan.compile=on (each decoder layer torch.compile'd) under full recompute gives the eager losses."""
    base = recipe.train(make_cfg(name="eager", train__max_steps=3), print_fn=quiet)
    comp = recipe.train(make_cfg(name="compiled", train__max_steps=3, plan__compile="on",
                                 plan__checkpointing="full"), print_fn=quiet)
    assert '"compile": true' in (comp.run_dir / "plan.json").read_text()
    assert [r["loss"] for r in read_metrics(comp.run_dir)] == pytest.approx(
        [r["loss"] for r in read_metrics(base.run_dir)], rel=1e-5)


def test_deterministic_runs_repeat_bit_for_bit_and_leave_the_mode_off(make_cfg, quiet):
    """plan.deterministic=true: torch's mode is on for the run only, and two runs give equal losses and adapters
    (on the CPU they would anyway; tests/gpu/test_deterministic_gpu.py covers the kernels that differ on CUDA)."""
    runs = [recipe.train(make_cfg(name=f"det{i}", train__max_steps=3, plan__deterministic=True), print_fn=quiet)
            for i in range(2)]
    assert not torch.are_deterministic_algorithms_enabled()
    assert '"deterministic": true' in (runs[0].run_dir / "plan.json").read_text()
    assert [r["loss"] for r in read_metrics(runs[0].run_dir)] == [r["loss"] for r in read_metrics(runs[1].run_dir)]
    wa, wb = (load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in runs)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
