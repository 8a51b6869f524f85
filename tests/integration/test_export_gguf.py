"""GGUF export: tiny Llama-3 and Qwen2 checkpoints with their real tokenizers, written as GGUF and read back
(tensors, RoPE, vocabulary) with the gguf package; with llama-cpp-python installed, loaded in llama.cpp, whose
logits and tokens must equal HF's."""

import json

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from ppalli.errors import ModelError  # noqa: E402
from ppalli.export.gguf import export_gguf, llama3_rope_divisors, pairs_from_halves  # noqa: E402
from ppalli.models.tokenizer import load_tokenizer  # noqa: E402

TEXTS = ["안녕하세요! 오늘 날씨가 정말 좋네요.", "1234567 tokens, 빨리 빨리.\n\n  def f(x): return x**2",
         "  leading, inner   runs and trailing   ", "한국어 English 混合 😀\ttabs\r\nCRLF <|im_end|> <s>",
         "<|user|>\n 뭐 먹지?<|end|>\n<|assistant|>\n  비빔밥<|endoftext|> 끝"]
# (no "</s>" in them: llama.cpp makes any vocabulary entry spelled "</s>" a control token, Qwen's plain one too)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, initializer_range=0.1)


# case -> (HF model_type, tokenizer folder, config overrides); "llama" and "qwen2" start from the real
# Llama-3.2-1B / Qwen2.5-0.5B configs (llama3 RoPE scaling; q/k/v biases; tied embeddings), the rest from
# transformers' defaults. SentencePiece cases (Llama 2's tokenizer) stand for Llama 2, Mistral and SOLAR.
CASES = {
    "llama": ("llama", "tokenizer_llama3", {}),
    "qwen2": ("qwen2", "tokenizer_qwen2.5", {"layer_types": ["full_attention"] * 2}),
    "qwen3": ("qwen3", "tokenizer_qwen2.5", {"vocab_size": 151936, "head_dim": 32, "tie_word_embeddings": True,
                                             "layer_types": ["full_attention"] * 2}),
    "llama2": ("llama", "tokenizer_llama2", {"vocab_size": 32000, "tie_word_embeddings": False}),
    "mistral": ("mistral", "tokenizer_llama2", {"vocab_size": 32000, "sliding_window": None}),
    # a window shorter than the texts, on every other layer as Gemma 2's; both softcaps
    "gemma2": ("gemma2", "tokenizer_llama2", {"vocab_size": 32000, "query_pre_attn_scalar": 16, "sliding_window": 8,
                                              "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    # 7 layers: 5 sliding, the 6th global (Gemma 3's pattern), the last sliding; each kind with its RoPE base, the
    # global one scaled (linear, 8) as Gemma 3 4B+; q/k norms
    "gemma3": ("gemma3_text", "tokenizer_llama2", {
        "vocab_size": 32000, "num_hidden_layers": 7, "query_pre_attn_scalar": 16, "sliding_window": 8,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    # EXAONE 3.5's llama3 RoPE scaling; the tokenizer Llama 3's vocabulary (multi-digit pieces, so cutting digits
    # apart matters) cut as EXAONE 3's (PRE below)
    "exaone": ("exaone", "tokenizer_llama3", {"vocab_size": 128256, "max_position_embeddings": 32768,
                                               "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}),
    # EXAONE 4.0 1.2B's shape of config: no window, every layer with (llama3-scaled) RoPE, q/k norms, post-norms
    "exaone4": ("exaone4", "tokenizer_qwen2.5", {"vocab_size": 151936, "sliding_window": None,
                                                 "max_position_embeddings": 65536,
                                                 "layer_types": ["full_attention"] * 2, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 1e6, "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}),
    # EXAONE 4.0 32B's hybrid: 64 layers, 3 sliding (RoPE, window) then 1 global (no RoPE)
    "exaone4_hybrid": ("exaone4", "tokenizer_qwen2.5", {"vocab_size": 151936, "num_hidden_layers": 64,
                                                        "sliding_window": 8, "layer_types": (
        ["sliding_attention"] * 3 + ["full_attention"]) * 16}),
    # Phi-3's fused qkv / gate_up with half of each head rotated (Phi-4-mini rotates 3/4)
    "phi3": ("phi3", "tokenizer_llama2", {"vocab_size": 32064, "sliding_window": None, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
    # Phi-3.5-mini's LongRoPE: per-pair divisors (short ones within the original context) and the cos/sin scale
    "phi3_longrope": ("phi3", "tokenizer_llama2", {
        "vocab_size": 32064, "sliding_window": None, "max_position_embeddings": 16384,
        "original_max_position_embeddings": 4096, "rope_parameters": {
            "rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 4096,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]}}),
}
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "llama2": "llama", "mistral": "llama",
             "gemma2": "gemma2", "gemma3": "gemma3", "exaone": "exaone", "exaone4": "exaone4",
             "exaone4_hybrid": "exaone4", "phi3": "phi3", "phi3_longrope": "phi3"}
# Byte-level BPE pre-tokenizers as EXAONE's tokenizers cut text (3: digits apart, then GPT-2's split; 4: GPT-2's),
# on Llama 3's and Qwen's vocabularies: llama.cpp must cut as HF does, whatever the merges were trained on.
_GPT2_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE = {"exaone": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2_BYTES]},
       "exaone4": _GPT2_BYTES, "exaone4_hybrid": _GPT2_BYTES}
# K-quants work in blocks of 256 along a row: rows of 256 and 512 (64 and 128 would leave llama.cpp's fallbacks only)
K_QUANT_CASES = {"llama2_wide": ("llama", "tokenizer_llama2", {
    "vocab_size": 32000, "hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "tie_word_embeddings": False})}
# Phi-3's tokenizer: Llama 2's vocabulary and its chat tokens at 32000-32010, each eating the whitespace after it
# (rstrip) but <|endoftext|>; </s> too, and not special (Phi-3-mini's tokenizer_config.json)
PHI3_ADDED = [("<|endoftext|>", False)] + [(t, True) for t in (
    "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>", "<|placeholder4|>", "<|system|>",
    "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")]
PRE_NAME = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "exaone": "exaone", "exaone4": "gpt-2",
            "exaone4_hybrid": "gpt-2"}


def _checkpoint(tmp_path, shared_data, case: str, dtype=torch.float32):
    """A random tiny model of `case` saved with its family's real tokenizer: (folder, model, tokenizer)."""
    model_type, tokenizer, extra = CASES[case] if case in CASES else K_QUANT_CASES[case]
    real = {"llama": shared_data / "tokenizer_llama3" / "config_llama-3.2-1b.json",
            "qwen2": shared_data / "tokenizer_qwen2.5" / "config.json"}.get(case)
    kwargs = {**SMALL, **extra}
    try:
        cfg = AutoConfig.from_pretrained(real, **kwargs) if real else AutoConfig.for_model(model_type, **kwargs)
    except ValueError:  # EXAONE 3 is native from transformers 5.24
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    tok = load_tokenizer(shared_data / tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():  # random, not default, biases and norms: the export must carry them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("proj.bias"):
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp_path / "merged"  # not the case's name: llama.cpp reads Phi-3's token rule off the model's name
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if case in PRE:
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        (folder / "tokenizer.json").write_text(json.dumps({**spec, "pre_tokenizer": PRE[case]}), encoding="utf-8")
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # Qwen2Tokenizer would rebuild Qwen's own split
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        tok = load_tokenizer(folder)
    if case.startswith("phi3"):
        _phi3_tokens(folder)
        tok = load_tokenizer(folder)
    return folder, model, tok


def _phi3_tokens(folder) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    added = [{**a, "rstrip": True, "special": False} if a["content"] == "</s>" else a for a in spec["added_tokens"]]
    added += [{"id": 32000 + i, "content": text, "single_word": False, "lstrip": False, "rstrip": rstrip,
               "normalized": False, "special": True} for i, (text, rstrip) in enumerate(PHI3_ADDED)]
    (folder / "tokenizer.json").write_text(json.dumps({**spec, "added_tokens": added}), encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("added_tokens_decoder", None)  # tokenizer.json's list is the one read
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def llama_cpp_model(path):
    """llama_cpp.Llama(path, n_ctx=128, logits_all=True, f32 KV cache, 2 threads) without llama.cpp's extra CPU buffer
    types (model_params.use_extra_bufts, which llama-cpp-python's constructor does not take): on a CPU with AMX
    (AMX_INT8 = 1 in llama_cpp.llama_print_system_info(), this machine 2026-12-05) a native build moves the
    weights into AMX buffers and its AMX matmul segfaults in the first decode (the same crash as
    ggml-org/llama.cpp#20824; every case of the tokens-and-logits test here, f32 and q8_0). The plain CPU
    kernels are what is read then, on every machine alike."""
    from unittest import mock

    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", params):
        return llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, type_k=0,
                               type_v=0)


def llama_cpp_reads(folder, model, tok, outtype: str):
    """Export `folder` as `outtype` and load it in llama.cpp (its KV cache in f32, 0 = GGML_TYPE_F32); for each of
    TEXTS: (text, HF's token ids, whether llama.cpp's equal them, llama.cpp's largest logit error against HF's
    fp32 forward on them, relative to the largest logit)."""
    llm = llama_cpp_model(export_gguf(folder, outtype=outtype))
    rows = []
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        same = llm.tokenize(text.encode(), add_bos=tok.bos_token_id is not None, special=True) == ids
        llm.reset()
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].float().numpy()
        rows.append((text, ids, same, float(np.abs(got - want).max() / np.abs(want).max())))
    llm.close()
    return rows


def _fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except (ValueError, TypeError, IndexError):
            continue
    return out


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("case", list(CASES))
def test_f32_file_holds_the_checkpoint_and_its_tokenizer(tmp_path, shared_data, case):
    folder, model, tok = _checkpoint(tmp_path, shared_data, case)
    path = export_gguf(folder, outtype="f32")
    assert path == folder / "model-f32.gguf" and not list(folder.glob("*.partial"))
    reader = gguf.GGUFReader(path)
    meta, tensors = _fields(reader), _tensors(reader)
    cfg, arch = model.config, GGUF_ARCH[case]
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == cfg.num_hidden_layers and meta[f"{arch}.attention.head_count_kv"] == 2
    assert meta[f"{arch}.attention.key_length"] == (getattr(cfg, "head_dim", None)
                                                    or cfg.hidden_size // cfg.num_attention_heads)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(rope["rope_theta"])
    sentencepiece = CASES[case][1] == "tokenizer_llama2"
    assert meta["tokenizer.ggml.model"] == ("llama" if sentencepiece else "gpt2")
    if not sentencepiece:
        assert meta["tokenizer.ggml.pre"] == PRE_NAME[case]
    assert meta["tokenizer.ggml.add_bos_token"] == (tok.bos_token_id is not None)
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta.get("tokenizer.chat_template") == tok.chat_template
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size  # one per embedding row: Qwen's 271 unused rows as [PAD<id>]
    assert all(tokens[i] == text for text, i in tok.get_vocab().items())
    assert ("output.weight" in tensors) == (not cfg.tie_word_embeddings)  # tied: llama.cpp reads token_embd
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        want = value + 1 if arch.startswith("gemma") and key.endswith("norm.weight") else value  # Gemma's 1 + w
        if arch == "llama" and (".q_proj." in key or ".k_proj." in key):
            want = pairs_from_halves(value, 4 if ".q_proj." in key else 2)
        got = np.asarray(tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))].data).reshape(value.shape)
        assert np.array_equal(got, want.numpy()), key
    if case == "llama":
        assert np.array_equal(np.asarray(tensors["rope_freqs.weight"].data), llama3_rope_divisors(cfg.to_dict()))


def test_llama3_rope_divisors_give_transformers_frequencies(shared_data):
    """The divisors llama.cpp applies to the plain RoPE frequencies reproduce transformers' own llama3-scaled
    inv_freq (an independent implementation of the same rule)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = AutoConfig.from_pretrained(shared_data / "tokenizer_llama3" / "config_llama-3.2-1b.json")
    scaled = LlamaRotaryEmbedding(cfg).inv_freq.double().numpy()
    d = cfg.head_dim
    plain = 1.0 / cfg.rope_parameters["rope_theta"] ** (np.arange(0, d, 2) / d)
    divisors = llama3_rope_divisors(cfg.to_dict())
    assert divisors.min() == pytest.approx(1.0) and divisors.max() == pytest.approx(32.0)
    np.testing.assert_allclose(plain / divisors, scaled, rtol=1e-6)


def test_pairs_from_halves_turns_hf_rotation_into_adjacent_pairs():
    """q = x W^T rotated HF's way (rotate_half over each head's halves) equals, row for row once reordered, the
    same x through the reordered W rotated llama.cpp's way (adjacent pairs (2i, 2i+1) by the same angles)."""
    torch.manual_seed(0)
    heads, d, dim, t = 3, 8, 12, 5
    w, x = torch.randn(heads * d, dim, dtype=torch.float64), torch.randn(t, dim, dtype=torch.float64)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * torch.rand(d // 2, dtype=torch.float64)  # (t, d/2)
    cos, sin = angle.cos(), angle.sin()
    q = (x @ w.T).view(t, heads, d)
    a, b = q[..., : d // 2], q[..., d // 2:]
    hf = torch.cat([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)
    p = (x @ pairs_from_halves(w, heads).T).view(t, heads, d // 2, 2)
    a, b = p[..., 0], p[..., 1]
    ggml = torch.stack([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)
    assert torch.allclose(pairs_from_halves(hf.reshape(t, -1).T, heads).T, ggml.reshape(t, -1))


@pytest.mark.parametrize("outtype,tol", [("bf16", 2**-8), ("f16", 2**-11), ("q8_0", 2**-7)])
def test_16_and_8_bit_files_round_each_weight_once(tmp_path, shared_data, outtype, tol):
    """Matrices in the chosen type within one rounding of the weight (q8_0: blocks of 32 scaled by their
    largest |w| / 127), norms and biases exact in f32."""
    folder, model, _ = _checkpoint(tmp_path, shared_data, "qwen2")
    tensors = _tensors(gguf.GGUFReader(export_gguf(folder, outtype=outtype)))
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2).get_name(key, try_suffixes=(".weight", ".bias"))
        t = tensors[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(value.shape)
        if value.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, value.numpy()), key
            continue
        assert t.tensor_type.name == outtype.upper(), key
        scale = np.abs(value.numpy()).max() if outtype == "q8_0" else np.abs(value.numpy())
        if outtype == "f16":  # below 2**-14 f16 is subnormal: steps of 2**-24, absolute
            scale = np.maximum(scale, 2**-14)
        assert (np.abs(got - value.numpy()) <= tol * scale + 1e-30).all(), key


def test_other_families_and_settings_are_refused_with_the_way_out(tmp_path, shared_data, monkeypatch):
    folder, _, _ = _checkpoint(tmp_path, shared_data, "llama")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "olmo2"}))
    with pytest.raises(ModelError, match="config.json: GGUF export covers llama, .* not 'olmo2'.*convert_hf_to_gguf"):
        export_gguf(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ModelError, match="RoPE scaling 'yarn'"):
        export_gguf(folder)
    with pytest.raises(ModelError, match="not one of"):
        export_gguf(folder, outtype="q4_k")
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "exaone4", "sliding_window": 8,
                                                    "layer_types": ["sliding_attention", "full_attention"]}))
    with pytest.raises(ModelError, match="EXAONE 4 with sliding-window layers exports to GGUF at 64 layers"):
        export_gguf(folder)
    remote = {k: v for k, v in cfg.items() if k != "num_hidden_layers"}
    (folder / "config.json").write_text(json.dumps({**remote, "model_type": "exaone", "num_layers": 2}))
    with pytest.raises(ModelError, match="without num_hidden_layers .*transformers >= 5.24"):
        export_gguf(folder)
    longrope = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 4096,
                "short_factor": [1.0] * 3, "long_factor": [2.0] * 3}
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "phi3", "rope_parameters": longrope}))
    with pytest.raises(ModelError, match=r"long_factor \(3\) and short_factor \(3\) need one entry per rotated pair "
                                         r"\(8\)"):
        export_gguf(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    from ppalli.export import gguf as module

    monkeypatch.setattr(module, "_encode", lambda data, qtype: 1 / 0)  # a failure halfway through the tensors
    with pytest.raises(ZeroDivisionError):
        export_gguf(folder)
    assert not list(folder.glob("*.gguf*"))  # neither a file nor its .partial


# --------------------------------------------------------------------------- in llama.cpp


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_reads_the_tokens_and_logits_hf_computes(tmp_path, shared_data, case):
    """llama.cpp (llama-cpp-python) on the f32 file, its KV cache in f32 too: the same token ids as HF's tokenizer
    for Korean, digits, code, spaces and emoji, and HF's fp32 logits (Llama, Qwen, Mistral to ~7e-7 of the
    largest; Gemma 2's graph in llama.cpp differs by ~5e-4 with tensors equal to HF's, see the f32 test);
    q8_0's logits near (its rounding)."""
    pytest.importorskip("llama_cpp")
    folder, model, tok = _checkpoint(tmp_path, shared_data, case)
    # measured (benchmarks/results/2026-12-05-cpu-gguf-llama-cpp.txt): f32 <= 3.9e-6, Gemma 2/3 <= 1.7e-3 (their
    # tensors equal HF's: the gap is llama.cpp's Gemma graph); q8_0 <= 4.8e-2, Gemma <= 1.2e-1. A wrong export
    # misses by far more: Llama without the q/k reordering 5.5e-1, Gemma 3 with a wrong local RoPE base 4.8e-1,
    # without its global RoPE scaling 1.4e-1; Phi-3's LongRoPE without its cos/sin scale 1.7e-1, long and short
    # divisors swapped 5.9e-1; the hybrid EXAONE 4's layer pattern inverted 1.35 (f32). EXAONE's tokenizers cut as
    # Qwen2's (or EXAONE 3's as GPT-2's) give other ids for digits and the chat text.
    gemma = case.startswith("gemma")
    # 64 random layers (the hybrid EXAONE 4) compound q8_0's rounding to 1.6e-1; its f32 file checks the graph.
    # Gemma 3 on the 49-token chat text: one position at 1.7e-3 (f32) / 1.2e-1 (q8_0), the rest <= 7.8e-4, and
    # <= 6.7e-4 over 101 tokens (2026-12-05-cpu-gguf-llama-cpp.json): an outlier, not drift along positions.
    q8 = 1.8e-1 if gemma else 2.5e-1 if case == "exaone4_hybrid" else 8e-2
    for outtype, tol in (("f32", 4e-3 if gemma else 1e-5), ("q8_0", q8)):
        for text, _, same, err in llama_cpp_reads(folder, model, tok, outtype):
            assert same, text
            assert err < tol, f"{case} {outtype}: max logit error {err:.2e} of the largest logit"


def test_k_quants_are_llama_cpps_own(tmp_path, shared_data):
    """q6_k, q5_k_m and q4_k_m come from llama.cpp's quantizer run on the 16-bit file: the file types and
    per-tensor choices llama-quantize makes (Q4_K_M: the output and half the layers' attn_v / ffn_down in Q6_K),
    token ids as HF's, logit errors growing as the bits shrink; no intermediate file left behind."""
    pytest.importorskip("llama_cpp")
    folder, model, tok = _checkpoint(tmp_path, shared_data, "llama2_wide")
    errors = {}
    for outtype, ftype, types in (("q8_0", "MOSTLY_Q8_0", {"Q8_0"}), ("q6_k", "MOSTLY_Q6_K", {"Q6_K"}),
                                  ("q5_k_m", "MOSTLY_Q5_K_M", {"Q5_K", "Q6_K"}),
                                  ("q4_k_m", "MOSTLY_Q4_K_M", {"Q4_K", "Q6_K"})):
        rows = llama_cpp_reads(folder, model, tok, outtype)
        assert all(same for _, _, same, _ in rows), outtype
        errors[outtype] = max(err for *_, err in rows)
        reader = gguf.GGUFReader(folder / f"model-{outtype}.gguf")
        assert _fields(reader)["general.file_type"] == getattr(gguf.LlamaFileType, ftype)
        matrices = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
        assert set(matrices.values()) == types, outtype
        if outtype == "q4_k_m":
            assert {n for n, t in matrices.items() if t == "Q6_K"} == {"output.weight", "blk.1.attn_v.weight",
                                                                    "blk.1.ffn_down.weight"}
    # measured (CPU, 2026-12-05): q8_0 7.6e-2, q6_k 2.2e-1, q5_k_m 3.7e-1, q4_k_m 8.7e-1 of the largest logit; the
    # logit rows' centred cosine with HF's >= 0.996, 0.972, 0.908, 0.605. A random model with 0.1-std weights shows
    # every rounding, so no absolute bound here: the ids, the types and the order are what a wrong export breaks.
    assert errors["q8_0"] < errors["q6_k"] < errors["q5_k_m"] < errors["q4_k_m"], errors
    assert sorted(p.name for p in folder.iterdir() if ".partial" in p.name) == []


def test_phi3_name_carries_llama_cpps_token_rule_only_with_phi3s_tokens(tmp_path, shared_data):
    """llama.cpp strips the whitespace after Phi-3's chat tokens (HF's rstrip) only in a model whose name says
    phi3, and then requires <|endoftext|> and the rest: the name says phi3 for Phi-3's tokenizer in a folder of any
    name (without it, "<|end|>\n<|assistant|>" tokenizes otherwise), and never for another tokenizer, even in a
    folder called phi3 (llama.cpp would fail to load it)."""
    folder, model, tok = _checkpoint(tmp_path, shared_data, "phi3")
    assert "phi3" in _fields(gguf.GGUFReader(export_gguf(folder, outtype="f32")))["general.name"]
    plain = tmp_path / "phi3-ko"
    folder.rename(plain)
    llama2 = load_tokenizer(shared_data / "tokenizer_llama2")
    llama2.save_pretrained(plain)
    assert _fields(gguf.GGUFReader(export_gguf(plain, outtype="f32")))["general.name"] == "phi-ko"
    pytest.importorskip("llama_cpp")
    for text, _, same, err in llama_cpp_reads(plain, model, llama2, "f32"):
        assert same and err < 1e-5, text


def test_cli_export_writes_the_merged_folder_and_its_gguf(make_cfg, quiet, capsys):
    """`ppalli export RUN --out DIR --gguf q8_0` after a tiny Qwen2 run trained on ppalli's chatml template (not
    Qwen2.5's own, which adds a default system turn): the merged folder and its GGUF carry the template the run
    trained with (HF's apply_chat_template renders the run's prompts) and its stop tokens; llama.cpp's (when
    installed) logits on that prompt near the merged HF model's."""
    from ppalli.cli import main
    from ppalli.models.load import load_run
    from ppalli.train import recipe

    run = recipe.train(make_cfg("qwen2", name="exported", train__max_steps=2), print_fn=quiet).run_dir
    out = run.parent / "merged"
    assert main(["export", str(run), "--out", str(out), "--dtype", "float32", "--gguf", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert f"GGUF: {out / 'model-q8_0.gguf'}" in printed and f"ollama create NAME -f {out / 'Modelfile'}" in printed
    modelfile = (out / "Modelfile").read_text().splitlines()  # its TEMPLATE: test_export_modelfile.py
    assert modelfile[1] == "FROM ./model-q8_0.gguf" and modelfile[2].startswith('TEMPLATE """{{- range .Messages')
    messages = [{"role": "user", "content": "오늘 뭐 먹지?"}]  # no system turn: Qwen2.5's own would add one
    trained, tok = load_run(run), load_tokenizer(out)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == trained.render_prompt(messages) and "You are Qwen" not in prompt
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == trained.stop_ids
    assert tok.convert_tokens_to_ids("<|im_end|>") in trained.stop_ids
    meta = _fields(gguf.GGUFReader(out / "model-q8_0.gguf"))
    assert meta["general.architecture"] == "qwen2" and meta["tokenizer.chat_template"] == tok.chat_template
    pytest.importorskip("llama_cpp")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok(prompt)["input_ids"]
    llm = llama_cpp_model(out / "model-q8_0.gguf")
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 5e-2
    del llm
