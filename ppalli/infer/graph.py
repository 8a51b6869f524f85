"""Decoding from a CUDA graph: a step's kernels launched by one replay instead of by Python.

A decode step of an 8B model is ~16 GB of weight reads, ~3.4 ms at the H200's 4.8 TB/s, but HF's eager
forward spends longer than that launching its ~600 kernels: `ppalli generate` ran at 49.5 tokens/s on
Llama-3.1-8B merged and 90.0 on Llama-3.2-1B (H200, 2026-12-04, benchmarks/bench_generate.py), bound by the
host. A graph needs fixed addresses and shapes, so the step runs on transformers' StaticCache (keys and values
preallocated for the whole answer, written at the layer's own device-side length counter), with the position
and the attention mask as device buffers this module updates inside the graph: the mask is handed to the model
as a ready 4D mask, which transformers passes to SDPA as it is (no host-side mask building).

The prompt runs eagerly (prefill); the first decode step too (it warms the kernels, as capture requires); the
second is captured and every later one replays it. Only where that is exact: SDPA attention (or eager attention
where ppalli's decode layers take every layer: they read the 4D mask themselves; Gemma 2 loads so), and a cache
whose every layer is full-length. A sliding-window layer past its window keeps a ring one mask cannot describe
(and HF counts its length in a Python int, which a replay cannot advance), but an answer whose prompt and new
tokens fit the window never needs one: there sliding attention is full attention, so the cache gets a plain
full-length layer in its place (`full_length_cache`). `graph_problem` says why not otherwise, and generate() then
decodes eagerly.
"""

from __future__ import annotations

import inspect

import torch
from transformers import StaticCache


def base_model(model) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model


def step_kwargs(model, cache) -> dict:
    """The forward's keywords of a decode step on `cache`, for this transformers version."""
    params = inspect.signature(base_model(model).forward).parameters
    # later transformers 5 releases renamed `past_key_values` to `cache` (the old name warns until 5.40)
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1  # the prompt's other positions would cost (T, V) logits
    return kwargs


# With the decode step compiled, the cache's slots are a power of two, at least this many: dynamo guards the shapes,
# so a chat's turns and eval's batches share one compiled step per (rows, slots) instead of compiling for every
# prompt length (21-36 s each for Llama-3.2-1B / 3.1-8B on an H200, results/2026-12-04-h200-s21-generate-compile-*),
# and a long chat compiles once per doubling (dynamo stops compiling a function after 8 shapes by default). The
# masked attention reads the unused slots too: at 4096 slots ~3% (8B) and ~5% (1B) of a one-row step's weight
# bytes, B rows B times that.
COMPILE_SLOTS = 256


def compiled_slots(max_len: int) -> int:
    """The cache's slots for a compiled decode step of up to max_len positions."""
    return max(COMPILE_SLOTS, 1 << (max_len - 1).bit_length())


def compile_problem(model) -> str | None:
    """Why the decode step of `model` is not compiled, or None: inductor writes Triton kernels for CUDA, and
    quantized bases were not run under torch.compile."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (torch.compile's CUDA kernels need it: pip install 'ppalli[fast]')"
    if _has_layers(model, ("Linear4bit", "Linear8bitLt")):
        return "a quantized base (its decode step was not run under torch.compile)"
    return None


def _has_layers(model, kinds: tuple[str, ...]) -> bool:
    """Whether any module's class name ends with one of `kinds` (bitsandbytes layers, also where ppalli swapped
    them in per instance: models/quant.py leaves no config entry)."""
    return any(type(m).__name__.endswith(kinds) for m in model.modules())


def _window_problem(config, max_len: int | None) -> str | None:
    """Why a StaticCache of max_len slots for `config` would not be all full-length layers, or None: layers of
    another kind, or sliding windows shorter than max_len (None: unknown length). A sliding layer's slots are
    min(window, max_len), so one built for 2^30 slots (allocated lazily: no memory) says its window."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    layers = StaticCache(config=config, max_cache_len=1 << 30).layers
    other = next((type(layer).__name__ for layer in layers if type(layer) not in (StaticLayer,
                                                                                 StaticSlidingWindowLayer)), None)
    if other is not None:
        return f"cache layers of kind {other} (not a full-length StaticLayer)"
    windows = [layer.max_cache_len for layer in layers if type(layer) is StaticSlidingWindowLayer]
    if windows and (max_len is None or max_len > min(windows)):
        return (f"sliding-window layers of {min(windows)} keys and {max_len or 'an unknown number of'} cache slots "
                "(past its window a layer's cache is a ring one mask cannot describe)")
    return None


