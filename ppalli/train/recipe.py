"""`ppalli train`, top to bottom: config -> env -> plan -> model -> data -> loop -> run directory.

Each stage gets plain values from the one before (DESIGN.md, "The flow"); this file is the only place
that reads the config tree and hands its values out.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from ppalli import config as C
from ppalli.data.collate import longest_sequence, most_tokens
from ppalli.errors import ConfigError, PpalliError
from ppalli.train import checkpoint as ckpt
from ppalli.train import distributed as dist
from ppalli.train.loop import Hooks, LoopSettings, LoopState, evaluate, total_steps, train_loop
from ppalli.train.metrics import MetricsLog
from ppalli.train.progress import Progress

log = logging.getLogger("ppalli")


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    report: Path
    sample: dict | None
    final_loss: float
    eval_loss: float | None
    model: object = None  # the trained PeftModel (fast path reverted), for callers that go on using it
    plan: object = None  # the plan the last step ran (after any out-of-memory step-down)
    events: list[str] = field(default_factory=list)  # OOM step-downs and interruptions, as the report lists them


# --------------------------------------------------------------------------- setup stages


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_demo(cfg: C.Config, cache_dir: Path) -> C.Config:
    """'demo' model or data -> the embedded tiny model and self-written data, with the demo's own settings."""
    if cfg.model.name_or_path != "demo" and cfg.data.path != "demo":
        return cfg
    from ppalli.demo.model import DEMO_TRAIN, prepare_demo

    demo = prepare_demo(cache_dir)
    model, data, train = cfg.model, cfg.data, cfg.train
    if cfg.model.name_or_path == "demo":
        model = replace(model, name_or_path=str(demo["model_dir"]), tokenizer=str(demo["tokenizer_dir"]))
        defaults = C.TrainConfig()
        # the demo's measured settings, unless the user changed them
        train = replace(train, **{k: v for k, v in DEMO_TRAIN.items() if getattr(train, k) == getattr(defaults, k)})
        data = replace(data, template="chatml" if data.template == "auto" else data.template)
        # the demo shows what it memorized: sample answers to training questions
        cfg = replace(cfg, logging=replace(cfg.logging, sample_source="train"))
    if cfg.data.path == "demo" and not cfg.data.sources:
        data = replace(data, path=str(demo["data_path"]))
    return replace(cfg, model=model, data=data, train=train)


def make_run_dir(cfg: C.Config) -> Path:
    name = cfg.name or f"{Path(cfg.model.name_or_path.rstrip('/')).name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.output_dir.format(name=name))
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(f"{run_dir} already holds checkpoints: add --resume to continue it, or set "
                          f"another name (--set name=...)")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def device_and_dtype(plan) -> tuple[torch.device, torch.dtype]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[plan.precision]
    return torch.device(plan.device), dtype


def _cap_gpu_memory(budget_gib: float | None, device: torch.device, print_fn) -> None:
    """Hold the run to plan.memory_budget_gib (the plan fits it; the cap makes a GPU shared with others safe)."""
    if budget_gib is None or device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, budget_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    print_fn(f"memory cap: {budget_gib:g} GiB ({fraction:.1%} of {total / 2**30:.1f} GiB), "
             "torch.cuda.set_per_process_memory_fraction")


def data_shape(samples: list[dict], batch_size: int) -> dict:
    """What the planner reads from the data (make_plan's keywords): its longest sequence, which bounds a padded
    row, and the most tokens `batch_size` of its samples hold, which bounds a packed pass."""
    return {"longest_row": longest_sequence(samples), "step_tokens": most_tokens(samples, batch_size)}


