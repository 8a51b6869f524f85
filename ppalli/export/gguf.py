"""A merged 16-bit checkpoint (the folder `merge_adapter` writes) as one GGUF file, the format llama.cpp reads
and the tools built on it (Ollama, LM Studio, llama-cpp-python) load.

The file is written with the `gguf` package (llama.cpp's own writer and tensor-name map); what this module
adds is what the conversion must get right for the families ppalli exports:
- Llama's and Mistral's q and k rows are reordered per head: HF rotates the two halves of each head
  (rotate_half), while llama.cpp's "llama" graph rotates adjacent pairs, so row i of a head's first half goes to
  2i and row i of its second half to 2i + 1. Qwen2's and Qwen3's graphs rotate halves as HF does: rows stay.
- Llama 3.1+'s "llama3" RoPE scaling stretches the low frequencies at every length, not only past 8k tokens:
  llama.cpp reads it as a `rope_freqs` tensor of per-frequency divisors, computed here from the config.
- Gemma 2/3 scale by (1 + w) in their RMSNorms, llama.cpp by the stored weight: norms are stored as 1 + w. Their
  softcaps, sliding windows and Gemma 3's separate RoPE base for the sliding layers go in as hyperparameters.
- EXAONE 3 (native in transformers >= 5.24) and EXAONE 4: llama.cpp's exaone / exaone4 graphs, llama3 RoPE
  scaling as for Llama; a hybrid EXAONE 4 (sliding layers with RoPE, global ones without) goes in with its layer
  pattern, which llama.cpp honours at 64 layers (32B) only: other depths with windows are refused.
- Phi-3 / 3.5 / Phi-4-mini: fused qkv and gate_up as they are, the rotated share of each head, LongRoPE's long
  and short divisors and its cos/sin scale; the model's name says phi3 exactly when llama.cpp's Phi-3 token rule
  (chat tokens eat the whitespace after them) holds for the vocabulary.
- The vocabulary: byte-level BPE (Llama 3, Qwen, EXAONE) with its merges and the pre-tokenizer llama.cpp must use
  (named by its split regex), or SentencePiece's BPE (Llama 2, Mistral, SOLAR, Phi-3) with byte pieces and
  scores; special tokens as control tokens, whether a BOS is added, and the chat template.
Tensors stream from the safetensors shards one at a time (peak memory ~ the largest tensor in fp32, not the
model), and the file is written under a temporary name and renamed when complete.

tests/integration/test_export_gguf.py loads the files in llama.cpp (llama-cpp-python, when installed) and holds
its logits and tokenization to HF's.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ppalli.errors import ModelError

log = logging.getLogger("ppalli")

OUTTYPES = ("bf16", "f16", "q8_0", "f32", "q4_k_m", "q5_k_m", "q6_k")
# K-quants come from llama.cpp's own quantizer (through llama-cpp-python), run on a 16-bit file this module writes:
# its per-tensor choices (Q4_K_M keeps half of attn_v and ffn_down, and the output, in Q6_K) are the ones llama.cpp
# users get from llama-quantize.
LLAMA_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
# HF model_type -> llama.cpp architecture, and whether that graph rotates adjacent pairs (q/k rows reordered).
# EXAONE's and Phi-3's graphs rotate halves as HF does (NEOX in llama.cpp's terms); Phi-3's fused qkv_proj and
# gate_up_proj are what llama.cpp's phi3 reads (attn_qkv, ffn_up of 2 x n_ff split gate-first, as HF's chunk).
_ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
          "qwen3": ("qwen3", False), "gemma2": ("gemma2", False), "gemma3_text": ("gemma3", False),
          "exaone": ("exaone", False), "exaone4": ("exaone4", False), "phi3": ("phi3", False)}
# Gemma's RMSNorm scales by (1 + w): llama.cpp's Gemma graphs multiply by the stored weight, so they store 1 + w.
_GEMMAS = ("gemma2", "gemma3_text")
# The pre-tokenizer split regex of a byte-level BPE tokenizer -> llama.cpp's name for it (its converter names
# them by a hash of a test string's tokens; the regex is what decides those tokens).
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|NUMBERS"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2's split (what a ByteLevel pre-tokenizer with use_regex applies): EXAONE 4 splits so, and llama.cpp reads
# it as "gpt-2"; EXAONE 3 first cuts every digit apart (a Digits pre-tokenizer), llama.cpp's "exaone".
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# A pre-tokenizer's steps (_pre_tokenizer) -> llama.cpp's name for them
_PRE_TOKENIZERS = {(_SPLIT.replace("NUMBERS", r"\p{N}{1,3}"),): "llama-bpe",  # digits in runs of up to 3
                   (_SPLIT.replace("NUMBERS", r"\p{N}"),): "qwen2",  # one digit a piece
                   (_GPT2_SPLIT,): "gpt-2", ("digits", _GPT2_SPLIT): "exaone"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ModelError("GGUF export needs the gguf package: pip install 'gguf>=0.19,<0.20' (or ppalli's "
                         "gguf extra)") from None
    return gguf


def export_gguf(model_dir: str | Path, out_file: str | Path | None = None, outtype: str = "bf16") -> Path:
    """Write the HF checkpoint in `model_dir` (config.json, *.safetensors, the tokenizer) as one GGUF file.
    outtype: bf16 / f16 / f32 weights, q8_0 (8-bit blocks of 32; matrices whose rows are not a multiple of
    32 stay f16), or q4_k_m / q5_k_m / q6_k by llama.cpp's quantizer (llama-cpp-python needed). Norms and biases
    are f32 as llama.cpp keeps them. Returns the file's path (default model_dir/model-<outtype>.gguf)."""
    if outtype not in OUTTYPES:
        raise ModelError(f"GGUF type {outtype!r} is not one of {', '.join(OUTTYPES)}")
    model_dir = Path(model_dir)
    out = Path(out_file) if out_file else model_dir / f"model-{outtype}.gguf"
    if outtype in LLAMA_QUANTS:
        return _llama_quantize(model_dir, out, outtype)
    return _write(model_dir, out, outtype)


