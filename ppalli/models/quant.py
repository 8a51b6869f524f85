"""4-bit base weights (QLoRA) through bitsandbytes: quantize a loaded model, or load a checkpoint 4-bit.

Two ways to a 4-bit base:
- `quantize_model_4bit(model, ...)` swaps every nn.Linear of a loaded 16/32-bit model for a bitsandbytes
  Linear4bit on the instance (logged; nothing patched globally). It serves models built from a config and
  16-bit checkpoints already in memory; the 16-bit weights are held until each layer is swapped.
- `AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(...))` quantizes while
  loading, one tensor at a time, so the 16-bit model never sits in memory whole: the way for large
  checkpoints. A checkpoint that bnb saved in 4-bit loads the same way, its quant_state read back as saved.
Both give bnb Linear4bit layers that PEFT wraps with its 4-bit LoRA layers.
"""

from __future__ import annotations

import logging

import torch

from ppalli.errors import ModelError

log = logging.getLogger("ppalli")

QUANT_TYPES = ("nf4", "fp4")
# bitsandbytes' 4-bit block (Params4bit's default, the only one BitsAndBytesConfig uses): 64 weights per absmax.
BLOCKSIZE = 64


def _import_bnb():
    try:
        import bitsandbytes
    except ImportError as e:
        raise ModelError(f"4-bit weights need bitsandbytes, which failed to import ({e}); install it with "
                         "`pip install ppalli[qlora]` or set plan.quantization: none") from None
    return bitsandbytes


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ModelError(f"4-bit quant_type {quant_type!r} is not one of {QUANT_TYPES} (nf4 is QLoRA's choice)")


def bnb_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16):
    """The transformers BitsAndBytesConfig that loads a checkpoint with 4-bit Linear weights:
    `AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config("nf4", True, torch.bfloat16))`."""
    _check_quant_type(quant_type)
    _import_bnb()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def _to_linear4bit(lin: torch.nn.Linear, bnb, quant_type: str, double_quant: bool, compute_dtype: torch.dtype):
    """A Linear4bit holding `lin`'s weight quantized on `lin`'s device (Params4bit quantizes on `.to(device)`)."""
    device = lin.weight.device
    new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                            compress_statistics=double_quant, quant_type=quant_type, device="meta")
    new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=double_quant,
                                   quant_type=quant_type, module=new).to(device)
    if lin.bias is not None:
        new.bias = torch.nn.Parameter(lin.bias.data, requires_grad=lin.bias.requires_grad)
    # On AVX512-BF16 CPUs, bnb 0.50's first no-grad eval forward repacks the weight in place into a CPU-only
    # layout with a bf16 absmax and computes in bf16 (nn/modules.py Linear4bit.forward). Keep the standard
    # layout: CPU numerics then match the GPU's, and dequantize / merge can read the weight.
    new.support_avx512bf16_for_cpu = False
    new.train(lin.training)
    return new


def check_4bit_support(device: torch.device | str, *, quant_type: str = "nf4",
                       compute_dtype: torch.dtype = torch.float32) -> None:
    """Raise a ModelError unless bitsandbytes can quantize and run a 4-bit layer on `device` (a 64x64 probe)."""
    _check_quant_type(quant_type)
    bnb = _import_bnb()
    try:
        probe = _to_linear4bit(torch.nn.Linear(BLOCKSIZE, BLOCKSIZE, device=device), bnb, quant_type, True,
                               compute_dtype)
        probe(torch.ones(2, BLOCKSIZE, device=device, dtype=compute_dtype))
    except Exception as e:  # any failure here means 4-bit layers cannot run on this device
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"bitsandbytes {bnb.__version__} cannot run 4-bit layers on {device} ({first}); "
                         "set plan.quantization: none, or use a CUDA GPU with bitsandbytes >= 0.45") from None


def _skipped(name: str, skip_modules) -> bool:
    """`lm_head` matches `lm_head` and `model.lm_head`; `mlp` matches every layer under an `mlp` module."""
    parts = name.split(".")
    return any(name == s or name.endswith("." + s) or s in parts for s in skip_modules)


def _targets(model: torch.nn.Module, skip_modules) -> tuple[list[tuple[str, torch.nn.Linear]], list[str]]:
    """(name, nn.Linear) pairs to quantize, and the names kept 16-bit (skipped, or tied to an embedding)."""
    tied = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    targets, kept = [], []
    for name, mod in model.named_modules():
        if type(mod) is not torch.nn.Linear:  # exactly nn.Linear: Linear4bit and PEFT layers stay as they are
            continue
        if _skipped(name, skip_modules) or id(mod.weight) in tied:
            kept.append(name)
        else:
            targets.append((name, mod))
    return targets, kept


def _check_block_aligned(targets) -> None:
    bad = [f"{n} (in_features={m.in_features})" for n, m in targets if m.in_features % BLOCKSIZE]
    if bad:
        raise ModelError(f"{len(bad)} linear layer(s) have in_features not a multiple of the 4-bit block size "
                         f"{BLOCKSIZE}: {', '.join(bad[:4])}; bitsandbytes 0.50's CPU dequantize mis-scales rows "
                         "whose blocks cross a row end, so such weights would not load portably; add them to "
                         "skip_modules to keep them 16-bit")