def build_plan(cfg: C.Config, model_config, env, world_size: int = 1, samples: list[dict] | None = None):
    """The plan for one rank: with N data-parallel ranks each holds batch_size / N samples of every step.
    samples: the data, when it has been read: its lengths size the rows (data_shape)."""
    import dataclasses

    from ppalli.plan.memory import ModelSpec
    from ppalli.plan.planner import make_plan

    t = cfg.train
    if world_size > 1:
        if t.batch_size % world_size:
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of the {world_size} "
                              f"processes (--nproc), so every rank holds the same share of each step")
        share = t.batch_size // world_size
        micro = min(t.micro_batch_size, share) if t.micro_batch_size else None
        cfg = replace(cfg, train=replace(t, batch_size=share, micro_batch_size=micro))
    shape = data_shape(samples, cfg.train.batch_size) if samples is not None else {}
    plan = make_plan(env, cfg, ModelSpec.from_config(model_config), world_size=world_size, **shape)
    if world_size > 1:
        why = (f"{world_size} data-parallel ranks: each runs {cfg.train.batch_size} of the {t.batch_size} samples "
               f"of a step; adapter gradients are summed across ranks")
        plan = dataclasses.replace(plan, reasons={**plan.reasons, "world": why})
    return plan


def use_expandable_segments(device: torch.device) -> bool:
    """Let PyTorch's CUDA allocator grow segments in place instead of caching fixed-size blocks, unless the
    user set PYTORCH_CUDA_ALLOC_CONF: the memory reserved stays at what is allocated, which is what a budget
    or a cap counts. Llama-3.1-8B 4x2048 under a 24 GiB cap on an H100 (2026-11-25): reserved above
    allocated went from 0.40 GiB (selective) and 1.90 GiB (offload) to 0.02 GiB (benchmarks/results/
    *-t2-run2-settings.json against *-t2-micro2.json). Applies to segments allocated from now on."""
    if device.type != "cuda" or "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return False
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9; older: torch.cuda.memory
    if setter is None:
        setter = torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")
    return True


@contextlib.contextmanager
def frozen_gc():
    """Move every object alive now (the model's modules and parameters, the tokenizer, the data) out of
    Python's garbage collector's sight for the training loop, then back. A full collection scans them all:
    ~512,000 objects for a 32-layer LoRA model, 194 ms on this project's 2-core CPU machine, 0.0 ms once
    frozen (2026-11-25, a tiny 32-layer Llama: the count follows the layer count, not the width). Such a
    collection stalls whichever step it falls in; it is the suspected cause of the one step in eight that ran
    250 ms slower in the 8B runs on the H100 (benchmarks/results/*-t2-micro2.json), not yet re-measured."""
    gc.collect()
    gc.freeze()
    log.info("gc: %d objects set aside from collection for the loop", gc.get_freeze_count())
    try:
        yield
    finally:
        gc.unfreeze()


def build_model(cfg: C.Config, plan, device, dtype, load_device=None):
    """Base model (on `load_device`, default `device`) with a fresh LoRA adapter."""
    from ppalli.models.load import attach_lora, load_model

    use_expandable_segments(device)
    model = load_model(cfg.model.name_or_path, dtype=dtype, device=load_device or device, revision=cfg.model.revision,
                       trust_remote_code=cfg.model.trust_remote_code, attn_implementation=_hf_attention(plan),
                       quantization=plan.quantization, double_quant=cfg.plan.double_quant, seed=cfg.train.seed,
                       memory_budget_gib=cfg.plan.memory_budget_gib)
    lc = cfg.lora
    return attach_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=lc.targets,
                       use_dora=lc.use_dora, use_rslora=lc.use_rslora, seed=cfg.train.seed)


def _model(cfg: C.Config, plan, device, dtype, print_fn, load_device=None):
    """(model with its adapter, LM loss, fast-path handle or None), recompute and compile applied."""
    from ppalli.train.recompute import apply_recompute

    model = build_model(cfg, plan, device, dtype, load_device=load_device)
    lm_loss, fast_handle = build_loss(model, plan, print_fn)
    apply_recompute(model, plan.checkpointing, plan.recompute_layers)
    if plan.compile:
        _compile_layers(model, print_fn)
    return model, lm_loss, fast_handle


def _sharded_model(cfg: C.Config, plan, device, dtype, world, print_fn):
    """_model with the base weights spread over the ranks (plan.sharding=fsdp). A rank reads the whole 16-bit
    model into CPU memory, keeps its shard on the GPU and drops the rest; the ranks take turns, so the host
    holds one whole copy at a time: Llama-3.1-70B's 131 GiB twice over would not fit a 2 x H200 host's 256."""
    from ppalli.train.recompute import decoder_layers

    mesh = dist.fsdp_mesh(world, device)
    for turn in range(world.size):
        if turn == world.rank:
            built = _model(cfg, plan, device, dtype, print_fn, load_device=torch.device("cpu"))
            dist.shard_base_weights(built[0], decoder_layers(built[0]), mesh, device)
            gc.collect()  # the CPU copies go before the next rank reads its own
        dist.barrier(world)
    print_fn(f"FSDP2: base weights sharded over {world.size} ranks (read one rank at a time); the adapter whole "
             "on each")
    return built