def _llama_quantize(model_dir: Path, out: Path, outtype: str) -> Path:
    """The checkpoint written at its own 16/32-bit precision beside `out`, then quantized by llama.cpp into
    `out` (disk: the 16-bit file too, until it is deleted at the end)."""
    try:
        import llama_cpp
    except ImportError:
        raise ModelError(f"GGUF {outtype} is made by llama.cpp's quantizer: pip install 'llama-cpp-python>=0.3.36' "
                         "(builds llama.cpp, ~5 min), or export f16 and run llama.cpp's llama-quantize on it") from None
    import ctypes

    cfg = _config(model_dir)
    source = {"float32": "f32", "float16": "f16"}.get(cfg.get("dtype", cfg.get("torch_dtype")), "bf16")
    src, tmp = out.with_name(out.name + f".partial-{source}"), out.with_name(out.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = os.cpu_count() or 1
    params.ftype = getattr(llama_cpp, LLAMA_QUANTS[outtype])
    quiet, level = logging.getLogger("llama-cpp-python"), logging.getLogger("llama-cpp-python").level
    try:
        _write(model_dir, src, source)
        quiet.setLevel(logging.ERROR)  # llama.cpp's line per tensor
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise ModelError(f"{model_dir}: llama.cpp's quantizer failed on {src.name} (status {status}) making "
                             f"{outtype}; the {source} file it read is written by `--gguf {source}`")
        os.replace(tmp, out)
    finally:
        quiet.setLevel(level)
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return out


def _write(model_dir: Path, out: Path, outtype: str) -> Path:
    gguf = _gguf()
    cfg = _config(model_dir)
    arch, _ = _ARCHS[cfg["model_type"]]
    plan = list(_tensor_plan(model_dir, cfg, outtype))
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _add_hparams(writer, cfg, outtype)
        added = _add_vocab(writer, model_dir, cfg["vocab_size"])
        writer.add_name(_general_name(model_dir.name, arch, added))
        for name, _, shape, qtype in plan:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, load, _, qtype in plan:
            writer.write_tensor_data(_encode(load(), qtype))
        writer.close()
    except BaseException:  # no half-written file left behind, whatever stopped the writing
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- config


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir}: no config.json; export GGUF from a merged model folder (ppalli export)")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    kind = cfg.get("model_type")
    if kind not in _ARCHS:
        raise ModelError(f"{path}: GGUF export covers {', '.join(_ARCHS)} models, not {kind!r}; the merged "
                         "folder loads in llama.cpp's convert_hf_to_gguf.py for the others")
    if "num_hidden_layers" not in cfg:  # EXAONE 3's remote-code config (num_layers, layer_norm_epsilon, ...)
        raise ModelError(f"{path}: a {kind!r} config without num_hidden_layers (written by the model's own remote "
                         "code); merge it with transformers >= 5.24, which runs EXAONE 3 natively, or use llama.cpp's "
                         "convert_hf_to_gguf.py on the folder")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", kind in ("mistral", "phi3")) else None
    if kind == "exaone4" and cfg.get("sliding_window") is not None:
        window = None  # applied: llama.cpp reads the layer pattern (_exaone4_layers, checked below)
    if kind in _GEMMAS:  # llama.cpp's Gemma graphs apply the window on HF's layers (every 2nd; 5 of 6)
        window = None
        scale, head_dim = cfg.get("query_pre_attn_scalar"), _head_dim(cfg)
        if scale not in (None, head_dim):  # llama.cpp takes the scale from the model size (27B's differs)
            log.warning("%s: query_pre_attn_scalar %s is not head_dim %d: llama.cpp scales attention by the "
                        "model's size class, which may differ", path, scale, head_dim)
    if window and window < cfg["max_position_embeddings"]:
        log.warning("%s: trained with a %d-token sliding window, which llama.cpp's %s graph does not apply: it "
                    "attends to the whole context, so past %d tokens its answers differ", path, window,
                    _ARCHS[kind][0], window)
    try:
        if _rope(cfg)[1].get("rope_type") == "longrope":
            longrope_factors(cfg)
        if kind == "exaone4" and cfg.get("sliding_window") is not None:
            _exaone4_layers(cfg)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    return cfg


