"""Decoding speed of a LoRA model through ppalli's generate loop: the adapter as PEFT runs it (base + rank-r
branch in every projection) against the same adapter merged into the 16-bit weights (ppalli's
`merge_for_inference`, what chat, generate and eval use; PEFT's `merge_adapter` with --peft-merge).

    python benchmarks/bench_generate.py --model CONFIG.json [--new 128] [--prompt 64] --out results.json

Random weights built from the config (speed does not depend on their values); LoRA r 16 on q, k, v, o, gate,
up, down with random B (a trained adapter's branch costs the same); greedy, no stop token, batch 1. Both eager
(a growing cache, the step launched from Python) and, on CUDA, the merged model replayed from a CUDA graph over
a static cache (ppalli/infer/graph.py), the path generate() takes by default; with --compile also from the
graph of the torch.compile'd step (`--compile` of chat, generate and eval). --nf4: a QLoRA model (NF4 base, the
adapter unmerged), eager against the graph.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from ppalli.export.merge import merge_for_inference  # noqa: E402
from ppalli.infer.generate import generate  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _NoStop:
    """What generate reads of a tokenizer when nothing is streamed: no EOS, so every run makes --new tokens."""

    eos_token_id = None
    pad_token_id = 0  # left padding of batched rows


def lora_model(config_path: Path, device: str, dtype: torch.dtype, nf4: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base.generation_config.eos_token_id = None
    if nf4:  # QLoRA's base: the projections NF4 with double quant, as `ppalli train` quantizes them
        from ppalli.models.quant import quantize_model_4bit

        quantize_model_4bit(base, compute_dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    return model.eval()


def _timed(run, repeats: int) -> tuple[float, float, list]:
    """(the first call's seconds: warm-up, capture and any compile; the median of `repeats` more; the last output)."""
    def once():
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        start = time.perf_counter()
        out = run()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        return time.perf_counter() - start, out

    first, out = once()
    times = []
    for _ in range(repeats):
        seconds, out = once()
        times.append(seconds)
    return first, sorted(times)[len(times) // 2], out


def tokens_per_s(model, prompt: torch.Tensor, new: int, repeats: int, graph: bool | None = None,
                 compile: bool = False) -> tuple[float, list[int], float]:
    """(new tokens a second of one sequence, its tokens, the first call's seconds)."""
    first, median, out = _timed(lambda: generate(model, _NoStop(), prompt, max_new_tokens=new, greedy=True,
                                                 graph=graph, compile=compile), repeats)
    return new / median, out, first


def rows_tokens_per_s(model, prompt: torch.Tensor, rows: int, new: int, graph: bool | None,
                      compile: bool = False, sampled: bool = False) -> tuple[float, list, float]:
    """generate_rows, greedy (eval's answers) or sampled with a seed a row (`generate --file`): `rows` copies of the
    prompt cut to different lengths, so the batch is left-padded; new tokens of all rows per second, median of 3
    after a warm-up."""
    from ppalli.infer.generate import Sampling, generate_rows

    ids = prompt[0].tolist()
    prompts = [ids[: len(ids) - (i % 8) * 4] for i in range(rows)]
    sampling = Sampling() if sampled else Sampling(greedy=True)
    seeds = list(range(rows)) if sampled else None
    first, median, out = _timed(lambda: generate_rows(model, _NoStop(), prompts, max_new_tokens=new, graph=graph,
                                                      compile=compile, sampling=sampling, seeds=seeds), 3)
    return rows * new / median, out, first


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def nf4_run(model, prompt: torch.Tensor, args) -> dict:
    """A 4-bit base with its adapter unmerged (what chat decodes after QLoRA): eager against the CUDA graph,
    one sequence and 16 rows."""
    eager, out_eager, _ = tokens_per_s(model, prompt, args.new, args.repeats, graph=False)
    graphed, out_graph, _ = tokens_per_s(model, prompt, args.new, args.repeats)
    eager_rows, rows_eager, _ = rows_tokens_per_s(model, prompt, 16, args.new, graph=False)
    graph_rows, rows_graph, _ = rows_tokens_per_s(model, prompt, 16, args.new, graph=None)
    return {"device": torch.cuda.get_device_name(), "model": str(args.model),
            "base": "nf4 (double quant), bf16 compute", "prompt": args.prompt, "new": args.new,
            "unmerged_tokens_per_s": round(eager, 1),
            "graph_tokens_per_s": round(graphed, 1),
            "graph_tokens_equal_eager_before_first_difference": _first_difference(out_eager, out_graph),
            "rows16_eager_tokens_per_s": round(eager_rows, 1), "rows16_graph_tokens_per_s": round(graph_rows, 1),
            "rows16_rows_equal": sum(a == b for a, b in zip(rows_eager, rows_graph))}


def graph_run(model, prompt: torch.Tensor, out_merged: list[int], args) -> dict:
    """The merged model decoded from the CUDA graph, one sequence and 16 rows; with --compile also from the
    graph of the torch.compile'd step (its first call's seconds hold the compile)."""
    graphed, out_graphed, _ = tokens_per_s(model, prompt, args.new, args.repeats)
    eager_rows, out_eager, _ = rows_tokens_per_s(model, prompt, 16, args.new, graph=False)
    graph_rows, out_rows, _ = rows_tokens_per_s(model, prompt, 16, args.new, graph=None)
    sampled_rows, _, _ = rows_tokens_per_s(model, prompt, 16, args.new, graph=None, sampled=True)
    sampled_one = _timed(lambda: generate(model, _NoStop(), prompt, max_new_tokens=args.new, seed=0), args.repeats)[1]
    result = {"merged_graph_tokens_per_s": round(graphed, 1),
              "sampled_graph_tokens_per_s": round(args.new / sampled_one, 1),
              "rows16_sampled_graph_tokens_per_s": round(sampled_rows, 1),
              "graph_tokens_equal_merged_eager_before_first_difference": _first_difference(out_merged, out_graphed),
              "rows16_eager_tokens_per_s": round(eager_rows, 1), "rows16_graph_tokens_per_s": round(graph_rows, 1),
              "rows16_rows_equal": sum(a == b for a, b in zip(out_eager, out_rows))}
    if args.compile:
        compiled, out_compiled, first = tokens_per_s(model, prompt, args.new, args.repeats, compile=True)
        rows, out_rows_c, rows_first = rows_tokens_per_s(model, prompt, 16, args.new, graph=None, compile=True)
        same = _first_difference(out_graphed, out_compiled)
        result.update({"compiled_graph_tokens_per_s": round(compiled, 1), "compiled_first_call_s": round(first, 1),
                       "compiled_tokens_equal_graph_before_first_difference": same,
                       "rows16_compiled_tokens_per_s": round(rows, 1),
                       "rows16_compiled_first_call_s": round(rows_first, 1),
                       "rows16_compiled_rows_equal_graph": sum(a == b for a, b in zip(out_rows, out_rows_c))})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a config.json")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peft-merge", action="store_true", help="PEFT's merge_adapter instead of ppalli's")
    parser.add_argument("--nf4", action="store_true", help="a 4-bit base (QLoRA): the adapter stays unmerged")
    parser.add_argument("--compile", action="store_true", help="also the graph of the torch.compile'd step")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = lora_model(args.model, device, dtype, args.nf4)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), device=device)
    if args.nf4:
        result = nf4_run(model, prompt, args)
        print(json.dumps(result))
        args.out.write_text(json.dumps(result, indent=1))
        return
    unmerged, out_unmerged, _ = tokens_per_s(model, prompt, args.new, args.repeats, graph=False)
    if args.peft_merge:
        model.merge_adapter()  # LoRA layers stay, flagged merged: PEFT's wrapper still runs per projection
    else:
        model = merge_for_inference(model)[0]
    merged, out_merged, _ = tokens_per_s(model, prompt, args.new, args.repeats, graph=False)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": str(args.model),
              "dtype": str(dtype), "prompt": args.prompt, "new": args.new,
              "merge": "peft merge_adapter" if args.peft_merge else "ppalli merge_for_inference",
              "unmerged_tokens_per_s": round(unmerged, 1), "merged_tokens_per_s": round(merged, 1),
              "greedy_tokens_equal_before_first_difference": _first_difference(out_unmerged, out_merged)}
    if device == "cuda":
        result.update(graph_run(model, prompt, out_merged, args))
    print(json.dumps(result))
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
