"""One stack in one process: build it, train --warmup + --steps steps on random tokens, print one result line.

    python benchmarks/_stacks.py '<json payload>'      (spawned by benchmarks/peers.py, one per run)

Roles: "run" builds one stack (ppalli, unsloth, liger, hf) and times it; "prepare" saves the random model
(safetensors, plus a stand-in tokenizer) to the folder Unsloth and HF + bitsandbytes load from. Whatever
happens, the last stdout line starting with peers.RESULT_PREFIX is the result (errors included); everything
else the stacks print goes to the log peers.py keeps.

Every stack trains the same thing: LoRA r=16 alpha=16 dropout 0 on q,k,v,o,gate,up,down, fused AdamW lr 2e-4
on the adapter, the same seeded random tokens (inputs = labels, HF's shift inside the loss), loss = the mean
over the batch's tokens. Random weights come from one seed and one construction (`from_config` on the GPU),
so ppalli, HF and Liger start from the same weights, and Unsloth loads them from the folder.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ppalli from the checkout
from peers import LORA, LR, RESULT_PREFIX, TARGETS, gpu_slug, ppalli_config  # noqa: E402

GIB = 2**30
DTYPE = torch.bfloat16


@dataclass
class Built:
    model: torch.nn.Module
    loss_fn: Callable  # (input_ids, labels, trained tokens of the whole batch) -> the loss to backward
    setting: str
    micro: int  # sequences per forward; the step accumulates batch / micro of them
    extra: dict = field(default_factory=dict)
    loop: Callable = contextlib.nullcontext  # what the stack's own training loop runs its steps inside


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- models


def random_model(spec: dict, device: str):
    """The random-weight HF model of spec's config, built on `device` in bf16, as ppalli's load_model builds
    it (seed, then from_config under the device): the same weights for every stack of one seed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(spec["model_config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = "sdpa"  # no flash-attn on the H100 machine (BENCHMARKS.md)
    torch.manual_seed(spec["seed"])
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=DTYPE)


def write_tokenizer(folder: Path) -> None:
    """A word-level stand-in (speed does not depend on the tokenizer): Unsloth needs one in the folder.
    Its pad token differs from eos, so Unsloth's pad-token fix (unsloth_zoo patch_tokenizer) changes nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"t{i}" for i in range(252)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=131072)
    fast.save_pretrained(folder)


def prepare(spec: dict, out: dict) -> None:
    """Save the random model to spec['folder'] (written aside, then renamed: a cut-short save never counts)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(spec, device)
    folder = Path(spec["folder"])
    part = folder.with_name(folder.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    t0 = time.perf_counter()
    model.save_pretrained(part, max_shard_size="5GB")  # safetensors; 8B: 16 GB of bf16
    write_tokenizer(part)
    out["save_s"] = round(time.perf_counter() - t0, 1)
    marker = {"model_config": spec["model_config"], "seed": spec["seed"]}
    (part / "ppalli-peers.json").write_text(json.dumps(marker), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(part, folder)


# --------------------------------------------------------------------------- the stacks


def _plan_setting(plan, pins: dict) -> str:
    forced = [k for k in ("checkpointing", "micro", "fast", "attention", "budget", "deterministic", "fp8") if k in pins]
    text = (f"plan: checkpointing {plan.checkpointing}, micro-batch {plan.micro_batch_size} x {plan.grad_accum}, "
            f"fast path {'on' if plan.fast_path else 'off'}, attention {plan.attention}, "
            f"weights {plan.quantization}{', fp8 GEMMs' if plan.fp8 else ''}, "
            f"predicted peak {plan.predicted_peak_gib} GiB")
    return text + (f" (forced: {pins['requested']})" if forced else "")


def build_ppalli(spec: dict, device: str) -> Built:
    """As ppalli's recipe builds a run (ppalli/train/recipe.py steps 1 and 3), fed random tokens."""
    from ppalli import config as C
    from ppalli.env import probe
    from ppalli.train.determinism import set_deterministic
    from ppalli.train.recipe import build_loss, build_model, build_plan, device_and_dtype, frozen_gc
    from ppalli.train.recompute import apply_recompute

    cfg = C.from_dict(ppalli_config(spec))
    plan = build_plan(cfg, spec["model_config"], probe())
    for line in plan.explain():
        log(line)
    if plan.deterministic:  # for the whole process (this stack's own), before the fast path picks its kernels
        set_deterministic(True)
    model = build_model(cfg, plan, *device_and_dtype(plan))
    lines: list[str] = []  # the fast path's log: the swaps, then any layer that fell back to HF's forward
    lm_loss, _handle = build_loss(model, plan, lines.append)
    apply_recompute(model, plan.checkpointing, plan.recompute_layers)
    model.train()

    def loss_fn(ids, labels, norm):
        loss_sum, _ = lm_loss(model, {"input_ids": ids, "labels": labels})
        return loss_sum / norm  # sum over trained tokens / those of the whole batch: exact under accumulation

    return Built(model, loss_fn, _plan_setting(plan, spec["ppalli"]), plan.micro_batch_size,
                 {"plan": plan.to_dict(), "fast_path_log": lines}, loop=frozen_gc)


def build_unsloth(spec: dict, device: str) -> Built:
    from unsloth import FastLanguageModel  # first: Unsloth patches transformers and peft as it imports

    gc = {"off": False, "on": True, "unsloth": "unsloth"}[spec["gc"]]
    nf4 = spec["quant"] == "nf4"  # Unsloth's own bnb config: nf4, double quant, compute dtype = dtype
    model, _ = FastLanguageModel.from_pretrained(
        model_name=spec["folder"], max_seq_length=spec["seq"], dtype=DTYPE, load_in_4bit=nf4, load_in_16bit=not nf4,
        use_gradient_checkpointing=gc, use_exact_model_name=True, fix_tokenizer=False, random_state=spec["seed"])
    model = FastLanguageModel.get_peft_model(
        model, r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=list(TARGETS),
        bias="none", use_gradient_checkpointing=gc, random_state=spec["seed"])
    FastLanguageModel.for_training(model)
    setting = f"use_gradient_checkpointing={gc!r}" + (", load_in_4bit (nf4, double quant)" if nf4 else "")
    impl = os.environ.get("PPALLI_PEERS_FLASH_IMPL")
    if impl:  # what Unsloth's padding-free trainer activates on sm90/sm100 (unsloth/utils/flash_impl.py); this
        # harness calls the model without a trainer, so it is set here: torch's SDPA flash kernels run as `impl`
        from torch.nn.attention import activate_flash_attention_impl

        activate_flash_attention_impl(impl)
        setting += f", torch flash attention impl {impl}"
    return Built(model, lambda ids, labels, norm: model(input_ids=ids, labels=labels).loss, setting, spec["batch"])


def _hf_base(spec: dict, device: str):
    """16-bit: built on the GPU. nf4: loaded from the folder through bitsandbytes (nf4, double quant, bf16
    compute), then PEFT's prepare_model_for_kbit_training, as HF's QLoRA recipe (and TRL) does."""
    if spec["quant"] == "none":
        return random_model(spec, device)
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=DTYPE)
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], quantization_config=bnb, dtype=DTYPE,
                                                 device_map={"": 0 if device == "cuda" else "cpu"},
                                                 attn_implementation="sdpa")
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # GC set below, non-reentrant


