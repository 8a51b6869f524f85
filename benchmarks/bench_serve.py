"""`ppalli serve` under concurrent clients: the same requests answered with --batch-size 1 (one request at a time,
how serve decoded before its Batcher) and with larger batches; new tokens a second over all clients, and each
client's wait.

    python benchmarks/bench_serve.py [--model CONFIG.json] [--clients 8] [--new 64] [--batch-sizes 1,8] --out r.json

Random weights from the config (the demo's tiny Llama by default; speed does not depend on their values), served as
a merged run is (bf16 on CUDA, fp32 on the CPU), the demo tokenizer with no EOS so every answer takes --new tokens.
Each round, every client sends one greedy request with its own question at the same moment, over HTTP to a server
on 127.0.0.1; a warm-up round first, then the median of --rounds.
"""

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from ppalli.demo.data import demo_pairs  # noqa: E402
from ppalli.demo.model import demo_model_config  # noqa: E402
from ppalli.demo.tokenizer import build_demo_tokenizer  # noqa: E402
from ppalli.infer.serve import ChatServer  # noqa: E402


class _NoEos:
    """The demo tokenizer without an EOS: answers run to max_tokens, so every round decodes the same tokens."""

    eos_token_id = None

    def __init__(self, tok):
        self.tok, self.pad_token_id = tok, tok.pad_token_id

    def __call__(self, text, **kw):
        return self.tok(text, **kw)

    def decode(self, ids, **kw):
        return self.tok.decode(ids, **kw)

    def __getattr__(self, name):  # the rest (convert_ids_to_tokens, ... for log-probs) is the tokenizer's
        return getattr(self.tok, name)


def served_run(config_path: str | None, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_demo_tokenizer(Path(tempfile.mkdtemp()) / "tok")
    config = AutoConfig.from_pretrained(config_path) if config_path else demo_model_config(len(tok))
    config.vocab_size = max(config.vocab_size, len(tok))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.generation_config.eos_token_id = None
    return SimpleNamespace(model=model.eval(), tokenizer=_NoEos(tok), render_prompt=lambda m: m[-1]["content"],
                           stop_ids=[])


def _ask(url: str, question: str, new: int) -> tuple[float, int]:
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": new,
                       "temperature": 0}).encode()
    start = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        reply = json.loads(r.read())
    return time.perf_counter() - start, reply["usage"]["completion_tokens"]


def round_trip(url: str, questions: list[str], new: int) -> dict:
    """Every client at once: {seconds (the last answer), tokens, each client's wait}."""
    results: list = [None] * len(questions)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _ask(url, questions[i], new)))
               for i in range(len(questions))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seconds": time.perf_counter() - start, "tokens": sum(r[1] for r in results),
            "waits": sorted(r[0] for r in results)}


def bench(run, batch_size: int, clients: int, new: int, rounds: int) -> dict:
    server = ChatServer(("127.0.0.1", 0), run, "bench", max_new_tokens=new, batch_size=batch_size)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    questions = [q for q, _ in demo_pairs()][:clients]
    try:
        round_trip(url, questions, new)  # warm-up: first kernels, allocator, graph capture
        server.batcher.sizes.clear()
        runs = [round_trip(url, questions, new) for _ in range(rounds)]
    finally:
        server.shutdown()
        server.server_close()
    mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return {"batch_size": batch_size, "clients": clients, "new": new, "tokens": mid["tokens"],
            "seconds": round(mid["seconds"], 3), "tokens_per_s": round(mid["tokens"] / mid["seconds"], 1),
            "wait_median_s": round(statistics.median(mid["waits"]), 3), "wait_max_s": round(mid["waits"][-1], 3),
            "batches": server.batcher.sizes[:rounds * clients]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model config.json (default: the demo's tiny Llama)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--new", type=int, default=64, help="new tokens an answer")
    ap.add_argument("--batch-sizes", default="1,8", help="serve --batch-size values, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = served_run(args.model, device)
    rows = [bench(run, int(b), args.clients, args.new, args.rounds) for b in args.batch_sizes.split(",")]
    for r in rows:
        print(f"batch-size {r['batch_size']:>2}: {r['clients']} clients x {r['new']} tokens in {r['seconds']:.2f} s "
              f"= {r['tokens_per_s']:.0f} tokens/s; wait median {r['wait_median_s']:.2f} s, max "
              f"{r['wait_max_s']:.2f} s; batches {r['batches']}")
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "model": args.model or "demo",
              "runs": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
