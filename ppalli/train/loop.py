"""The training loop: deterministic data order, exact accumulation, OOM step-down, hooks for the rest.

One optimizer step takes `batch_size` samples (the effective batch, fixed by the config), splits them
into micro-batches of the plan's size, and scales every micro-batch's loss sum by the normalizer of the
WHOLE step (trained tokens for SFT, pairs for ORPO/DPO). So 1 x 8 and 8 x 1 give the same update, and a
step redone after an out-of-memory error on a smaller micro-batch gives the same update too.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ppalli.data.collate import sample_len
from ppalli.errors import OutOfMemory
from ppalli.train.distributed import World, shard, sum_across, sum_gradients
from ppalli.train.objectives import PAIR_STATS, pair_metrics
from ppalli.train.oom import explain_cuda_error, is_oom, step_down


@dataclass
class LoopSettings:
    total_steps: int
    batch_size: int  # samples per optimizer step, kept by every plan
    max_grad_norm: float
    eval_every: int
    save_every: int
    log_every: int
    seed: int
    max_seq_len: int | None = None  # with packing, a micro-batch holds up to micro_batch_size * max_seq_len tokens
    sequences: int = 1  # sequences a sample holds (2 for a preference pair): packed budgets scale by it
    scaler: torch.amp.GradScaler | None = None  # fp16 only: loss scaling keeps small gradients representable
    world: World = field(default_factory=World)  # data-parallel ranks (torchrun); a world of one by default
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    events: list[str] = field(default_factory=list)


@dataclass
class Hooks:
    """What the recipe plugs in; the loop itself never touches files or the console."""

    collate: Callable[[list[dict], bool], dict]  # (samples, packed) -> batch on the device
    on_step: Callable[[LoopState, dict], None] = lambda state, m: None
    on_eval: Callable[[LoopState, dict], None] = lambda state, result: None  # evaluate's {"loss", ...}
    save: Callable[[LoopState], None] = lambda state: None
    replan: Callable[[object], None] = lambda plan: None  # apply a stepped-down plan to the model


def step_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Sample indices of optimizer step `step`: epochs of seeded permutations laid end to end.

    A pure function of (step, seed), so a resumed run reads exactly the samples it would have read.
    """
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        out.append(int(_permutation(n, seed + epoch)[i]))
    return out


_PERM_CACHE: dict[tuple[int, int], torch.Tensor] = {}


def _permutation(n: int, seed: int) -> torch.Tensor:
    key = (n, seed)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 4:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _PERM_CACHE[key]