def full_length_cache(config, max_len: int) -> StaticCache:
    """transformers' StaticCache of max_len slots with every sliding-window layer replaced by a full-length one (for
    max_len within the windows, which _window_problem checks: there the two attend to the same keys)."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    cache = StaticCache(config=config, max_cache_len=max_len)
    cache.layers = [StaticLayer(max_cache_len=max_len) if type(layer) is StaticSlidingWindowLayer else layer
                    for layer in cache.layers]
    return cache


def _quantization_problem(model) -> str | None:
    """Why the model's quantized layers rule the graph out, or None: bitsandbytes 4-bit bases decode from a graph
    (their gemv and dequantize kernels ran under capture on an H200, tests/gpu/test_graph_decode_gpu.py); 8-bit
    and other quantizers were never run there. The layers are looked at too (_has_layers)."""
    quant = getattr(getattr(base_model(model), "config", None), "quantization_config", None)
    if quant is not None:
        get = quant.get if isinstance(quant, dict) else lambda key, default=None: getattr(quant, key, default)
        method = get("quant_method", None)
        if getattr(method, "value", method) != "bitsandbytes" or not get("load_in_4bit", False):
            return "a quantized base other than bitsandbytes 4-bit (not checked under CUDA graph capture)"
    if _has_layers(model, ("Linear8bitLt",)):
        return "an 8-bit base (bitsandbytes' int8 kernels are not checked under CUDA graph capture)"
    return None


def graph_problem(model, device: torch.device, max_len: int | None = None) -> str | None:
    """Why decoding `model` from a CUDA graph over max_len cache slots (None: any) would not be exact or possible
    here, or None."""
    if device.type != "cuda":
        return f"the model is on {device.type}"
    config = getattr(base_model(model), "config", None)
    if config is None:
        return "the model has no transformers config"
    quant = _quantization_problem(model)
    if quant is not None:
        return quant
    attn = getattr(config, "_attn_implementation", None)
    if attn != "sdpa" and not (attn == "eager" and _decode_layers_take(model)):
        return f"attention implementation {attn!r} (the graph needs sdpa, or eager under ppalli's decode layers)"
    return _window_problem(config, max_len)


def _decode_layers_take(model) -> bool:
    """The decode layers run `model`: in place already (graph_problem asked inside decode_layers), or they can."""
    from ppalli.infer.decode_layers import decode_problem, swapped_in

    return swapped_in(model) or decode_problem(model) is None


class StaticDecoder:
    """The forward steps of `rows` sequences decoded together over a StaticCache of `max_len` slots; each call
    gives the logits of the rows' last positions (B, V) float32. With `graph`, decode steps after the first
    replay one CUDA graph; with `compile`, the step's forward is torch.compile's (fused norms, RoPE and
    elementwise ops: fewer kernels a step; the slots rounded up by compiled_slots).

    Rows are left-padded to one prompt width: slot t of the cache is column t of every row, while positions
    count each row's real tokens only, so a padded row is computed as it would be alone."""

    def __init__(self, model, max_len: int, device: torch.device, graph: bool, rows: int = 1, compile: bool = False):
        if compile:  # the decode step's forward through torch.compile, fixed shapes; the prefill stays eager
            max_len = compiled_slots(max_len)
        self.model, self.max_len, self.use_graph, self.compiled = model, max_len, graph, compile
        self.step_forward = torch.compile(model, dynamic=False) if compile else model
        self.kwargs = step_kwargs(model, full_length_cache(base_model(model).config, max_len))
        self.keys = torch.arange(max_len, device=device)  # (L,) the cache's slots
        self.valid = torch.ones((rows, max_len), dtype=torch.bool, device=device)  # (B, L) False: left padding
        self.slot = torch.zeros((), dtype=torch.long, device=device)  # the slot the next step writes
        self.token = torch.zeros((rows, 1), dtype=torch.long, device=device)  # the step's input ids
        self.pos = torch.zeros((rows, 1), dtype=torch.long, device=device)  # their positions
        self.mask = torch.zeros((rows, 1, 1, max_len), dtype=torch.bool, device=device)  # slots each row sees
        self.steps, self.graph, self.logits = 0, None, None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The prompts (B, T), left-padded where attention_mask (B, T) is 0, in one forward; their keys and values
        fill the cache's first T slots."""
        t = input_ids.shape[1]
        if t >= self.max_len:
            raise ValueError(f"prompt of {t} tokens leaves no room in a cache of {self.max_len}")
        if attention_mask is not None:
            self.valid[:, :t] = attention_mask.bool()
        real = self.valid[:, :t].long()  # (B, T)
        positions = (real.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        causal = self.keys[None, :] <= torch.arange(t, device=self.keys.device)[:, None]  # (T, L)
        mask = (causal[None] & self.valid[:, None, :])[:, None]  # (B, 1, T, L)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **self.kwargs)
        self.pos.copy_(positions[:, -1:] + 1)
        self.slot.fill_(t)
        return out.logits[:, -1].float()

    def _step(self) -> torch.Tensor:
        """The decode step on the buffers: self.token at self.pos into self.slot, then both move on."""
        self.mask.copy_((self.valid & (self.keys <= self.slot))[:, None, None])
        out = self.step_forward(input_ids=self.token, attention_mask=self.mask, position_ids=self.pos, **self.kwargs)
        self.pos.add_(1)
        self.slot.add_(1)
        return out.logits[:, -1].float()

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The next tokens (B, 1) -> the logits after them (B, V). The returned tensor is reused by the next call."""
        self.steps += 1
        self.token.copy_(input_ids)
        if not self.use_graph or self.steps == 1:
            return self._warm() if self.use_graph else self._step()
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()  # recorded, not run: the replay below runs it
        self.graph.replay()
        return self.logits

    def _warm(self) -> torch.Tensor:
        """An eager step on a side stream, as capture asks (lazy initialisation, cuBLAS workspaces)."""
        side, main = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            logits = self._step()
        main.wait_stream(side)
        return logits