def quantize_model_4bit(model: torch.nn.Module, *, quant_type: str = "nf4", double_quant: bool = True,
                        compute_dtype: torch.dtype, skip_modules=("lm_head",), log_summary: bool = True
                        ) -> torch.nn.Module:
    """Swap the model's nn.Linear layers for bitsandbytes Linear4bit on the fly, in place; returns the model.

    Each layer is quantized on its own device (blocks of 64, NF4 or FP4, `double_quant` also quantizes
    the absmax). `skip_modules` names stay 16-bit, as do Linear weights tied to an embedding.
    """
    _check_quant_type(quant_type)
    bnb = _import_bnb()
    targets, kept = _targets(model, skip_modules)
    if not targets:
        raise ModelError(f"no nn.Linear layers to quantize (skip_modules={list(skip_modules)}); "
                         "is the model already 4-bit?")
    devices = {m.weight.device for _, m in targets}
    if "meta" in {d.type for d in devices}:
        raise ModelError("the model's weights are on the meta device; load them before quantizing")
    _check_block_aligned(targets)
    for device in devices:
        check_4bit_support(device, quant_type=quant_type, compute_dtype=compute_dtype)
    before = after = 0
    for name, lin in targets:
        new = _to_linear4bit(lin, bnb, quant_type, double_quant, compute_dtype)
        before += lin.weight.numel() * lin.weight.element_size()
        after += _bytes_4bit(new)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        log.debug("quantize_model_4bit: %s -> Linear4bit(%s)", name, quant_type)
    model.is_loaded_in_4bit = True  # what transformers' bnb loader sets; PEFT reads it to pick 4-bit LoRA layers
    report = log.info if log_summary else log.debug
    report("quantized %d Linear layers to %s on %s (double quant %s, compute %s): %.2f MiB -> %.2f MiB; "
             "kept 16-bit: %s", len(targets), quant_type, ", ".join(sorted(map(str, devices))),
             "on" if double_quant else "off", str(compute_dtype).removeprefix("torch."), before / 2**20,
             after / 2**20, ", ".join(kept) or "none")
    return model


def keep_standard_layout(model: torch.nn.Module) -> int:
    """Opt every bnb Linear4bit out of bitsandbytes' CPU inference repacking, and undo it where it has run.

    On AVX512-BF16 CPUs, bnb 0.50's Linear4bit.forward (eval, no grad) rewrites the weight in place into a
    CPU-only layout with a bf16 absmax (functional.py _convert_weight_packed_for_cpu) that dequantize, merge
    and the GPU cannot read. Undoing it here loses nothing further: the bf16 absmax is kept exactly (in fp32).
    Returns how many layers were restored.
    """
    restored = 0
    for name, mod in model.named_modules():
        if not hasattr(mod, "support_avx512bf16_for_cpu"):
            continue
        mod.support_avx512bf16_for_cpu = False
        if getattr(getattr(mod.weight, "quant_state", None), "packing_format_for_cpu", False):
            _unpack_cpu_layout(mod)
            restored += 1
            log.debug("restored the standard 4-bit layout of %s", name)
    if restored:
        log.info("restored the standard 4-bit layout of %d layers that bitsandbytes had repacked for CPU "
                 "inference (their absmax stays bf16)", restored)
    return restored


def _unpack_cpu_layout(layer) -> None:
    """Invert _convert_weight_packed_for_cpu: (N, K/2) bytes, each 64-code group of 32 rows x 2 columns stored
    as 32 bytes (low nibbles rows 0-15, high nibbles rows 16-31), absmax (K/blocksize, N) bf16."""
    qs = layer.weight.quant_state
    packed = layer.weight.data
    n, k = packed.shape[0], packed.shape[1] * 2
    groups = packed.reshape(-1, 32)
    codes = torch.cat([groups & 15, groups >> 4], dim=1)  # (N/32 * K/2, 64): row-in-group-major, 2 per row
    codes = codes.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(-1)  # row-major (N, K) codes
    standard = (codes[0::2] << 4 | codes[1::2]).to(torch.uint8).reshape(qs.original_qshape)
    storage = getattr(qs, "original_storage_type", None)
    layer.weight.data = standard.view(storage) if storage else standard
    qs.absmax = qs.absmax.T.reshape(-1).float().contiguous()  # (N * K/blocksize,) in block order
    qs.nested, qs.state2, qs.offset = False, None, None
    qs.dtype = qs.original_dtype
    qs.packing_format_for_cpu = False


def _bytes_4bit(layer) -> int:
    qs = layer.weight.quant_state
    extra = [qs.absmax] + ([qs.state2.absmax] if qs.nested else [])
    return layer.weight.numel() * layer.weight.element_size() + sum(t.numel() * t.element_size() for t in extra)