def _exaone4_layers(cfg: dict) -> list[bool]:
    """Which of a hybrid EXAONE 4's layers slide. Its full-attention layers use no RoPE at all; llama.cpp's
    exaone4 graph knows that only when it runs the layers as hybrid, which it does for 64 layers (EXAONE 4.0
    32B): at any other depth it would rotate every layer, so such a model is refused."""
    kinds = cfg.get("layer_types") or []
    if cfg["num_hidden_layers"] != 64 or len(kinds) != 64:
        raise ModelError("EXAONE 4 with sliding-window layers exports to GGUF at 64 layers (32B) only: "
                         f"llama.cpp's exaone4 graph runs {cfg['num_hidden_layers']} layers as all-global with "
                         "RoPE, which this model's global (no-RoPE) layers are not")
    return [k == "sliding_attention" for k in kinds]


def _rope(cfg: dict) -> tuple[float, dict]:
    """(rope theta, scaling parameters or {}), from transformers 5's rope_parameters or 4.x's keys; for models
    with sliding-window layers of their own RoPE (Gemma 3), the full-attention layers'."""
    params = dict(cfg.get("rope_parameters") or {})
    params = dict(params.get("full_attention", params))
    theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    params.pop("partial_rotary_factor", None)
    scaling = params or dict(cfg.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kinds = ("default", "llama3", "linear") + (("longrope",) if cfg.get("model_type") == "phi3" else ())
    if kind not in kinds:
        raise ModelError(f"RoPE scaling {kind!r} is not exported to GGUF ({', '.join(kinds)} are)")
    return float(theta), ({} if kind == "default" else {**scaling, "rope_type": kind})


def _rope_dims(cfg: dict) -> int:
    """How many of a head's dimensions rotate (Phi-4-mini: 3/4 of them)."""
    params = cfg.get("rope_parameters") or {}
    return int(_head_dim(cfg) * params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))