def total_steps(n_samples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    if max_steps:
        return max_steps
    return max(1, math.ceil(n_samples * epochs / batch_size))


def micro_batches(samples: Sequence[dict], micro: int, token_budget: int | None = None) -> list[list[dict]]:
    """Split a step's samples: `micro` samples each, or, for packed batches, as many samples as fit
    `token_budget` tokens (the plan sized memory for micro * max_seq_len tokens; short rows like chat Q/A
    then share one pass instead of running many tiny ones: 8B QLoRA on ko_chatbot_qa, H200, 2026-11-25:
    16 samples of ~35 tokens in 8 passes of 2 ran at 215 tokens/s)."""
    if not token_budget:
        return [list(samples[i:i + micro]) for i in range(0, len(samples), micro)]
    groups, current, used = [], [], 0
    for s in samples:
        n = sample_len(s)
        if current and used + n > token_budget:
            groups.append(current)
            current, used = [], 0
        current.append(s)
        used += n
    if current:
        groups.append(current)
    return groups


def _split(samples, plan, settings) -> list[list[dict]]:
    budget = None
    if plan.packing and settings.max_seq_len:  # the tokens the plan sized a pass for (planner._estimate)
        budget = plan.micro_batch_size * settings.max_seq_len * settings.sequences
        budget = min(budget, plan.pass_tokens or budget)  # evaluation's passes too: none above a training step
    return micro_batches(samples, plan.micro_batch_size, budget)


def real_tokens(batch: dict) -> int:
    """Tokens the batch holds, padding not counted (tokens/s of padded preference batches counted it before).
    Collate counts them on the host (batch["real_tokens"]); counting a device mask here would sync."""
    if "real_tokens" in batch:
        return int(batch["real_tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def accumulate(model, objective, samples: list[dict], plan, settings: LoopSettings, collate) -> dict:
    """Forward and backward over this rank's micro-batches of one step; returns the step's loss and counts.

    The normalizer is the whole step's (all ranks), so summing the ranks' gradients gives the exact update.
    The loss and the preference sums stay on the device (no sync): train_loop reads them a step later.
    """
    scaler, world = settings.scaler, settings.world
    batches = [collate(mb, plan.packing) for mb in _split(shard(samples, world), plan, settings)]
    norm = sum_across(sum(objective.normalizer(b) for b in batches), world, settings.device)
    loss_total, tokens, stats = 0.0, 0, {}
    for batch in batches:
        loss_sum, info = objective(model, batch)
        loss = loss_sum / max(norm, 1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_total = loss_total + loss_sum.detach()
        tokens += real_tokens(batch)
        _add(stats, info)
    sum_gradients(model, world)
    if world.active:  # ranks sum floats: a sync, next to the step's all-reduce of the gradients anyway
        loss_total = sum_across(float(loss_total), world, settings.device)
        stats = {k: sum_across(float(v), world, settings.device) for k, v in stats.items()}
    tokens = int(sum_across(tokens, world, settings.device))
    return {"loss": loss_total / max(norm, 1), "norm": int(norm), "tokens": tokens, **pair_metrics(stats)}


def _add(stats: dict, info: dict) -> None:
    """Sum a micro-batch's preference counts (an objective's info, PAIR_STATS) into the step's."""
    for key in PAIR_STATS:
        if key in info:
            stats[key] = stats.get(key, 0) + info[key]


def run_step(model, optimizer, scheduler, objective, samples, plan, settings, state, hooks):
    """One optimizer step, redone on the next plan down after an out-of-memory error."""
    while True:
        try:
            out = accumulate(model, objective, samples, plan, settings, hooks.collate)
            break
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not is_oom(e) or settings.world.active:
                raise  # ranks cannot step down alone: the others would wait in a collective forever
            optimizer.zero_grad(set_to_none=True)  # undo the half-done step: nothing was applied yet
            _free_cuda()
            lower = step_down(plan)
            if lower is None:
                raise OutOfMemory(explain_cuda_error(e) + " (no smaller plan left: lower data.max_seq_len "
                                  "or use plan.quantization=nf4)") from None
            msg = (f"step {state.step + 1}: out of memory at micro-batch {plan.micro_batch_size}, "
                   f"checkpointing {plan.checkpointing}; redoing it at micro-batch {lower.micro_batch_size}, "
                   f"checkpointing {lower.checkpointing}")
            state.events.append(msg)
            hooks.replan(lower)
            plan = lower
    scaler = settings.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = _clip(model, settings.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when an inf/nan gradient showed up, then lowers the scale
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    out["grad_norm"] = grad_norm
    return out, plan


def _clip(model, max_norm: float) -> torch.Tensor | float:
    """The gradients' total norm, clipped to max_norm when it is > 0; a device tensor (no sync)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))


def _free_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@torch.no_grad()
def evaluate(model, objective, samples: list[dict], plan, collate, settings: LoopSettings | None = None) -> dict:
    """{"loss": over the eval samples, normalized exactly like training (sum / count of the whole set)}, and for
    preference pairs their mean reward margin and accuracy (objectives.pair_metrics)."""
    if not samples:
        return {"loss": float("nan")}
    was_training = model.training
    model.eval()
    total, norm, stats = 0.0, 0, {}
    groups = _split(samples, plan, settings) if settings else micro_batches(samples, plan.micro_batch_size)
    for mb in groups:
        batch = collate(mb, plan.packing)
        loss_sum, info = objective(model, batch)
        total = total + loss_sum.detach()  # summed on the device: one sync at the end, not one per pass
        norm += objective.normalizer(batch)
        _add(stats, info)
    model.train(was_training)
    return {k: float(v) for k, v in {"loss": total / max(norm, 1), **pair_metrics(stats)}.items()}


class Readout:
    """A finished step's numbers read without stalling the device.

    `float(t)` on a device scalar waits for every kernel queued so far, so a loop that reads its loss after each
    step drains the queue, and the device then idles while the host collates and launches the next step. Here
    the step's scalars are copied behind its own kernels into pinned host memory and an event marks them done;
    `read()` waits on that event only, so the next step's kernels, queued in between, keep the device busy. The
    step's time is the device's, end event to end event (the host's clock would count its own lateness)."""

    def __init__(self, out: dict, start: torch.cuda.Event | float):
        self.out, self.start = out, start
        self.keys = [k for k, v in out.items() if torch.is_tensor(v)]
        values = torch.stack([out[k].detach().reshape(()).double() for k in self.keys]) if self.keys else None  # (K,)
        self.event, self.end = None, time.perf_counter()
        if isinstance(start, torch.cuda.Event):
            if values is not None:
                self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.host = values

    def mark(self) -> torch.cuda.Event | float:
        """Where the next step's time starts: this step's end."""
        return self.event if self.event is not None else self.end

    def read(self) -> dict:
        out = dict(self.out)
        if self.event is not None:
            self.event.synchronize()
            out["seconds"] = self.start.elapsed_time(self.event) / 1e3
        else:
            out["seconds"] = self.end - self.start
        if self.keys:
            out.update(zip(self.keys, self.host.tolist()))
        return out


def _step_start(device: torch.device) -> torch.cuda.Event | float:
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def train_loop(model, optimizer, scheduler, objective, train: list[dict], eval_samples: list[dict], plan,
               settings: LoopSettings, state: LoopState, hooks: Hooks):
    """Run optimizer steps from `state.step` to `settings.total_steps`. Returns the final plan.

    hooks.on_step sees a step's numbers once the next step is queued (Readout), always before an evaluation or a
    checkpoint of that step. Ctrl-C saves a checkpoint at the last finished step before leaving, so `--resume`
    loses nothing.
    """
    model.train()
    pending: list[tuple[int, Readout]] = []  # steps done but not yet reported, oldest first
    mark = _step_start(settings.device)

    def report(keep: int = 0) -> None:
        while len(pending) > keep:
            step, readout = pending.pop(0)
            hooks.on_step(dataclasses.replace(state, step=step), readout.read())

    try:
        while state.step < settings.total_steps:
            samples = [train[i] for i in step_indices(state.step, settings.batch_size, len(train), settings.seed)]
            out, plan = run_step(model, optimizer, scheduler, objective, samples, plan, settings, state, hooks)
            state.step += 1
            out["lr"] = scheduler.get_last_lr()[0]
            out["micro_batch_size"] = plan.micro_batch_size
            out["passes"] = len(_split(shard(samples, settings.world), plan, settings))  # this rank's
            readout = Readout(out, mark)
            mark = readout.mark()
            pending.append((state.step, readout))
            report(keep=1)  # the step before this one: done or nearly, while this one runs
            if settings.eval_every and state.step % settings.eval_every == 0 and state.step < settings.total_steps:
                report()
                hooks.on_eval(state, evaluate(model, objective, eval_samples, plan, hooks.collate, settings))
                mark = _step_start(settings.device)  # the evaluation's time is not the next step's
            if settings.save_every and state.step % settings.save_every == 0:
                report()
                hooks.save(state)
                mark = _step_start(settings.device)  # nor the checkpoint's
        report()
    except KeyboardInterrupt:
        report()
        if state.step > 0:
            state.events.append(f"interrupted after step {state.step}: checkpoint saved; resume with --resume")
            hooks.save(state)
        raise
    return plan