def build_hf(spec: dict, device: str, liger: bool = False) -> Built:
    if liger:  # class-level patches of modeling_llama: before the model exists
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    from peft import LoraConfig, get_peft_model

    model = _hf_base(spec, device)
    model.requires_grad_(False)
    model.config.use_cache = False
    gc = spec["gc"] != "off"
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(spec["seed"])
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=list(TARGETS), bias="none", task_type="CAUSAL_LM"))
    model.train()
    setting = ("Liger rope, rms_norm, swiglu, fused linear CE + PEFT" if liger else "PEFT") + (
        f", gradient checkpointing {'on (non-reentrant)' if gc else 'off'}")
    setting += ", bnb nf4 + double quant, prepare_model_for_kbit_training" if spec["quant"] == "nf4" else ""
    return Built(model, lambda ids, labels, norm: model(input_ids=ids, labels=labels).loss, setting, spec["batch"])


BUILDERS = {"ppalli": build_ppalli, "unsloth": build_unsloth, "hf": build_hf,
            "liger": functools.partial(build_hf, liger=True)}


# --------------------------------------------------------------------------- training and timing


def make_batches(spec: dict, device: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n seeded (input_ids, labels) pairs of (batch, seq) random tokens, the same for every stack."""
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    ids = torch.randint(0, spec["model_config"]["vocab_size"], (n, spec["batch"], spec["seq"]), generator=gen)
    return [(ids[i].to(device), ids[i].to(device)) for i in range(n)]


def train_step(built: Built, opt: torch.optim.Optimizer, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One optimizer step over the batch, in micro-batches of built.micro; returns the batch's loss (no sync)."""
    norm = labels[:, 1:].numel()  # random labels: every shifted position trains
    total = None
    for i in range(0, ids.shape[0], built.micro):
        loss = built.loss_fn(ids[i:i + built.micro], labels[i:i + built.micro], norm)
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# Allocator counters read after each timed step: a step that maps new memory (num_device_alloc) or frees
# it to retry an allocation (num_alloc_retries, a device sync) stalls the host that launches its kernels.
ALLOC_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def _alloc_counts() -> list[int]:
    stats = torch.cuda.memory_stats_as_nested_dict()  # the counters are top-level; skips memory_stats' flattening
    return [stats.get(k, 0) for k in ALLOC_COUNTERS]


class GCTimer:
    """Python's garbage collections while it is active: per step, the ms spent collecting and the number of
    full (generation 2) collections. A collection stalls the host that launches the step's kernels."""

    def __init__(self):
        self.ms, self.full, self._t0 = 0.0, 0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.ms += 1e3 * (time.perf_counter() - self._t0)
            self.full += info.get("generation") == 2

    def take(self) -> tuple[float, int]:
        out, self.ms, self.full = (round(self.ms, 2), self.full), 0.0, 0
        return out

    @contextlib.contextmanager
    def active(self):
        gc.callbacks.append(self)
        try:
            yield self
        finally:
            gc.callbacks.remove(self)


SMI_FIELDS = "timestamp,clocks.sm,power.draw,clocks_event_reasons.active"
# Read beside them when this nvidia-smi knows them (probed once): power.draw is a 1 s average that lags a
# 180 ms step (T4 on the H200, 2026-12-02: 421 -> 697 W over 8 steps that all ran capped), the instant
# reading does not; the die and HBM temperatures show whether a run is still heating up.
SMI_EXTRA = "power.draw.instant,temperature.gpu,temperature.memory"
SW_POWER_CAP = 0x4  # nvidia-smi's clocks_event_reasons bit for the software power cap
TRACE_PERIOD_S = 0.5  # the run's whole nvidia-smi log, thinned to one sample per this many seconds


class ClockLog:
    """nvidia-smi sampling the GPU's SM clock, power and clock-limit reasons every `period_ms` while active
    (a no-op without nvidia-smi). Under load the H100 of 2026-11-25 ran at its software power cap in 90 of 144
    samples, at 1725-1965 MHz against 1980 (an nvidia-smi log beside T4, results/*-t4-s5.json's call), and
    ppalli's T4 steps spread 182-200 ms where Unsloth's did not: per_step_clocks says which steps ran slower."""

    def __init__(self, path: Path, device_index: int = 0, period_ms: int = 50):
        self.path, self.device_index, self.period_ms = path, device_index, period_ms

    def _command(self) -> list[str]:
        """nvidia-smi's sampling command, with SMI_EXTRA when a one-shot query of it succeeds."""
        fields = f"{SMI_FIELDS},{SMI_EXTRA}"
        probe = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i",
                                str(self.device_index)], capture_output=True, text=True, timeout=30, check=False)
        fields = fields if probe.returncode == 0 else SMI_FIELDS
        return ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-lms", str(self.period_ms),
                "-i", str(self.device_index)]  # as run on the H100 (-lms 100)

    @contextlib.contextmanager
    def active(self):
        if shutil.which("nvidia-smi") is None:
            yield self
            return
        with open(self.path, "w", encoding="utf-8") as out:
            try:
                proc = subprocess.Popen(self._command(), stdout=out, stderr=subprocess.DEVNULL)
            except (OSError, subprocess.SubprocessError):  # a log, not the measurement: the run goes on without it
                yield self
                return
            try:
                time.sleep(0.2)  # its first sample
                yield self
            finally:
                proc.terminate()
                proc.wait(timeout=10)

    def samples(self) -> list[tuple]:
        """(wall time s, SM MHz, W (1 s average), reasons bit mask, instant W, GPU C, HBM C) per sample, the
        last three None where nvidia-smi gave none; lines without the first four are skipped."""
        out = []
        text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        for line in text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                base = (t, float(parts[1]), float(parts[2]), int(parts[3], 16))
            except (ValueError, IndexError):
                continue
            out.append(base + tuple(_number(p) for p in (parts[4:7] + [""] * 3)[:3]))
        return out


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", or the field was not asked for
        return None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def clock_trace(samples: list, start: float) -> dict:
    """The log thinned to one sample per TRACE_PERIOD_S from `start` (wall s): seconds, SM MHz, instant W
    (else the 1 s average) and GPU / HBM C, to see when a run's clock settles."""
    rows, next_t = [], start
    for s in samples:
        if s[0] >= next_t:
            rows.append((round(s[0] - start, 2), s[1], s[4] if s[4] is not None else s[2], s[5], s[6]))
            next_t = s[0] + TRACE_PERIOD_S
    return {k: [r[i] for r in rows] for i, k in enumerate(("s", "sm_mhz", "power_w", "temp_c", "hbm_temp_c"))}


