"""Merge a LoRA adapter into its base model and save a plain 16-bit checkpoint (safetensors, sharded if large).

A 4-bit (QLoRA) base is dequantized to 16-bit and the adapter merged there, on purpose: merging back into
4-bit rounds W + scale * B @ A onto the NF4 grid again, and users report quality drops after such merges
(PEFT's own 4-bit merge warns that it "may get different generations due to rounding errors"). The merge is
computed in fp32 and rounded once to `dtype`. Before saving, the merged model's logits are compared with
the adapter model's on a few fixed inputs; the max difference is logged and written to ppalli_merge.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ppalli.errors import ModelError
from ppalli.kernels.nf4 import dequantize_weight

log = logging.getLogger("ppalli")

# Largest max |logit difference| accepted, as a share of the largest |logit| of the adapter model.
# fp32: only summation order differs (measured ~1e-6 on the test's tiny Llama). 16-bit: both models round
# weights and activations at 2**-8 (bf16) or 2**-11 (fp16) relative, the merged one its W + BA as well;
# a wrong merge (no scale, wrong adapter, transposed delta) misses by far more than these bounds.
_REL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
_CHECK_SHAPE = (2, 16)  # (sequences, tokens) of the fixed check inputs


def _is_4bit(module: torch.nn.Module) -> bool:
    return hasattr(getattr(module, "weight", None), "quant_state")


def _as_peft_model(model, adapter):
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if adapter is not None:
            raise ModelError("merge_adapter: got a PeftModel and an adapter; pass the base model with the "
                             "adapter folder, or the PeftModel alone")
        return model
    if adapter is None:
        raise ModelError("merge_adapter: no adapter; pass an adapter folder (RUN/adapter) or a PeftModel")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: no adapter_config.json; give the run's adapter folder, e.g. runs/NAME/adapter")
    return PeftModel.from_pretrained(model, str(adapter))


def _dense(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.nn.Linear:
    out_f, in_f = weight.shape
    lin = torch.nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.requires_grad_(False)


def _base_weight(base: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a Linear or bnb Linear4bit, in fp32."""
    w = dequantize_weight(base, torch.float32) if _is_4bit(base) else base.weight.detach().float()
    return w, None if base.bias is None else base.bias.detach().float()


def _merged_linear(layer, dtype: torch.dtype) -> torch.nn.Linear:
    """W + scale * B @ A (+ scale * lora bias) for every active adapter of a PEFT LoRA Linear, in fp32."""
    base = layer.get_base_layer()
    if not isinstance(base, torch.nn.Linear) or getattr(layer, "fan_in_fan_out", False):
        raise ModelError(f"LoRA on {type(base).__name__} layers is not merged by ppalli; use PEFT's "
                         "merge_and_unload on a 16-bit base for it")
    w, bias = _base_weight(base)
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}):
            raise ModelError(f"adapter '{name}' is a LoRA variant (DoRA or similar) that ppalli does not merge; "
                             "use PEFT's merge_and_unload on a 16-bit base")
        lora_a, lora_b, scale = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        w += (lora_b.weight.float() @ lora_a.weight.float()).to(w.device) * scale
        if lora_b.bias is not None:
            bias = (0.0 if bias is None else bias) + lora_b.bias.detach().float().to(w.device) * scale
    return _dense(w, bias, dtype)


def _replace(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, new)


