"""Helpers for training a model on the fast path and on the reference path (HF + PEFT) from one seed on
Korean chit-chat rows (ko_chatbot_qa, Qwen2.5 tokenizer), and comparing the per-step losses. Used by
tests/integration/test_fast_convergence.py (a tiny model, CPU) and tests/gpu/test_convergence_gpu.py.

Each step is one packed row of the step's samples ("Q\\nA<eos>", prompt tokens masked) on the fast path
(position_ids + cu_seqlens, fused lm_head + loss) and the same samples run one by one through HF + PEFT on
the reference path (logits + F.cross_entropy(reduction="sum")): the step's loss is the summed token loss
over the trained tokens of all its samples, divided by their count.
"""

import copy
import csv

import torch

from ppalli.models.fast import apply_fast_path
from ppalli.models.fast_loss import fast_causal_lm_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The stated per-step tolerance between the fast and the reference path in bf16 (relative step-loss
# difference), with the rule beside it that the fast path is no further from an fp32 run of the same weights
# than the reference is. The reference's loss comes from bf16 logits (2**-8 relative) and AdamW's first steps
# move every adapter element by lr whatever its gradient's size, so rounding-level differences show. Seen
# (2026-11-25): CPU tiny Llama 10 steps 6.3e-3 (16-bit) and 7.5e-3 (NF4); H100, hidden 1024, 50 steps,
# 8.4e-3 and 1.30e-2; 1B `ppalli train` 50 steps 3.9e-3. A broken bf16 product (the CPU interpreter's bf16
# tl.dot, before _utils.dot_upcast) gave 0.11.
BF16_RTOL = 2e-2


def samples(shared_data, n: int, max_tokens: int):
    """n tokenized (input_ids, labels) pairs of the first rows of at most max_tokens, in file order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared_data / "tokenizer_qwen2.5"))
    out = []
    with open(shared_data / "ko_chatbot_qa" / "ChatbotData.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            prompt = tok(row["Q"] + "\n").input_ids
            answer = tok(row["A"]).input_ids + [tok.eos_token_id]
            if len(prompt) + len(answer) <= max_tokens:
                out.append((prompt + answer, [-100] * len(prompt) + answer))
            if len(out) == n:
                return out
    raise AssertionError(f"only {len(out)} rows of at most {max_tokens} tokens")


def remap(rows):
    """Token ids -> 0..V-1 over the ids the rows use (labels keep -100); returns (rows, V)."""
    used = sorted({t for ids, _ in rows for t in ids})
    index = {t: i for i, t in enumerate(used)}
    remapped = [([index[t] for t in ids], [index[t] if t != -100 else -100 for t in labels]) for ids, labels in rows]
    return remapped, len(used)


def lora_llama(vocab: int, dtype: torch.dtype, device: str = "cpu", hidden: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, rank: int = 8, quant: str | None = None):
    """A random Llama (seed 0, frozen, in dtype) with PEFT LoRA on every projection (adapters fp32); quant
    ("nf4", "fp4") swaps the decoder's Linears for bitsandbytes 4-bit ones first (ppalli's quantizer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # initializer_range 0.1: LoRA on a frozen random base learns only if the frozen head is not too flat
    # (tests/integration/tiny.py measured 0.1 trains where HF's 0.02 stalls).
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=2048, initializer_range=0.1, rms_norm_eps=1e-6, use_cache=False)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).requires_grad_(False)
    if quant:
        from ppalli.models.quant import quantize_model_4bit

        quantize_model_4bit(model, quant_type=quant, compute_dtype=dtype, log_summary=False)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS)
    return get_peft_model(model, lora)


def widened(model):
    """A copy of a PEFT model that computes in fp32 on the same weights: 4-bit base layers become fp32
    Linears of their dequantized weights (the 4-bit run's "truth"), everything else is upcast."""
    from torch import nn

    from ppalli.kernels.lora_linear import base_weight

    wide = copy.deepcopy(model)
    for module in list(wide.modules()):
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(base.weight, "quant_state"):
            lin = nn.Linear(base.in_features, base.out_features, bias=False, device=base.weight.device)
            lin.weight = nn.Parameter(base_weight(base, torch.float32).clone(), requires_grad=False)
            module.base_layer = lin
    return wide.float()


def reference_step(model, rows):
    """Sum of token losses and trained tokens of the rows, one forward each."""
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for ids, labels in rows:
        ids, labels = torch.tensor([ids], device=device), torch.tensor([labels], device=device)
        logits = model(input_ids=ids).logits[:, :-1]
        total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                                          ignore_index=-100, reduction="sum")
        count += int((labels[:, 1:] != -100).sum())
    return total, count


def fast_step(model, rows):
    """The same rows packed into one."""
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([[t for s in rows for t in s[0]]], device=device)
    labels = torch.tensor([[t for s in rows for t in s[1]]], device=device)
    lengths = [len(s[0]) for s in rows]
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    loss, count = fast_causal_lm_loss(model, ids, labels, position_ids=pos, cu_seqlens=cu, max_seqlen=max(lengths))
    return loss, int(count)


def train(model, steps, step_fn, lr: float):
    """Per-step losses of AdamW over the steps (each a list of rows)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for rows in steps:
        loss_sum, count = step_fn(model, rows)
        loss = loss_sum / count  # the trained-token mean of the whole step (CONTRACTS.md)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def both_paths(model, steps, lr: float):
    """(reference losses, fast losses, worst relative step difference, a table of both) of two copies of
    model, one on the fast path."""
    fast = copy.deepcopy(model)
    handle = apply_fast_path(fast, attention_backend="auto", log=lambda line: None)
    ref_losses = train(model, steps, reference_step, lr)
    fast_losses = train(fast, steps, fast_step, lr)
    handle.revert()
    return ref_losses, fast_losses, worst_relative(fast_losses, ref_losses), table(ref_losses, fast_losses)


def worst_relative(losses, ref) -> float:
    return max(abs(x - r) / abs(r) for x, r in zip(losses, ref))


def mean_relative(losses, ref) -> float:
    return sum(abs(x - r) / abs(r) for x, r in zip(losses, ref)) / len(ref)


def table(ref_losses, fast_losses) -> str:
    return "step ref fast\n" + "\n".join(f"{i:3d} {r:.6f} {f:.6f}"
                                         for i, (r, f) in enumerate(zip(ref_losses, fast_losses)))