def per_step_clocks(windows: list[tuple[float, float]], samples: list) -> dict:
    """Per step (wall-time window start, end): mean SM MHz, mean W and the share of samples at the software
    power cap, over the samples inside the window (None where none fell inside)."""
    out = {"sm_mhz": [], "power_w": [], "power_capped": [], "power_instant_w": [], "temp_c": []}
    for start, end in windows:
        inside = [s for s in samples if start <= s[0] <= end]
        if not inside:
            for k in out:
                out[k].append(None)
            continue
        out["sm_mhz"].append(round(statistics.fmean(s[1] for s in inside)))
        out["power_w"].append(round(statistics.fmean(s[2] for s in inside), 1))
        out["power_capped"].append(round(sum(bool(s[3] & SW_POWER_CAP) for s in inside) / len(inside), 2))
        instant, temp = _mean(s[4] for s in inside), _mean(s[5] for s in inside)
        out["power_instant_w"].append(None if instant is None else round(instant, 1))
        out["temp_c"].append(None if temp is None else round(temp, 1))
    if all(v is None for v in out["power_instant_w"] + out["temp_c"]):  # an nvidia-smi without SMI_EXTRA
        del out["power_instant_w"], out["temp_c"]
    return out


def _step_windows(events: list, end_wall: float) -> list[tuple[float, float]]:
    """Wall-time windows of the steps from their CUDA events, anchored at end_wall, when the last step ended
    (the sync after it returned)."""
    last = events[-1][1]
    return [(end_wall - s.elapsed_time(last) / 1e3, end_wall - e.elapsed_time(last) / 1e3) for s, e in events]


