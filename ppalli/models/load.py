"""Load a causal LM and its tokenizer; attach a PEFT LoRA adapter.

Three ways in: a hub id (hub on the user's machine), a local model folder, or a bare config.json (random
weights; tests and benchmarks build models this way because speed and memory do not depend on weight
values). Weights are read from safetensors by transformers; nothing is executed unless the user turns
`trust_remote_code` on, which is announced.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ppalli.errors import ModelError

log = logging.getLogger("ppalli")

_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def is_config_only(path: Path) -> bool:
    """A config.json file, or a folder with config.json and no weight files: build random weights."""
    if path.is_file():
        return path.suffix == ".json"
    if not (path / "config.json").is_file():
        return False
    return not any(next(path.glob(g), None) for g in _WEIGHT_GLOBS)


def read_model_config(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The transformers config of a model, read without loading weights (the planner needs it first)."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    src = path.parent if path.is_file() else name_or_path
    try:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            model_type = data.pop("model_type", None)
            if model_type is None:
                raise ModelError(f"{path}: no 'model_type' key; is this a Hugging Face config.json?")
            return AutoConfig.for_model(model_type, **data)
        return AutoConfig.from_pretrained(src, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(_load_hint(name_or_path, e)) from None


def _load_hint(name: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not Path(name).exists() and "/" not in name:
        return f"model '{name}' not found: give a local folder, a config.json, or a hub id like org/name ({first})"
    return f"cannot load model config from '{name}': {first}"


def supported_attention(config, requested: str) -> str:
    """`requested` HF attention implementation, or "eager" where the model class has no SDPA path: Gemma-2,
    whose logit softcap SDPA cannot apply (from_pretrained refuses "sdpa" for it, and a config-built model would
    silently drop the softcap). Remote-code classes are not looked up."""
    if requested != "sdpa":
        return requested
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return requested
    if getattr(cls, "_supports_sdpa", True):
        return requested
    log.info("%s has no SDPA attention in transformers: its reference path runs HF's eager attention", cls.__name__)
    return "eager"


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    quantization: str = "none",
    double_quant: bool = True,
    seed: int = 0,
    memory_budget_gib: float | None = None,
):
    """Load (or build from config) a causal LM on `device` in `dtype`, frozen, ready for LoRA."""
    from transformers import AutoModelForCausalLM

    if trust_remote_code:
        log.warning("trust_remote_code is ON: the model repository's own Python code will run")
    path = Path(name_or_path)
    config_only = path.exists() and is_config_only(path)
    config = None
    if config_only or attn_implementation == "sdpa":  # read once: the class's SDPA support, the random build
        config = read_model_config(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        attn_implementation = supported_attention(config, attn_implementation)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if quantization in ("nf4", "fp4"):
        from ppalli.models.quant import bnb_config

        kwargs["quantization_config"] = bnb_config(quantization, double_quant, dtype)
    if config_only:
        config._attn_implementation = attn_implementation
        torch.manual_seed(seed)  # random weights are part of the run: same seed, same model
        if quantization in ("nf4", "fp4"):
            model = _build_quantized(config, device, dtype, quantization, double_quant, trust_remote_code,
                                     memory_budget_gib)
        else:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        model = _from_pretrained(name_or_path, revision, trust_remote_code, device, kwargs)
    model.requires_grad_(False)
    model.config.use_cache = False  # training never reads the KV cache; generation turns it back on
    return model


def _from_pretrained(name_or_path: str, revision, trust_remote_code: bool, device, kwargs: dict):
    """AutoModelForCausalLM.from_pretrained; a class that refuses SDPA (remote code supported_attention cannot
    look up) is loaded again with HF's eager attention, said in the log."""
    from transformers import AutoModelForCausalLM

    device_map = {"": torch.device(device)} if str(device) != "cpu" else None
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, device_map=device_map,
                                                    trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as e:
        if kwargs.get("attn_implementation") != "sdpa" or "attention implementation" not in str(e):
            raise ModelError(_load_hint(name_or_path, e)) from None
        log.info("%s: no SDPA attention in its class (%s); loading it with HF's eager attention", name_or_path,
                 str(e).splitlines()[0][:120])
        return _from_pretrained(name_or_path, revision, trust_remote_code, device,
                                {**kwargs, "attn_implementation": "eager"})
    except OSError as e:
        raise ModelError(_load_hint(name_or_path, e)) from None


def _build_quantized(config, device, dtype, quant: str, double_quant: bool, trust_remote_code: bool,
                     memory_budget_gib: float | None):
    """Random 16-bit weights, then 4-bit one decoder layer at a time.

    Built on the GPU when its 16-bit weights fit there (seconds), else allocated on the CPU without
    initializing (transformers' no_init_weights) and given random values layer by layer on the GPU, so the GPU
    never holds more than one 16-bit layer (an 8B model: 15 GiB in 16-bit, over an 8-12 GiB budget). The
    CPU's own random init of 8B took minutes on the H100 machine's 16 cores (2026-11-25)."""
    from transformers import AutoModelForCausalLM

    from ppalli.models.quant import quantize_model_4bit
    from ppalli.plan.memory import ModelSpec
    from ppalli.train.recompute import decoder_layers

    build_on = "cpu"
    if torch.device(device).type == "cuda":
        need = ModelSpec.from_config(config).n_params * torch.finfo(dtype).bits // 8 * 1.1
        room = torch.cuda.mem_get_info(torch.device(device))[0]
        if memory_budget_gib is not None:
            room = min(room, memory_budget_gib * 2**30)
        build_on = device if need < room else "cpu"
    uninitialized = build_on == "cpu"  # random values come layer by layer on `device` below
    with torch.device(build_on), _no_init(uninitialized):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    std = getattr(config, "initializer_range", 0.02)
    layers = decoder_layers(model)
    for layer in layers:
        layer.to(device)
        if uninitialized:
            _fill_random(layer, std)
        quantize_model_4bit(layer, quant_type=quant, double_quant=double_quant, compute_dtype=dtype, log_summary=False)
    model.to(device)
    if uninitialized:
        _fill_random(model, std, skip=layers)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    model.is_loaded_in_4bit = True  # PEFT reads it to pick its 4-bit LoRA layers
    log.info("built random weights on %s and quantized %d decoder layers to %s on %s, one layer at a time",
             build_on, len(layers), quant, device)
    return model