def _hf_attention(plan) -> str:
    return plan.attention if plan.attention in ("sdpa", "eager", "flash_attention_2", "flash_attention_3",
                                                "flex_attention") else "sdpa"


def _reference_loss():
    from ppalli.train.objectives import reference_lm_loss

    return reference_lm_loss


def build_loss(model, plan, tokenizer_log):
    """The LM loss function: the fused fast path where the plan says so, else the reference."""
    if not plan.fast_path:
        return _reference_loss(), None
    from ppalli.models.fast import apply_fast_path
    from ppalli.models.fast_loss import fast_causal_lm_loss

    handle = apply_fast_path(model, attention_backend=plan.attention, log=tokenizer_log, fp8=plan.fp8)

    def fast_lm_loss(m, batch):
        return fast_causal_lm_loss(m, batch["input_ids"], batch["labels"], position_ids=batch.get("position_ids"),
                                   cu_seqlens=batch.get("cu_seqlens"), max_seqlen=batch.get("max_seqlen"),
                                   attention_mask=batch.get("attention_mask"), loss_rows=batch.get("loss_rows"))

    return fast_lm_loss, handle


def _compile_layers(model, print_fn) -> None:
    """Regional compile: each decoder layer on its own (one compiled graph reused by every layer, minutes not
    tens of minutes), per instance like every other swap; dynamic shapes because packed batches vary."""
    from ppalli.train.recompute import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    print_fn(f"compile: torch.compile on each of {len(layers)} decoder layers (dynamic shapes)")


def make_collate(tokenizer, device, objective: str):
    from ppalli.data.collate import pack_collate, pad_collate, preference_collate, preference_pack_collate, right_padded
    from ppalli.train.objectives import loss_rows

    pad_id = tokenizer.pad_token_id

    def collate(samples: list[dict], packed: bool) -> dict:
        if objective != "sft":
            batch = preference_pack_collate(samples) if packed else preference_collate(samples, pad_id)
        elif packed:
            batch = pack_collate(samples)
        else:
            batch = pad_collate(samples, pad_id)
        counts = _host_counts(batch)  # before the copy: counting on the device would sync
        if "attention_mask" in batch and right_padded(batch["attention_mask"]):
            # Causal attention keeps real tokens off right padding, so the mask changes no loss; given one, HF's
            # mask builder and the fast path's check would each read it on the device: a sync every forward.
            del batch["attention_mask"]
        if objective == "sft" and (rows := loss_rows(batch["labels"])) is not None:
            batch["loss_rows"] = rows  # the fast path's lm_head skips the rest (objectives.loss_rows)
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k != "cu_seqlens_cpu" else v
                 for k, v in batch.items()}
        batch.update(counts)
        batch["n_samples"] = len(samples)
        return batch

    return collate


def _host_counts(batch: dict) -> dict:
    """A host batch's counts the loop needs each step: tokens without padding, and tokens that carry a loss."""
    from ppalli.train.loop import real_tokens
    from ppalli.train.objectives import trained_tokens

    counts = {"real_tokens": real_tokens(batch)}
    if "labels" in batch:
        counts["trained_tokens"] = trained_tokens(batch["labels"])
    return counts


# --------------------------------------------------------------------------- samples before / after