def timed_steps(step: Callable, batches: list, device: str, clocks: ClockLog | None = None
                ) -> tuple[list, list[float], float, dict]:
    """(losses, per-step ms, total seconds, per-step host detail): on CUDA, events around each step read after
    one final sync; on the CPU, wall time. The detail, per step: host_ms, the time the host took to launch it
    (it runs ahead of the device unless something syncs, so a long one points at a sync or a host stall),
    gc_ms and gc_full (GCTimer), and on CUDA the change of each ALLOC_COUNTERS entry and, with `clocks` (its
    sampler active around the call), each step's mean SM clock, power and share of samples at the power cap
    (per_step_clocks)."""
    cuda = device == "cuda"
    _sync(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in batches] \
        if cuda else []
    losses, stamps, counts, gcs = [], [time.perf_counter()], [_alloc_counts()] if cuda else [], []
    with GCTimer().active() as timer:
        for i, b in enumerate(batches):
            if cuda:
                events[i][0].record()
            losses.append(step(*b))
            if cuda:
                events[i][1].record()
                counts.append(_alloc_counts())
            stamps.append(time.perf_counter())
            gcs.append(timer.take())
        _sync(device)
        end_wall = time.time()
    host = [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]
    detail = {"host_ms": [round(x, 2) for x in host], "gc_ms": [g[0] for g in gcs], "gc_full": [g[1] for g in gcs]}
    if not cuda:
        return losses, host, stamps[-1] - stamps[0], detail
    detail["alloc"] = {k: [c[i] - p[i] for p, c in zip(counts, counts[1:])] for i, k in enumerate(ALLOC_COUNTERS)}
    ms = [s.elapsed_time(e) for s, e in events]
    if clocks is not None:
        detail["clocks"] = per_step_clocks(_step_windows(events, end_wall), clocks.samples())
    return losses, ms, events[0][0].elapsed_time(events[-1][1]) / 1e3, detail


