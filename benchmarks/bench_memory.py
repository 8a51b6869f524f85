"""Measured HF + PEFT peak memory against ppalli's prediction (ppalli/plan/memory.py), on one GPU.

    python benchmarks/bench_memory.py --out benchmarks/results/<date>-<gpu>-memory.json   # ~3-5 min on an H100
    python benchmarks/bench_memory.py --tiny --out /tmp/mem.json                          # plumbing check, CPU ok

Each case builds Llama-3.2-1B or Llama-3.1-8B from its config with random weights on the GPU (speed and
memory do not depend on weight values), optionally stores the decoder linears in nf4 (bitsandbytes,
double quantization, blocksize 64, as transformers' BitsAndBytesConfig would), attaches PEFT LoRA r=16
alpha=16 dropout 0 on q,k,v,o,gate,up,down, and runs 3 steps of fused AdamW on random tokens with no
attention mask, the setting of BENCHMARKS.md's peer table. The loop keeps the model output alive through
backward (`out.loss.backward()`), as a plain loop does. `peak_gib` is torch.cuda.max_memory_allocated over
the 3 steps; reserved and the device's used memory are recorded too, to calibrate the context and
allocator-slack terms. prepare_model_for_kbit_training is not used (it casts embeddings and norms to fp32).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing ppalli

from ppalli.plan.memory import GIB, ModelSpec, estimate_peak_bytes  # noqa: E402

# The fields of the published config.json files that size the models (rope scaling does not change memory).
ARCHS = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=384, vocab_size=512, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Case:
    model: str
    quant: str  # "none" or "nf4"
    checkpointing: bool
    batch: int
    seq: int

    @property
    def name(self) -> str:
        gc_ = "GC" if self.checkpointing else "noGC"
        return f"{self.model} {self.quant} {gc_} {self.batch}x{self.seq}"


# Small first; the three BENCHMARKS.md HF + PEFT figures are among them (1B GC 8x2048, 8B GC 4x2048,
# 8B noGC 2x2048, 8B nf4 GC 4x2048). The largest predicted peak is ~64 GiB (8B noGC 2x2048 + slack).
CASES = [
    Case("llama-3.2-1b", "none", True, 8, 1024),
    Case("llama-3.2-1b", "none", False, 8, 1024),
    Case("llama-3.2-1b", "none", True, 8, 2048),
    Case("llama-3.2-1b", "none", False, 4, 2048),
    Case("llama-3.2-1b", "nf4", True, 8, 2048),
    Case("llama-3.2-1b", "nf4", False, 4, 1024),
    Case("llama-3.1-8b", "none", True, 4, 1024),
    Case("llama-3.1-8b", "none", True, 4, 2048),
    Case("llama-3.1-8b", "none", False, 2, 2048),
    Case("llama-3.1-8b", "nf4", True, 4, 2048),
    Case("llama-3.1-8b", "nf4", False, 2, 1024),
]
TINY_CASES = [Case("tiny", q, ckpt, 2, 64) for q in ("none", "nf4") for ckpt in (True, False)]


def quantize_linears(model: nn.Module, device: torch.device) -> None:
    """Swap every decoder nn.Linear (not lm_head) for a bitsandbytes nf4 Linear4bit holding the same weights."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or name == "lm_head":
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, blocksize=64,
                                       compress_statistics=True, quant_type="nf4", module=q)
            q.weight = weight.to(device)  # quantizes (bnb_quantized is False until then)
            setattr(parent, name, q)
            del child, weight
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT reads it to pick its 4-bit LoRA layer


def build(case: Case, device: torch.device) -> nn.Module:
    import peft
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**ARCHS[case.model], attn_implementation="sdpa", use_cache=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if case.quant == "nf4":
        quantize_linears(model, device)
    model.requires_grad_(False)
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora)


def train_steps(model: nn.Module, case: Case, device: torch.device, steps: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, ARCHS[case.model]["vocab_size"], (case.batch, case.seq), device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()  # `out` (with its logits) stays alive through backward
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        del out
    if cuda:
        torch.cuda.synchronize()
    result = {"loss_first": losses[0], "loss_last": losses[-1], "step_s": (time.perf_counter() - start) / steps}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        result |= {"peak_gib": torch.cuda.max_memory_allocated() / GIB,
                   "reserved_gib": torch.cuda.max_memory_reserved() / GIB,
                   "device_used_gib": (total - free) / GIB}  # context + what the allocator still holds
    return result


def predict(case: Case) -> dict:
    spec = ModelSpec.from_config({"model_type": "llama", **ARCHS[case.model]})
    est = estimate_peak_bytes(spec, lora_r=16, lora_targets=TARGETS, quant=case.quant, double_quant=True,
                              dtype_bytes=2, seq_len=case.seq, micro_batch=case.batch,
                              checkpointing="full" if case.checkpointing else "none", optimizer="adamw",
                              fused_ce=False, fast_path=False, attn_mask=False, device="cuda")
    return {"predicted_allocated_gib": est.allocated_gib, "predicted_peak_gib": est.peak_gib,
            "predicted_phase": est.phase, "predicted_breakdown_gib": est.breakdown_gib()}


def run_case(case: Case, device: torch.device, steps: int) -> dict:
    row = {"case": "memory", "stack": "hf", "model": case.model, "quant": case.quant,
           "checkpointing": "full" if case.checkpointing else "none", "batch": case.batch, "seq": case.seq,
           "setting": f"HF + PEFT LoRA r=16 all linear, {case.name}, fused AdamW, {steps} steps"} | predict(case)
    model = None
    try:
        model = build(case, device)
        row |= train_steps(model, case, device, steps)
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "peak_gib" in row:
        row["ratio"] = row["predicted_allocated_gib"] / row["peak_gib"]
    return row


def versions() -> dict:
    from importlib import metadata

    names = ("torch", "transformers", "peft", "bitsandbytes", "triton")
    found = {}
    for n in names:
        try:
            found[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return found | {"python": platform.python_version(), "cuda": torch.version.cuda}


def print_table(rows: list[dict]) -> None:
    head = f"{'case':<34} {'measured':>9} {'predicted':>9} {'ratio':>6} {'reserved':>9} {'dev used':>9} {'s/step':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        name = f"{r['model']} {r['quant']} {r['checkpointing']} {r['batch']}x{r['seq']}"
        if "error" in r or "peak_gib" not in r:
            print(f"{name:<34} {r.get('error', 'not measured (no CUDA)')}  predicted "
                  f"{r['predicted_allocated_gib']:.2f} GiB")
            continue
        print(f"{name:<34} {r['peak_gib']:>9.2f} {r['predicted_allocated_gib']:>9.2f} {r['ratio']:>6.3f} "
              f"{r['reserved_gib']:>9.2f} {r['device_used_gib']:>9.2f} {r['step_s']:>7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", default="", help="run only the cases whose name contains this text")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on whatever device there is (plumbing check)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = [c for c in (TINY_CASES if args.tiny else CASES) if args.only in c.name]
    rows = []
    for case in cases:
        rows.append(run_case(case, device, args.steps))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "predicted_breakdown_gib"}), flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result = {"device": name, "date": datetime.date.today().isoformat(), "versions": versions(), "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