def sample_prompts(cfg: C.Config, template, tokenizer, samples: list[dict], n: int = 3) -> list[dict]:
    """Prompts for the report's before/after answers: the config's, else the prompt part of the first samples.

    A sample's prompt is its tokens before the first trained label: exactly what training conditioned on.
    """
    from ppalli.data.masking import prompt_and_reference
    from ppalli.data.templates import prompt_text, render_prompt
    from ppalli.data.tokenize import with_system

    if cfg.logging.sample_prompts:
        out = []
        for p in cfg.logging.sample_prompts:
            text = render_prompt(template, with_system([{"role": "user", "content": p}], cfg.data.system_prompt))
            out.append({"prompt": p, "ids": tokenizer(text, add_special_tokens=False)["input_ids"]})
        return out
    out = []
    for s in samples[:n]:
        if "labels" not in s:
            continue
        split = prompt_and_reference(s)
        ids = split[0] if split else s["input_ids"]
        out.append({"prompt": prompt_text(tokenizer, ids), "ids": ids})
    return out


def answer_samples(model, tokenizer, prompts: list[dict], stop_ids: list[int], max_new_tokens: int) -> list[dict]:
    """Greedy answers (labelled so in the report): before/after comparisons should not depend on sampling luck."""
    from ppalli.infer.generate import generate

    out = []
    for p in prompts:
        ids = torch.tensor([p["ids"]], device=model.device)
        new = generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, greedy=True, stop_ids=stop_ids)
        out.append({"prompt": p["prompt"], "output": tokenizer.decode(new, skip_special_tokens=True).strip()})
    return out


# --------------------------------------------------------------------------- the run


def train(cfg: C.Config, *, resume: Path | None = None, print_fn=print, cache_dir: Path | None = None) -> RunResult:
    from ppalli.env import probe
    from ppalli.models.load import read_model_config
    from ppalli.train.determinism import deterministic

    world = dist.init_from_env(cpu=cfg.plan.device == "cpu")
    if not world.main:
        print_fn = _silent  # the console and the run directory belong to rank 0
    cache_dir = cache_dir or Path.home() / ".cache" / "ppalli"
    run_dir = Path(dist.broadcast_text(str(resume or (make_run_dir(cfg) if world.main else "")), world))
    cfg = resolve_demo(cfg, cache_dir / "demo")
    write = _writer(run_dir, world)
    write("config.yaml", yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False))

    # 1. environment, data and plan, before any weight is loaded (the data's lengths size the plan's passes)
    env = probe()
    write("env.json", json.dumps(env.to_dict(), indent=1))
    model_config = read_model_config(cfg.model.name_or_path, revision=cfg.model.revision,
                                     trust_remote_code=cfg.model.trust_remote_code)
    tokenizer, prepared = load_data(cfg, world)
    plan = build_plan(cfg, model_config, env, world.size, samples=prepared.train + prepared.eval)
    for line in plan.explain():
        print_fn(line)
    _cap_gpu_memory(cfg.plan.memory_budget_gib, device_and_dtype(plan)[0], print_fn)
    with deterministic(plan.deterministic):  # torch's global mode, restored when the run ends or fails
        return _train_planned(cfg, plan, resume, print_fn, world, run_dir, write, tokenizer, prepared)


def load_data(cfg: C.Config, world):
    """(tokenizer, prepared data): rank 0 tokenizes and fills the cache, the others then read it."""
    from ppalli.data.pipeline import prepare
    from ppalli.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, revision=cfg.model.revision,
                               trust_remote_code=cfg.model.trust_remote_code)
    if not world.main:
        dist.barrier(world)
    prepared = prepare(cfg.data, tokenizer, seed=cfg.train.seed, objective=cfg.train.objective)
    if world.main:
        dist.barrier(world)
    return tokenizer, prepared


