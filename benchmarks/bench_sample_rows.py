"""Sampled rows decoded together (generate_rows, what `ppalli generate --file` runs): new tokens a second of B rows
of a small random Llama with Llama 3's 128,256-token vocabulary, where choosing the tokens (top-p sorts the whole
vocabulary a row) is a large share of a step. Compare two trees by PYTHONPATH:

    PYTHONPATH=TREE python benchmarks/bench_sample_rows.py [--rows 16] [--new 32] --out results.json

The answers' hash is printed too: two trees that sample alike print the same one.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ppalli.infer.generate as G


class _NoStop:
    eos_token_id = None
    pad_token_id = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).to(device).eval()
    prompts = [torch.randint(0, config.vocab_size, (20 + i,)).tolist() for i in range(args.rows)]
    sampling = G.Sampling(temperature=0.8, top_p=0.9)

    def run(new):
        return G.generate_rows(model, _NoStop(), prompts, max_new_tokens=new, sampling=sampling,
                               seeds=list(range(args.rows)))

    run(4)  # warm-up
    times = []
    for _ in range(3):
        torch.cuda.synchronize() if device == "cuda" else None
        start = time.perf_counter()
        out = run(args.new)
        torch.cuda.synchronize() if device == "cuda" else None
        times.append(time.perf_counter() - start)
    median = sorted(times)[1]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
              "tree": G.__file__, "rows": args.rows, "new": args.new,
              "tokens_per_s": round(args.rows * args.new / median, 1), "seconds": [round(t, 3) for t in times],
              "answers_sha1": hashlib.sha1(json.dumps(out).encode()).hexdigest()[:12]}
    print(json.dumps(result))
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