def longrope_factors(cfg: dict) -> tuple[float, np.ndarray, np.ndarray]:
    """Phi-3's LongRoPE as llama.cpp takes it: (the cos/sin scale, the long and the short (rope dims / 2,)
    frequency divisors). The scale is transformers' rule: the config's attention_factor, else sqrt(1 + log(s) /
    log(original context)) for s = context / original context (1 when s <= 1)."""
    _, s = _rope(cfg)
    original = s.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    factor = s.get("factor") or cfg["max_position_embeddings"] / original
    scale = s.get("attention_factor") or (
        1.0 if factor <= 1 else float(np.sqrt(1 + np.log(factor) / np.log(original))))
    long, short = (np.asarray(s[f"{k}_factor"], dtype=np.float32) for k in ("long", "short"))
    if long.shape != short.shape or 2 * long.shape[0] != _rope_dims(cfg):
        raise ModelError(f"LongRoPE long_factor ({long.shape[0]}) and short_factor ({short.shape[0]}) need one entry "
                         f"per rotated pair ({_rope_dims(cfg) // 2})")
    return scale, long, short


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _add_hparams(writer, cfg: dict, outtype: str) -> None:
    gguf = _gguf()
    theta, scaling = _rope(cfg)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    writer.add_key_length(_head_dim(cfg))
    writer.add_value_length(_head_dim(cfg))
    writer.add_rope_dimension_count(_rope_dims(cfg))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if cfg["model_type"] in _GEMMAS:
        writer.add_sliding_window(cfg["sliding_window"])
        if cfg.get("attn_logit_softcapping"):
            writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        if cfg.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if cfg["model_type"] == "phi3":  # a window of 0 tells llama.cpp's phi3 there is none (it applies none anyway)
        writer.add_rope_scaling_orig_ctx_len(
            (cfg.get("rope_parameters") or {}).get("original_max_position_embeddings")
            or cfg.get("original_max_position_embeddings", cfg["max_position_embeddings"]))
        writer.add_sliding_window(cfg.get("sliding_window") or 0)
        if scaling.get("rope_type") == "longrope":
            writer.add_rope_scaling_attn_factors(longrope_factors(cfg)[0])
    if cfg["model_type"] == "exaone4" and cfg.get("sliding_window") is not None:
        writer.add_sliding_window(cfg["sliding_window"])
        writer.add_sliding_window_pattern(_exaone4_layers(cfg))
    if cfg["model_type"] == "gemma3_text":  # its sliding layers' own RoPE base (10,000 in Google's configs)
        local = (cfg.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
        writer.add_rope_freq_base_swa(float(local or cfg.get("rope_local_base_freq", 10000.0)))
    ftype = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f32": gguf.LlamaFileType.ALL_F32}[outtype]
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def llama3_rope_divisors(cfg: dict) -> np.ndarray:
    """(head_dim / 2,) float32: how much Llama 3.1's "llama3" scaling divides each RoPE frequency by. Wavelengths
    under original_context / high_freq_factor keep theirs (1), those over original_context / low_freq_factor
    are divided by `factor`, and between the two the inverse frequency blends linearly in the context-to-
    wavelength ratio."""
    theta, s = _rope(cfg)
    d = _head_dim(cfg)
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    wavelen = 2 * np.pi / inv_freq
    ctx, lo, hi, factor = (s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"],
                           s["factor"])
    smooth = np.clip((ctx / wavelen - lo) / (hi - lo), 0.0, 1.0)  # 0: long wavelengths, 1: short ones
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


# --------------------------------------------------------------------------- tensors


def _tensor_plan(model_dir: Path, cfg: dict, outtype: str) -> Iterator[tuple]:
    """(GGUF name, load() -> float32 numpy array, shape, GGML type) for each tensor, in file order."""
    gguf = _gguf()
    from safetensors import safe_open

    arch, pairs = _ARCHS[cfg["model_type"]]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg["num_hidden_layers"])
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors; export GGUF from the folder `ppalli export` writes")
    _, scaling = _rope(cfg)
    if scaling.get("rope_type") == "llama3":
        divisors = llama3_rope_divisors(cfg)
        yield "rope_freqs.weight", lambda: divisors, divisors.shape, gguf.GGMLQuantizationType.F32
    if scaling.get("rope_type") == "longrope":
        _, long, short = longrope_factors(cfg)
        for name, factors in (("rope_factors_long.weight", long), ("rope_factors_short.weight", short)):
            yield name, (lambda f=factors: f), factors.shape, gguf.GGMLQuantizationType.F32
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg.get("num_key_value_heads", cfg["num_attention_heads"])}
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys, shapes = list(f.keys()), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        for key in keys:
            if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and cfg.get("tie_word_embeddings")):
                continue
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ModelError(f"{file.name}: tensor {key!r} has no GGUF name for {arch}")
            proj = key.split(".")[-2]
            n_heads = heads.get(proj) if pairs else None  # a bias's entries are rows too
            plus_one = cfg["model_type"] in _GEMMAS and key.endswith("norm.weight")
            yield (name, _loader(file, key, n_heads, plus_one), shapes[key], _qtype(shapes[key], outtype))