def _unwrap_peft(model: torch.nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """Replace LoRA layers by merged Linears and 4-bit layers by dense ones, in place: (merged, dequantized)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    merged = dequantized = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            _replace(model, name, _merged_linear(mod, dtype))
            merged += 1
        elif isinstance(mod, ModulesToSaveWrapper):  # a fully trained copy (e.g. lm_head with new tokens)
            active = mod.active_adapters[0] if mod.active_adapters else None
            _replace(model, name, mod.modules_to_save[active] if active in mod.modules_to_save
                     else mod.original_module)
        elif isinstance(mod, AuxiliaryTrainingWrapper):
            raise ModelError(f"{name}: PEFT {type(mod).__name__} is not merged by ppalli; use PEFT's "
                             "merge_and_unload")
    for name, mod in list(model.named_modules()):
        if _is_4bit(mod):
            _replace(model, name, _dense(*_base_weight(mod), dtype))
            dequantized += 1
    return merged, dequantized


def merge_for_inference(peft_model) -> tuple[torch.nn.Module, str]:
    """(the model to decode with, a line saying why): the adapter merged in place into a 16-bit base's
    projections (fp32 sum, one rounding, as the export merges), so each token runs one GEMM per projection
    instead of PEFT's base + rank-r branch. H200, bf16, batch 1, 128 new tokens (results/*-s19-generate-*.json):
    Llama-3.2-1B 34.8 -> 90.0 tokens/s, Llama-3.1-8B 18.2 -> 49.5 (PEFT's merge_adapter, which keeps its
    wrappers, 41.0 -> 77.4 at 1B in the same call). Rounding W + BA to 16 bits moves logits a
    little (the export's check bounds it), so greedy text can differ in places. A 4-bit base keeps the adapter
    separate (merging would dequantize it: 4x its memory)."""
    base = peft_model.get_base_model()
    if any(_is_4bit(m) for m in base.modules()):
        return peft_model, "adapter kept separate: the base is 4-bit (a merge would dequantize it)"
    dtype = next(base.parameters()).dtype
    try:
        merged, _ = _unwrap_peft(base, dtype)
    except ModelError as e:
        raise ModelError(f"{e}; or decode unmerged with --no-merge") from None
    return base.eval(), (f"adapter merged into {merged} {str(dtype).removeprefix('torch.')} projections for "
                         "decoding (one GEMM each; --no-merge keeps PEFT's separate branch)")


def _strip_quantization(model: torch.nn.Module) -> None:
    """Forget the 4-bit loading config so save_pretrained writes (and from_pretrained reads) a 16-bit model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_loaded_in_4bit", False):
        model.is_loaded_in_4bit = False


def _check_inputs(model: torch.nn.Module) -> torch.Tensor:
    emb = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, emb.num_embeddings, _CHECK_SHAPE, generator=gen).to(emb.weight.device)


@torch.no_grad()
def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float().cpu()


def logit_diff(ref: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(max |ref - got|, the largest difference accepted for a merge into `dtype`)."""
    tol = _REL_TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
    return (ref - got).abs().max().item(), tol


def merge_adapter(model, adapter: str | Path | None = None, *, out_dir: str | Path,
                  dtype: torch.dtype = torch.bfloat16, tokenizer=None, max_shard_size: str | int = "5GB",
                  check: bool = True) -> Path:
    """Merge a LoRA adapter into its (4-bit or 16-bit) base and save a 16-bit HF checkpoint to `out_dir`.

    `model` is a PeftModel, or the base model with `adapter` an adapter folder. The model is consumed: its
    LoRA and 4-bit layers are replaced in place (no second copy in memory). With `check`, a merged model
    whose logits differ from the adapter model's by more than the dtype's tolerance is not saved.
    """
    if dtype not in _REL_TOLERANCE:
        raise ModelError(f"merge dtype must be bfloat16, float16 or float32, not {dtype}")
    peft_model = _as_peft_model(model, adapter).eval()
    base = peft_model.get_base_model()
    was_4bit = any(_is_4bit(m) for m in base.modules())
    if was_4bit:
        from ppalli.models.quant import keep_standard_layout

        keep_standard_layout(base)  # the check below must not let bnb repack layers on AVX512-BF16 CPUs
    inputs = _check_inputs(base) if check else None
    ref = _logits(peft_model, inputs) if check else None
    if was_4bit:
        log.info("merging into %s weights, not back into 4-bit, on purpose: re-quantizing W + BA loses "
                 "quality (users report worse outputs after 4-bit merges)", str(dtype).removeprefix("torch."))
    merged, dequantized = _unwrap_peft(base, dtype)
    _strip_quantization(base)
    base.to(dtype)
    report = {"dtype": str(dtype).removeprefix("torch."), "base_was_4bit": was_4bit,
              "merged_lora_layers": merged, "dequantized_layers": dequantized}
    if check:
        report.update(_verify(ref, _logits(base, inputs), dtype))
    out = Path(out_dir)
    base.save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "ppalli_merge.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("merged %d LoRA layers (%d 4-bit layers dequantized) into %s: %s", merged, dequantized, out,
             f"max |logit diff| {report['max_abs_logit_diff']:.3g}" if check else "check skipped")
    return out


def _verify(ref: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> dict:
    diff, tol = logit_diff(ref, got, dtype)
    if not diff <= tol:  # also catches NaN
        raise ModelError(f"the merged model's logits differ from the adapter model's by {diff:.3g} (> {tol:.3g} "
                         f"for {dtype}); nothing was saved. Merge in float32 to rule out rounding, or pass "
                         "check=False to save anyway")
    return {"max_abs_logit_diff": diff, "tolerance": tol}