def _no_init(on: bool):
    """transformers' no_init_weights (5.17 and 5.24: transformers.initialization) when `on`."""
    if not on:
        return contextlib.nullcontext()
    from transformers.initialization import no_init_weights

    return no_init_weights()


@torch.no_grad()
def _fill_random(module: torch.nn.Module, std: float, skip: torch.nn.Module | None = None) -> None:
    """Normal(0, std) Linear and Embedding weights, zero biases (HF's init for these), for modules built
    uninitialized; norms keep the ones their constructors set. Modules under `skip` are left alone."""
    skipped = set() if skip is None else {id(m) for m in skip.modules()}
    for m in module.modules():
        if id(m) in skipped:
            continue
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and m.weight.is_floating_point():
            m.weight.normal_(0.0, std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()


def lora_targets(model, targets: list[str] | str) -> list[str] | str:
    """'all-linear' -> PEFT's own rule (every Linear but the output head); a list is checked against the model."""
    if targets == "all-linear":
        return "all-linear"
    if isinstance(targets, str):
        targets = [targets]
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names |= {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ModelError(f"lora.targets: {missing} not found in the model; its linear layers are "
                         f"{sorted(names)}")
    return list(targets)


def attach_lora(model, *, r: int, alpha: float, dropout: float, targets, use_dora: bool = False,
                use_rslora: bool = False, seed: int = 0):
    """Wrap the model with a fresh PEFT LoRA adapter (seeded init, so runs repeat)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets(model, targets),
                     use_dora=use_dora, use_rslora=use_rslora, bias="none", task_type="CAUSAL_LM")
    # No peft.prepare_model_for_kbit_training for 4-bit bases: it casts embeddings, norms and lm_head to fp32,
    # which turns the whole residual stream fp32 (twice the saved activations; 8B nf4 4x2048 ran out of
    # 80 GB on an H100, 2026-11-25). LoRA weights are leaves, so nothing upstream needs gradients either.
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their element count, not bytes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        n = p.numel()
        if p.dtype == torch.uint8 and hasattr(p, "quant_state"):
            n *= 2  # two 4-bit weights per byte
        total += n
    return trainable, total


@dataclass
class LoadedRun:
    model: object  # PeftModel in eval mode, KV cache on; the plain merged model after load_run(merge=True)
    tokenizer: object
    render_prompt: Callable[..., str]  # (messages, tools=None) -> the prompt text, as training rendered it
    config: object
    stop_ids: list[int]  # the template's EOS and end-of-turn tokens
    note: str = ""  # how the adapter runs (load_run's merge)
    template: object = None  # the run's data.templates.Template (serve reads its call layout off it)


def load_run(run_dir: str | Path, *, device: str | None = None, merge: bool = False) -> LoadedRun:
    """A trained run ready to generate: base model + the run's PEFT adapter + its tokenizer and template. With
    merge, the adapter is merged into a 16-bit base for decoding (export.merge.merge_for_inference: ~2x tokens
    a second); the model is then the plain HF model."""
    from peft import PeftModel

    from ppalli import config as C
    from ppalli.data.templates import resolve_template, stop_token_ids
    from ppalli.models.tokenizer import load_tokenizer

    run = Path(run_dir)
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise ModelError(f"{run}: no adapter/ here; give a run folder written by `ppalli train`")
    cfg = C.load(run / "config.yaml")
    if device is None:  # where the run trained, when it was pinned (a CPU run's numbers stay fp32 ones)
        device = cfg.plan.device if cfg.plan.device in ("cpu", "cuda") else (
            "cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else (
        torch.float16 if device == "cuda" else torch.float32)
    base = load_model(cfg.model.name_or_path, dtype=dtype, device=device, revision=cfg.model.revision,
                      trust_remote_code=cfg.model.trust_remote_code, seed=cfg.train.seed)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    model.config.use_cache = True
    tokenizer = load_tokenizer(run / "tokenizer")
    template = resolve_template(cfg.data.template, tokenizer)
    note = "adapter kept separate (PEFT)"
    if merge:
        from ppalli.export.merge import merge_for_inference

        model, note = merge_for_inference(model)
    return LoadedRun(model, tokenizer, prompt_renderer(template, cfg.data.system_prompt), cfg,
                     stop_token_ids(template, tokenizer), note, template)


def prompt_renderer(template, system_prompt: str | None) -> Callable[..., str]:
    """(messages, tools=None) -> the prompt text as training rendered its rows: the run's template, and its
    data.system_prompt in front of a conversation that brings no system turn of its own."""
    from ppalli.data.templates import render_prompt
    from ppalli.data.tokenize import with_system

    return lambda messages, tools=None: render_prompt(template, with_system(messages, system_prompt), tools)
