"""The one typed config tree.

Every field has a default and a docstring (``doc=``); YAML supplies values and ``--set a.b=c`` overrides
them. Unknown keys are errors that name the closest valid key; bad values name the field and the fix.
Components never read this object: builders (``ppalli/train/recipe.py``) pass them plain values.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ppalli.errors import ConfigError


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with its docstring kept in metadata (shown by errors and `ppalli train --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    name_or_path: str = _f("demo", "Hub id, local model folder, or a config.json (random weights). "
                                   "'demo' is the embedded tiny model.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) when loading from the hub.")
    tokenizer: str | None = _f(None, "Tokenizer folder or hub id, when it differs from the model's.")
    trust_remote_code: bool = _f(False, "Run the model repository's own Python code. Off by default; "
                                        "announced when on.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "Compute dtype. 'auto' lets the plan pick: bf16 from compute capability 8.0, else fp16, "
                "fp32 on the CPU.")


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank. Higher adds capacity and memory.")
    alpha: float = _f(16, "LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = _f(0.0, "Dropout on the LoRA input. Above 0 the fused fast path is not used.")
    targets: list[str] | str = _f("all-linear", "Modules to adapt: 'all-linear' (every linear layer of the "
                                                "family but lm_head) or a list of names like [q_proj, v_proj].")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA). Runs on the reference path.")
    use_rslora: bool = _f(False, "Rank-stabilised scaling alpha / sqrt(r).")


@dataclass
class SourceConfig:
    path: str = _f("", "A file (.json, .jsonl, .csv, .tsv, .parquet), a `datasets` folder, or a hub id.")
    weight: float = _f(1.0, "Mixing weight among several sources.")
    format: str = _f("auto", "auto, alpaca, qa, messages, sharegpt, text, preference, summarization or calls.")
    columns: dict[str, str] = _f({}, "Column mapping, e.g. {question: Q, answer: A}.")
    split: str = _f("train", "Split of a `datasets` folder or hub id.")


@dataclass
class DataConfig:
    path: str = _f("demo", "Training data file; 'demo' writes and uses the built-in Korean/English pairs.")
    sources: list[SourceConfig] = _f([], "Several sources mixed by weight (instead of `path`).")
    format: str = _f("auto", "auto (from the columns), alpaca, qa, messages, sharegpt, text, preference, "
                             "summarization, calls (a question, tools and the calls answering it, as xLAM's "
                             "function-calling data).")
    columns: dict[str, str] = _f({}, "Column mapping from the format's names to the file's, e.g. "
                                     "{question: Q, answer: A}.")
    template: str = _f("auto", "auto (the model's chat template, else alpaca_en), alpaca_en, alpaca_ko, "
                               "chatml, llama3, gemma, exaone, or a Jinja string. Rows with tools (function "
                               "calling) need one that renders them: the model's own (Qwen2.5, Llama 3.1, ...) "
                               "or chatml.")
    system_prompt: str | None = _f(None, "System prompt for templates that take one.")
    max_seq_len: int = _f(1024, "Longest tokenized sample; longer ones are truncated (counted, never silent).")
    train_on: Literal["responses", "all"] = _f("responses", "Compute the loss on assistant responses only, "
                                                            "or on every token.")
    eval_split: float = _f(0.05, "Held-out share (0-1) or row count (>= 1) for eval loss; 0 for none.")
    eval_path: str | None = _f(None, "A separate eval file instead of a split.")
    limit: int | None = _f(None, "Use only the first N rows (quick trials).")
    skip_bad_rows: bool = _f(False, "Skip rows with missing or wrong fields (reported) instead of stopping.")
    streaming: bool = _f(False, "Read the file lazily; memory stays flat as the file grows.")
    packing: Literal["auto", "on", "off"] = _f("auto", "Padding-free packing; auto lets the plan decide.")
    num_proc: int = _f(0, "Tokenizer processes for what is left after 2 s of tokenizing in the main one (small "
                          "data never starts them); 0 = one per core but one (the reader's), at most 8.")
    cache_dir: str | None = _f(None, "Where tokenized data is cached by content hash; default ~/.cache/ppalli.")


PREFERENCE_OBJECTIVES = ("orpo", "dpo", "simpo")  # a sample is a chosen and a rejected answer to one prompt


@dataclass
class TrainConfig:
    objective: Literal["sft", "orpo", "dpo", "simpo"] = _f(
        "sft", "Training objective: sft, or on preference pairs orpo, dpo (the base model as reference), simpo "
        "(length-normalized, no reference).")
    epochs: float = _f(1.0, "Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = _f(None, "Optimizer steps to run; overrides epochs.")
    lr: float = _f(2e-4, "Peak learning rate.")
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "Decay after warmup.")
    warmup_ratio: float = _f(0.03, "Share of steps for linear warmup (used when warmup_steps is 0).")
    warmup_steps: int = _f(0, "Warmup steps; overrides warmup_ratio when above 0.")
    batch_size: int = _f(8, "Effective batch size (samples per optimizer step), kept by every plan.")
    micro_batch_size: int | None = _f(None, "Samples per forward pass; None lets the plan pick.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"] = _f(
        "adamw", "Optimizer for the adapter weights (fused AdamW where available).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables.")
    beta: float | None = _f(None, "ORPO lambda / DPO beta / SimPO beta; None: 0.1 for ORPO and DPO, 2.0 for SimPO "
                                  "(the SimPO paper's 2-2.5).")
    simpo_gamma: float = _f(1.0, "SimPO's target reward margin gamma (the paper: gamma / beta about 0.5).")
    seed: int = _f(42, "Seed for weights, data order and dropout.")
    eval_every: int = _f(0, "Eval loss every N steps (0: only at the end).")
    save_every: int = _f(0, "Checkpoint every N steps (0: only at the end).")
    save_total_limit: int = _f(2, "Checkpoints kept; older ones are deleted.")
    log_every: int = _f(1, "Write metrics every N steps.")


@dataclass
class PlanConfig:
    device: Literal["auto", "cuda", "cpu", "mps"] = _f("auto", "Where to train.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f("auto", "Pin the compute precision.")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4",
                       "flex_attention"] = _f(
        "auto", "Pin the attention backend. flash_attention_4 (pip install 'ppalli[fa4]': CuTe DSL kernels "
                "for compute capability 8.0+, compiled at their first call) runs on the fused path only; the "
                "reference path runs SDPA then.")
    quantization: Literal["auto", "none", "nf4", "fp4"] = _f(
        "auto", "4-bit base weights: auto uses them only when 16-bit weights do not fit.")
    double_quant: bool = _f(True, "Quantize the 4-bit scales too (saves ~0.4 bit per weight).")
    checkpointing: Literal["auto", "none", "selective", "full", "offload"] = _f(
        "auto", "Activation recompute per decoder layer: none; selective (auto: the fewest layers that fit; "
                "pinned: every other layer); full (every layer keeps only its input); offload (full, with the "
                "inputs in pinned CPU memory). auto ranks the plans that fit by estimated step time.")
    fast_path: Literal["auto", "on", "off"] = _f("auto", "Fused kernels; 'off' forces the reference path.")
    compile: Literal["auto", "on", "off"] = _f("auto", "Regional torch.compile of decoder layers.")
    memory_budget_gib: float | None = _f(None, "Cap the GPU memory the plan may use.")
    fp8: bool = _f(False, "The decoder layers' frozen base GEMMs (forward and input gradient) in fp8 e4m3 with per-row "
                          "scales, on Hopper GPUs (compute capability 9.0+): ~1.6-1.8x on those GEMMs, two e4m3 "
                          "copies of the weights beside the 16-bit ones (1 byte a weight each). Adapters, "
                          "attention, norms, lm_head and loss stay 16/32-bit. Each GEMM's error is ~20x bf16's, so "
                          "losses drift from the reference path's: off unless asked for.")
    sharding: Literal["auto", "off", "fsdp"] = _f(
        "auto", "With --nproc N > 1: fsdp shards the frozen 16-bit base weights over the ranks with FSDP2 (each "
                "holds 1/N, layers gathered as they run; the adapter stays whole on every rank), off gives every "
                "rank the whole model; auto shards only when the whole model does not fit one GPU in 16 bits.")
    deterministic: bool = _f(False, "Bit-repeatable runs (same seed, GPU model and software -> same losses and "
                                    "adapter): torch's deterministic algorithms, SDPA's flash attention instead "
                                    "of cuDNN, LoRA B gradients by GEMMs. Attention takes ~1.7-2x as long.")


@dataclass
class LoggingConfig:
    progress: Literal["auto", "rich", "plain", "none"] = _f("auto", "Progress bar on a TTY, plain lines "
                                                                    "otherwise.")
    tensorboard: bool = _f(False, "Also log to TensorBoard (when installed).")
    wandb: bool = _f(False, "Also log to Weights & Biases (when installed).")
    wandb_project: str = _f("ppalli", "W&B project name.")
    sample_prompts: list[str] = _f([], "Prompts answered before and after training in the report; default "
                                       "takes a few from the eval split.")
    sample_max_new_tokens: int = _f(64, "Tokens generated per sample answer.")
    sample_source: Literal["eval", "train"] = _f("eval", "Where default sample prompts come from: held-out rows "
                                                         "(generalization) or training rows (memorization).")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "The base model."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"doc": "The adapter."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Training data."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "The optimization."})
    plan: PlanConfig = field(default_factory=PlanConfig, metadata={"doc": "Pins for the planner's choices."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"doc": "Logs and samples."})
    output_dir: str = _f("runs/{name}", "Run directory; {name} is the run name.")
    name: str | None = _f(None, "Run name; default: model and time.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading and checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return "null" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp: Any, where: str) -> Any:  # noqa: C901 - one branch per kind of type
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("on" in choices or "off" in choices):
            value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans; users mean the words
        if value in choices and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping like {{key: value}}, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected text, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            valid = ", ".join(fields)
            raise ConfigError(f"unknown config key '{path}'{hint} (valid here: {valid})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def from_dict(data: dict | None) -> Config:
    cfg = _build(Config, data or {}, "")
    validate(cfg)
    return cfg


def set_dotted(data: dict, dotted: str) -> None:
    """Apply one `a.b=c` override to a raw dict; the value is parsed as YAML (so 3, true, [a, b] work)."""
    if "=" not in dotted:
        raise ConfigError(f"--set {dotted!r}: expected key=value, e.g. --set train.lr=1e-4")
    key, raw = dotted.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as text
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{p}' is not a section")
    node[parts[-1]] = value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (safe loader: nothing in it is executed), apply overrides, check it."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (give a YAML file, e.g. configs/llama-3.1-8b-lora.yaml)")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, train:, ...)")
        _fix_yaml_numbers(data)
    for o in overrides:
        set_dotted(data, o)
    return from_dict(data)


def _fix_yaml_numbers(node: Any) -> None:
    """YAML 1.1 reads `2e-4` (no dot) as text; read such values as numbers, as users mean."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str) and _looks_numeric(v) and "e" in v.lower():
                node[k] = float(v)
            else:
                _fix_yaml_numbers(v)
    elif isinstance(node, list):
        for v in node:
            _fix_yaml_numbers(v)