def warm_up(step: Callable, batches: list, seconds: float = 0.0, sync: Callable = lambda: None
            ) -> tuple[list, int]:
    """The untimed steps: each batch once, then round the batches again until `seconds` have passed since that
    first round ended (`sync` waits for the device; the rounds after it are timed on the host, which runs at
    most a step or two ahead). -> (the first round's losses, the steps run). The first round compiles and
    autotunes with the GPU idle (T4 on the H200, 2026-12-02: ~10 s for ppalli, ~28 s for Unsloth), then a
    capped GPU settles over seconds: its clock fell 1864 -> 1600 MHz over T4's 8 timed steps after 3 warm-up
    steps. Held 15-20 s, T4's ratio moved 1.155 -> 1.185x on one machine and 1.158 -> 1.152x on another."""
    losses = [step(*b) for b in batches]
    sync()
    t0, n = time.perf_counter(), len(batches)
    while batches and time.perf_counter() - t0 < seconds:
        step(*batches[n % len(batches)])
        n += 1
    return losses, n


PROFILED_STEPS = 4  # T4's slow step came every 3-5 steps (2026-11-25): two steps may miss it


def profile_steps(step: Callable, batches: list, device: str, path: Path, title: str) -> None:
    """torch.profiler over PROFILED_STEPS steps: key averages, top 25 by self device time, then by total device
    time, then the top 40 aten ops by self device time per input shape (which copies and elementwise passes
    run, and on what), and on CUDA where the device sat idle."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for b in batches[:PROFILED_STEPS]:
            step(*b)
        _sync(device)
    avg = prof.key_averages()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"  # torch maps "cuda" to "device" keys
    by_shape = prof.key_averages(group_by_input_shape=True)
    text = [f"{title} ({PROFILED_STEPS} steps)\n",
            f"top 25 by self_{key}:", avg.table(sort_by=f"self_{key}", row_limit=25), "",
            f"top 25 by {key}:", avg.table(sort_by=key, row_limit=25), "",
            f"aten ops by input shape, top 40 by self_{key}:",
            by_shape.table(sort_by=f"self_{key}", row_limit=40, max_name_column_width=40, max_shapes_column_width=80)]
    if device == "cuda":
        text += ["", _idle_report(prof.events()), "", _kernel_census(prof.events(), PROFILED_STEPS), "",
                 _launchers(prof.events(), PROFILED_STEPS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n", encoding="utf-8")


def _kernel_census(events, steps: int) -> str:
    """Every device kernel (and memset/memcpy) by name: launches and time a step, longest first. The small
    ones each cost a launch gap besides their own time, which the top-25 tables do not show."""
    from torch.autograd import DeviceType

    total: dict[str, list] = {}
    for e in events:
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start:
            row = total.setdefault(e.name[:110], [0, 0.0])
            row[0] += 1
            row[1] += e.time_range.end - e.time_range.start
    rows = sorted(total.items(), key=lambda kv: -kv[1][1])
    lines = [f"device kernels a step ({steps} steps profiled): launches, ms, name; "
             f"{sum(r[0] for _, r in rows) / steps:.0f} launches a step in all"]
    lines += [f"  {n / steps:7.1f}  {us / 1e3 / steps:8.3f}  {name}" for name, (n, us) in rows]
    return "\n".join(lines)


def _launchers(events, steps: int, small=("Memset", "FillFunctor", "direct_copy", "bfloat16_copy", "reduce_kernel",
                                           "CatArray", "splitKreduce")) -> str:
    """Which host ops launch the small kernels (memsets, fills, copies, reductions): each such kernel with the
    chain of ops above it (innermost first, three deep), launches a step. Removing a launch saves its time and
    the ~2 us gap after it."""
    chains: dict[str, int] = {}
    for e in events:
        for k in getattr(e, "kernels", None) or []:
            if any(tag in k.name for tag in small):
                chain, op = [k.name[:48]], e
                while op is not None and len(chain) < 4:
                    chain.append(op.name[:48])
                    op = op.cpu_parent
                key = " <- ".join(chain)
                chains[key] = chains.get(key, 0) + 1
    lines = [f"small kernels by the ops that launch them, a step ({steps} steps profiled):"]
    lines += [f"  {n / steps:7.1f}  {key}" for key, n in sorted(chains.items(), key=lambda kv: -kv[1])[:40]]
    return "\n".join(lines)


def _idle_report(events, top: int = 15) -> str:
    """Where the GPU sat idle inside the profiled steps: the union of kernel intervals against the window
    from the first kernel to the last, and the largest gaps with the kernels on either side (a gap after a
    small kernel usually means the host was behind)."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return "no device kernels recorded"
    gaps, busy, end, before = [], 0.0, spans[0][0], spans[0][2]
    for start, stop, name in spans:
        if start > end:
            gaps.append((start - end, before, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, before = stop, name
    window = end - spans[0][0]
    lines = [f"device busy {busy / 1e3:.1f} ms of a {window / 1e3:.1f} ms window (idle {(window - busy) / 1e3:.1f} "
             f"ms in {len(gaps)} gaps); largest gaps:"]
    for us, a, b in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  {us / 1e3:7.3f} ms  after {a[:70]}  before {b[:70]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- one run


def device_info(device: str) -> dict:
    if device != "cuda":
        return {"device": "cpu", "cuda": None, "torch": torch.__version__}
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "cuda": torch.version.cuda, "torch": torch.__version__,
            "total_gib": round(props.total_memory / GIB, 2)}


def cap_memory(gib: float | None, device: str) -> None:
    """T2: the caching allocator may hold at most `gib` (it raises OOM beyond it), in every stack's process."""
    if gib and device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total))


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # build-time leftovers (16-bit weights before quantizing) leave the count
        torch.cuda.reset_peak_memory_stats()