def _train_planned(cfg: C.Config, plan, resume: Path | None, print_fn, world, run_dir: Path, write, tokenizer,
                   prepared) -> RunResult:
    """train() from its plan on: model, loop, run directory."""
    from ppalli.data.templates import resolve_template, stop_token_ids
    from ppalli.train.objectives import make_objective
    from ppalli.train.optim import make_optimizer
    from ppalli.train.schedule import make_scheduler, warmup_steps

    device, dtype = device_and_dtype(plan)

    # 2. template and seeds
    seed_everything(cfg.train.seed)
    template = resolve_template(cfg.data.template, tokenizer)
    stop_ids = stop_token_ids(template, tokenizer)

    # 3. model, adapter, fast path, recompute
    sharded = plan.sharding == "fsdp"
    model, lm_loss, fast_handle = (_sharded_model(cfg, plan, device, dtype, world, print_fn) if sharded
                                   else _model(cfg, plan, device, dtype, print_fn))
    objective = make_objective(cfg.train.objective, beta=cfg.train.beta, gamma=cfg.train.simpo_gamma,
                               lm_loss=lm_loss)

    # 4. optimizer, schedule, state (fresh or resumed)
    t = cfg.train
    steps = total_steps(len(prepared.train), t.batch_size, t.epochs, t.max_steps)
    optimizer = make_optimizer(model.parameters(), name=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                               betas=tuple(t.betas), device=device)
    scheduler = make_scheduler(optimizer, total=steps,
                               warmup=warmup_steps(steps, ratio=t.warmup_ratio, steps=t.warmup_steps),
                               kind=t.schedule)
    state = LoopState()
    ckpt_root = run_dir / "checkpoints"
    if resume is not None:
        state.step, extra = _resume(ckpt_root, model, optimizer, scheduler, print_fn)
        state.events = extra.get("events", [])
    pool = prepared.train if cfg.logging.sample_source == "train" or not prepared.eval else prepared.eval
    prompts = sample_prompts(cfg, template, tokenizer, pool)
    n_new = cfg.logging.sample_max_new_tokens
    if sharded:  # one rank cannot run a sharded model alone (every layer gathers from all ranks)
        prompts = []
    if not world.main:
        samples_before = []
    elif resume is None:
        samples_before = answer_samples(model, tokenizer, prompts, stop_ids, n_new)
    else:
        samples_before = _load_json(run_dir / "samples_before.json")
    write("samples_before.json", json.dumps(samples_before, ensure_ascii=False))
    write("plan.json", json.dumps(plan.to_dict(), indent=1, ensure_ascii=False))

    # 5. the loop
    metrics = MetricsLog(run_dir, resume_step=state.step if resume is not None else None,
                         tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                         wandb_project=cfg.logging.wandb_project, config=cfg.to_dict()) if world.main else _NullLog()
    progress = Progress(steps, state.step, cfg.logging.progress if world.main else "none", print_fn)
    scaler = torch.amp.GradScaler("cuda") if plan.precision == "fp16" and device.type == "cuda" else None
    settings = LoopSettings(total_steps=steps, batch_size=t.batch_size, max_grad_norm=t.max_grad_norm,
                            eval_every=t.eval_every, save_every=t.save_every, log_every=t.log_every,
                            seed=t.seed, max_seq_len=cfg.data.max_seq_len, scaler=scaler, world=world, device=device,
                            sequences=1 if t.objective == "sft" else 2)
    current = {"plan": plan}
    hooks = _hooks(model, optimizer, scheduler, tokenizer, device, cfg, ckpt_root, metrics, progress, current, world)
    t0 = time.perf_counter()
    try:
        with frozen_gc():
            plan = train_loop(model, optimizer, scheduler, objective, prepared.train, prepared.eval, plan,
                              settings, state, hooks)
    finally:
        progress.close()
    train_seconds = time.perf_counter() - t0

    # 6. final eval, adapter, samples, report
    final_eval = evaluate(model, objective, prepared.eval, plan, hooks.collate, settings) if prepared.eval else None
    eval_loss = final_eval["loss"] if final_eval else None
    if final_eval is not None:
        metrics.write({"step": state.step, **_eval_row(final_eval)})
    metrics.close()
    if fast_handle is not None:
        fast_handle.revert()  # the saved adapter and the samples go through the plain PEFT model
    adapter_dir = run_dir / "adapter"
    if cfg.train.save_every == 0 or state.step % cfg.train.save_every:
        hooks.save(state)
    if not world.main:
        dist.finish(world)
        return RunResult(run_dir, adapter_dir, run_dir / "report.md", None, float("nan"), eval_loss, model, plan,
                         state.events)
    model.save_pretrained(adapter_dir, safe_serialization=True)
    tokenizer.save_pretrained(run_dir / "tokenizer")
    samples_after = answer_samples(model, tokenizer, prompts, stop_ids, n_new)
    (run_dir / "samples.json").write_text(json.dumps({"before": samples_before, "after": samples_after},
                                                     ensure_ascii=False, indent=1), encoding="utf-8")
    report = _write_report(run_dir, cfg, plan, state, steps, train_seconds, eval_loss, samples_before,
                           samples_after, prepared)
    dist.finish(world)
    return RunResult(run_dir, adapter_dir, report, samples_after[0] if samples_after else None,
                     _last_loss(run_dir), eval_loss, model, plan, state.events)