def _positive(where: str, value: float | int | None, fix: str) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{where}: must be above 0, got {value} ({fix})")


def validate(cfg: Config) -> None:
    _positive("lora.r", cfg.lora.r, "typical values are 8, 16, 32, 64")
    _positive("lora.alpha", cfg.lora.alpha, "alpha = r is a safe start")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    _positive("data.max_seq_len", cfg.data.max_seq_len, "e.g. 1024 or 2048")
    _positive("train.lr", cfg.train.lr, "LoRA usually trains well at 1e-4 to 3e-4")
    _positive("train.batch_size", cfg.train.batch_size, "the effective batch, e.g. 8 or 16")
    _positive("train.micro_batch_size", cfg.train.micro_batch_size, "or leave it out and let the plan pick")
    _positive("train.max_steps", cfg.train.max_steps, "or leave it out and set train.epochs")
    _positive("train.epochs", cfg.train.epochs, "e.g. 1 or 3")
    if cfg.train.micro_batch_size and cfg.train.batch_size % cfg.train.micro_batch_size:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
                          f"train.micro_batch_size ({cfg.train.micro_batch_size})")
    if cfg.data.eval_split < 0:
        raise ConfigError(f"data.eval_split: must be 0 or more, got {cfg.data.eval_split}")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"train.betas: expected two numbers like [0.9, 0.999], got {cfg.train.betas}")
    if cfg.train.save_total_limit < 1:
        raise ConfigError("train.save_total_limit: keep at least 1 checkpoint")
    if isinstance(cfg.lora.targets, list) and not cfg.lora.targets:
        raise ConfigError("lora.targets: empty list; use 'all-linear' or names like [q_proj, v_proj]")


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, doc) for every field: the reference printed by `ppalli train --help-config`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
        else:
            rows.append((key, _type_name(tp), f.metadata.get("doc", "")))
    return rows