def _peaks(device: str) -> dict:
    if device != "cuda":
        return {}
    return {"peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3)}


def run(spec: dict, out: dict) -> None:
    """Build, warm up, time, (profile); fills `out` as it goes, so a failure still reports what it had."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out.update(device_info(device))
    cap_memory(spec.get("mem_cap_gib"), device)
    t0 = time.perf_counter()
    built = BUILDERS[spec["stack"]](spec, device)
    out.update(setting=built.setting, micro_batch=built.micro, build_s=round(time.perf_counter() - t0, 1),
               **built.extra)
    params = [p for p in built.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=device == "cuda")
    batches = make_batches(spec, device, spec["warmup"] + spec["steps"])
    step = functools.partial(train_step, built, opt)
    _reset_peak(device)
    with built.loop(), tempfile.TemporaryDirectory() as tmp:
        # The sampler runs from before the warm-up on: its start (a 0.2 s wait) leaves no idle gap, and so no
        # cooler, faster first steps, between the warm-up and the timed steps.
        clocks = ClockLog(Path(tmp) / "smi.csv", torch.cuda.current_device()) if device == "cuda" else None
        with clocks.active() if clocks is not None else contextlib.nullcontext():
            start = time.time()
            warm, out["warmup_steps"] = warm_up(step, batches[:spec["warmup"]], spec.get("warmup_s", 0.0),
                                                functools.partial(_sync, device))
            losses, ms, seconds, detail = timed_steps(step, batches[spec["warmup"]:], device, clocks)
        if clocks is not None:
            detail["trace"] = clock_trace(clocks.samples(), start)
    out.update(_peaks(device))
    losses = [round(float(x), 5) for x in warm + losses]
    tokens = spec["steps"] * spec["batch"] * spec["seq"]
    out.update(tokens_per_s=tokens / seconds, step_ms=round(statistics.median(ms), 2),
               step_ms_all=[round(x, 2) for x in ms], step_detail=detail, losses=losses, loss_first=losses[0],
               loss_last=losses[-1])
    if "fast_path_log" in out:
        out["fast_path_log"] = _short_log(out["fast_path_log"])
    if spec.get("profile"):
        path = Path(spec["profile"].format(gpu=gpu_slug(out["device"])))
        profile_steps(step, batches, device, path, f"{spec['case']} {spec['stack']}: {built.setting}")
        out["profile"] = str(path)


def _short_log(lines: list[str]) -> list[str]:
    """The fast path's log without its one-line-per-layer swaps (the first kept as the example)."""
    swaps = [x for x in lines if ".layers." in x]
    return [x for x in lines if ".layers." not in x] + swaps[:1] + ([f"... {len(swaps)} layers swapped"] * bool(swaps))


def _error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:500]


def main(payload: str) -> int:
    spec = json.loads(payload)
    out: dict = {"stack": spec.get("stack"), "role": spec["role"]}
    try:
        (prepare if spec["role"] == "prepare" else run)(spec, out)
    except BaseException as e:  # noqa: BLE001 - OOM, import errors, a peer's assert: all go in the result line
        traceback.print_exc()
        out["error"] = _error_text(e)
        if torch.cuda.is_available():
            out.update(_peaks("cuda"))
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    return 1 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