def _silent(*args, **kwargs) -> None:
    return None


class _NullLog:
    """The metrics log of ranks other than 0."""

    def write(self, row: dict) -> None:
        return None

    def close(self) -> None:
        return None


def _writer(run_dir: Path, world):
    def write(name: str, text: str) -> None:
        if world.main:
            (run_dir / name).write_text(text, encoding="utf-8")

    return write


def _eval_row(result: dict) -> dict:
    """evaluate's result as metrics.jsonl keys: eval_loss, eval_reward_margin, eval_reward_accuracy."""
    return {f"eval_{k}": v for k, v in result.items()}


def _hooks(model, optimizer, scheduler, tokenizer, device, cfg, ckpt_root, metrics, progress, current,
           world) -> Hooks:
    from ppalli.train.recompute import apply_recompute

    def on_step(state, out):
        if state.step % cfg.train.log_every and state.step != 1:
            return
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        row = {"step": state.step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
               "tokens_per_s": out["tokens"] / out["seconds"], "s_per_it": out["seconds"],
               "trained_tokens": out["norm"], "peak_gib": round(peak, 3), "micro_batch_size": out["micro_batch_size"],
               "passes": out["passes"]}
        row.update({k: out[k] for k in ("reward_margin", "reward_accuracy") if k in out})  # preference pairs
        metrics.write(row)
        progress.update(row)

    def on_eval(state, result):
        metrics.write({"step": state.step, **_eval_row(result)})
        progress.message(f"step {state.step}: eval loss {result['loss']:.4f}")

    def save(state):
        # every rank holds the same adapter and optimizer state (gradients are summed), so rank 0's checkpoint
        # resumes on any number of ranks
        if world.main:
            ckpt.save_checkpoint(ckpt_root, state.step, model=model, optimizer=optimizer, scheduler=scheduler,
                                 extra={"events": state.events, "plan": current["plan"].to_dict()},
                                 keep=cfg.train.save_total_limit)
        dist.barrier(world)

    def replan(plan):
        if (plan.checkpointing, plan.recompute_layers) != (current["plan"].checkpointing,
                                                           current["plan"].recompute_layers):
            apply_recompute(model, plan.checkpointing, plan.recompute_layers)
        current["plan"] = plan
        progress.message(f"out of memory: stepped down to micro-batch {plan.micro_batch_size}, "
                         f"checkpointing {plan.checkpointing}")

    return Hooks(collate=make_collate(tokenizer, device, cfg.train.objective), on_step=on_step, on_eval=on_eval,
                 save=save, replan=replan)


def _resume(ckpt_root: Path, model, optimizer, scheduler, print_fn) -> tuple[int, dict]:
    found = ckpt.list_checkpoints(ckpt_root)
    if not found:
        raise PpalliError(f"--resume: no complete checkpoint in {ckpt_root}; start the run without --resume")
    step, extra = ckpt.load_checkpoint(found[-1], model=model, optimizer=optimizer, scheduler=scheduler)
    print_fn(f"resumed from {found[-1]} (step {step})")
    return step, extra


def _load_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def _last_loss(run_dir: Path) -> float:
    from ppalli.report import read_metrics

    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    return losses[-1] if losses else float("nan")


def _write_report(run_dir, cfg, plan, state, steps, seconds, eval_loss, before, after, prepared) -> Path:
    from ppalli.report import write_report

    summary = {"model": cfg.model.name_or_path, "data": cfg.data.path, "steps": state.step,
               "time_s": seconds, "final_eval_loss": eval_loss, "train_samples": len(prepared.train),
               "eval_samples": len(prepared.eval), "truncated": prepared.stats.get("truncated"),
               "template": prepared.template}
    return write_report(run_dir, plan_lines=plan.explain(), summary=summary, samples_before=before,
                        samples_after=after, events=state.events)