def _loader(file: Path, key: str, pair_heads: int | None, plus_one: bool = False):
    def load() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            t = f.get_tensor(key).to(torch.float32)
        if pair_heads:
            t = pairs_from_halves(t, pair_heads)
        return (t + 1 if plus_one else t).numpy()
    return load


def pairs_from_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads * head_dim, d) q or k rows, each head's first and second halves interleaved: row i of the
    first half goes to 2i, row i of the second half to 2i + 1 (rotate_half's pairs made adjacent)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _qtype(shape: tuple, outtype: str):
    q = _gguf().GGMLQuantizationType
    if len(shape) < 2 or outtype == "f32":
        return q.F32
    if outtype == "q8_0":
        return q.Q8_0 if shape[-1] % 32 == 0 else q.F16
    return q.BF16 if outtype == "bf16" else q.F16


def _nbytes(shape: tuple, qtype) -> int:
    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


# --------------------------------------------------------------------------- vocabulary


def _general_name(name: str, arch: str, added: list[dict]) -> str:
    """The model's name in the file. llama.cpp keys one tokenizer rule on it: in a model named "phi3"/"phi-3" every
    special token eats the whitespace after it except <unk>, <s> and <|endoftext|> (Phi-3's HF tokenizer marks its
    chat tokens rstrip; GGUF has no field for that), and it needs those tokens and </s> to exist. So a phi3-arch
    name says phi3 exactly when the vocabulary is Phi-3's that way, whatever the output folder is called."""
    if arch != "phi3":
        return name
    name = re.sub(r"(?i)phi-?3", "phi", name)
    texts = {a["content"]: a for a in added}
    kept = ("<unk>", "<s>", "<|endoftext|>")
    chat = [a for a in added if a["special"] and a["content"] not in kept]
    phi3 = (all(t in texts for t in (*kept, "</s>")) and not any(texts[t]["rstrip"] for t in kept)
            and texts["</s>"]["rstrip"] and all(a["rstrip"] for a in chat))
    return f"{name} (phi3 tokens)" if phi3 else name


def _add_vocab(writer, model_dir: Path, n_vocab: int) -> list[dict]:
    """Tokens (id order, the embedding's rows: ids no token uses are [PAD<id>], unused), their types, how llama.cpp
    must split text, special ids, whether BOS is added, and the chat template. Returns the added tokens."""
    from ppalli.models.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    spec = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else {}
    model, decoder = spec.get("model", {}), (spec.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        kind = "gpt2"  # byte-level BPE: Llama 3, Qwen2/2.5/3
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        kind = "llama"  # SentencePiece's BPE with byte fallback: Llama 2, Mistral, SOLAR
    else:
        raise ModelError(f"{model_dir}: GGUF export covers byte-level BPE (Llama 3, Qwen) and SentencePiece BPE "
                         "(Llama 2, Mistral, SOLAR) tokenizers; this one is neither (use llama.cpp's "
                         "convert_hf_to_gguf.py on the folder)")
    tokens, types = _tokens(spec, n_vocab, byte_pieces=kind == "llama")
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "gpt2":
        writer.add_tokenizer_pre(_pre_tokenizer(spec, model_dir))
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    else:
        writer.add_token_scores(_piece_scores(model, tokens, types))
        writer.add_add_space_prefix(_prepends_space(spec))
        if tok.unk_token_id is not None:
            writer.add_unk_token_id(tok.unk_token_id)
    if tok.bos_token_id is not None:
        writer.add_bos_token_id(tok.bos_token_id)
    writer.add_add_bos_token(adds_bos(tok))
    if tok.eos_token_id is not None:
        writer.add_eos_token_id(tok.eos_token_id)
    if tok.pad_token_id is not None:
        writer.add_pad_token_id(tok.pad_token_id)
    if isinstance(tok.chat_template, str):
        writer.add_chat_template(tok.chat_template)
    return spec.get("added_tokens", [])


def adds_bos(tok) -> bool:
    """Whether the tokenizer puts BOS before a text by itself: llama.cpp and Ollama then add it to every prompt."""
    return tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]


def _tokens(spec: dict, n_vocab: int, byte_pieces: bool) -> tuple[list[str], list]:
    """(token texts, GGUF token types) for ids 0..n_vocab-1: the BPE vocabulary NORMAL (SentencePiece's <0xNN>
    pieces BYTE), added tokens CONTROL when special else USER_DEFINED, the unk piece UNKNOWN, the rest unused."""
    kinds = _gguf().TokenType
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [kinds.UNUSED] * n_vocab
    for text, i in spec["model"]["vocab"].items():
        if i < n_vocab:
            byte = byte_pieces and len(text) == 6 and text.startswith("<0x") and text.endswith(">")
            tokens[i], types[i] = text, kinds.BYTE if byte else kinds.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < n_vocab:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = kinds.CONTROL if added["special"] else kinds.USER_DEFINED
    unk = spec["model"].get("unk_token")
    if unk is not None and spec["model"]["vocab"].get(unk, n_vocab) < n_vocab:
        types[spec["model"]["vocab"][unk]] = kinds.UNKNOWN
    return tokens, types


def _piece_scores(model: dict, tokens: list[str], types: list) -> list[float]:
    """SentencePiece scores for llama.cpp, which merges the adjacent pair whose joined piece scores highest. A
    converted tokenizer keeps no scores, but its merges are listed in the joined pieces' score order, so a piece
    scores minus the rank of the first merge that makes it. Pieces no merge makes score 0 (single characters,
    bytes, specials: never merge results). Llama 2's runs of spaces ("▁▁", ...) score -1e9 in its model and are
    the last merges here: they stay last."""
    rank: dict[str, int] = {}
    for r, m in enumerate(model["merges"]):
        rank.setdefault("".join(m.split(" ", 1)) if isinstance(m, str) else "".join(m), r)
    normal = _gguf().TokenType.NORMAL
    return [-float(rank[text]) if kind == normal and text in rank else 0.0 for text, kind in zip(tokens, types)]


def _prepends_space(spec: dict) -> bool:
    """Whether the tokenizer puts SentencePiece's space marker before the text (a Metaspace pre-tokenizer, or the
    older normalizer that prepends it)."""
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")])
    return '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text or '"Prepend"' in text


def _pre_tokenizer(spec: dict, model_dir: Path) -> str:
    """llama.cpp's name for how the tokenizer cuts text before BPE, read from its pre-tokenizer's steps: a Split's
    regex, a ByteLevel that splits (GPT-2's regex), a Digits that cuts digits apart; a ByteLevel without its regex
    only maps bytes."""
    pre = spec.get("pre_tokenizer") or {}
    steps = []
    for part in pre.get("pretokenizers", [pre]):
        kind = part.get("type")
        if kind == "Split" and "Regex" in part.get("pattern", {}):
            steps.append(part["pattern"]["Regex"])
        elif kind == "ByteLevel" and part.get("add_prefix_space"):
            steps.append("a leading space added")  # none of llama.cpp's splits does that
        elif kind == "ByteLevel" and part.get("use_regex", True):
            steps.append(_GPT2_SPLIT)
        elif kind == "Digits" and part.get("individual_digits"):
            steps.append("digits")
        elif kind != "ByteLevel":
            steps.append(str(kind))
    if tuple(steps) not in _PRE_TOKENIZERS:
        raise ModelError(f"{model_dir}: the tokenizer's pre-tokenizer ({steps}) is not one ppalli names for "
                         "llama.cpp (Llama 3's, Qwen2's, GPT-2's, EXAONE's); use llama.cpp's convert_hf_to_gguf.py "
                         "on the folder")
    return _PRE_TOKENIZERS[tuple(steps)]
