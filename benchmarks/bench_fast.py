"""The fast path against HF + PEFT: one decoder layer and a whole random-weight model, forward + backward.

    python benchmarks/bench_fast.py --config 1b|8b|tiny|CONFIG.json --out benchmarks/results/ \\
        [--what layer,model] [--batch 8 --seq 2048] [--layers N] [--steps 8 --warmup 3] \\
        [--backend auto|sdpa_cudnn|sdpa_flash|...] [--gc none|full]

Each (what, stack) runs in its own process, so peak memory is that run's alone. Both stacks build the same
random bf16 model (seed 0, `from_config` on the GPU; --layers overrides num_hidden_layers) with PEFT LoRA
r=16 alpha=16 dropout 0 on q,k,v,o,gate,up,down.
- layer: layer 0 on random hidden states (B, T, d), the model's RoPE tables, causal; forward, then
  backward of a fixed random output gradient (LoRA gradients and the input gradient).
- model: a training step on seeded random tokens (inputs = labels): HF + PEFT computes
  `model(input_ids, labels=labels).loss` (full logits, HF's loss), ppalli `fast_causal_lm_loss` (fused
  layers, fused lm_head + cross entropy) divided by the trained tokens; fused AdamW lr 2e-4 on the adapter.
--gc full: HF's non-reentrant gradient checkpointing for HF + PEFT, ppalli.train.recompute "full" for ppalli.

Timing: --warmup untimed steps, then --steps between CUDA events; peak = torch.cuda.max_memory_allocated()
after a reset before the warm-up. FLOPs per token are DESIGN.md's 4*N_matmul + 12*L*d*s + 6*N_lora
(peers.model_flops_per_token for the model; the same terms for one layer). Writes
<out>/<date>-<gpu>-fast-<model>.json and a markdown table with the ppalli / HF ratios beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ppalli from the checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import CEILING_TFLOPS, LORA, LR, MODELS, TARGETS, gpu_slug, model_flops_per_token, versions  # noqa: E402

RESULT_PREFIX = "BENCH_FAST_RESULT "
GIB = 2**30


# --------------------------------------------------------------------------- one run (child process)


def build(spec: dict):
    """The random bf16 model with PEFT LoRA, on CUDA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(spec["model_config"])
    model_type = cfg.pop("model_type")
    for key in ("architectures", "torch_dtype", "transformers_version"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(model_type, **cfg)
    config.num_hidden_layers = spec["layers"] or config.num_hidden_layers
    config.use_cache = False
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(spec["device"]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.requires_grad_(False)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=list(TARGETS))
    return get_peft_model(model, lora)


def enable_fast(model, spec: dict) -> list[str]:
    from ppalli.models.fast import apply_fast_path

    lines: list[str] = []
    apply_fast_path(model, attention_backend=spec["backend"], log=lines.append)
    if spec["gc"] == "full":
        from ppalli.train.recompute import apply_recompute

        apply_recompute(model, "full")
    return lines


def enable_hf_gc(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def layer_step(model, spec: dict):
    """A closure running layer 0 forward + backward on fixed random inputs; returns the output's mean."""
    import torch

    from ppalli.models.families import family_for_layer
    from ppalli.models.fast import backbone_of

    backbone = backbone_of(model)
    layer = backbone.layers[0]
    b, t, d = spec["batch"], spec["seq"], backbone.config.hidden_size
    dev, dtype = spec["device"], next(model.parameters()).dtype
    g = torch.Generator(dev).manual_seed(0)
    hidden = torch.randn(b, t, d, device=dev, dtype=dtype, generator=g).requires_grad_()
    dout = torch.randn(b, t, d, device=dev, dtype=dtype, generator=g)
    pos = torch.arange(t, device=dev)[None]
    cos_sin = family_for_layer(layer).rope_tables(backbone, hidden, pos)(0)  # Gemma-3: layer 0's (local) tables

    def step():
        out = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        out.backward(dout)
        hidden.grad = None
        return out.float().mean()

    return step


def model_step(model, spec: dict, fast: bool):
    """A closure running one training step (forward, backward, AdamW) on seeded random tokens."""
    import torch

    from ppalli.models.fast_loss import fast_causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=spec["device"] == "cuda")
    vocab = model.config.vocab_size
    g = torch.Generator(spec["device"]).manual_seed(0)
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), device=spec["device"], generator=g)

    def step():
        if fast:
            loss_sum, n = fast_causal_lm_loss(model, ids, ids)
            loss = loss_sum / n
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step, warmup: int, steps: int, device: str) -> dict:
    import torch

    if device != "cuda":  # the CPU plumbing check: wall clock, no memory figure
        losses = [step().item() for _ in range(warmup + steps)]
        t0 = time.perf_counter()
        losses.append(step().item())
        return {"step_ms": (time.perf_counter() - t0) * 1e3, "peak_gib": 0.0, "loss_first": losses[0],
                "loss_last": losses[-1]}
    torch.cuda.reset_peak_memory_stats()
    losses = [step().item() for _ in range(warmup)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    timed = [step() for _ in range(steps)]
    end.record()
    torch.cuda.synchronize()
    losses += [x.item() for x in timed]
    return {"step_ms": start.elapsed_time(end) / steps, "peak_gib": torch.cuda.max_memory_allocated() / GIB,
            "loss_first": losses[0], "loss_last": losses[-1]}


def child(spec: dict) -> dict:
    t0 = time.time()
    model = build(spec)
    fast = spec["stack"] == "ppalli"
    out: dict = {}
    if fast:
        out["fast_path_log"] = enable_fast(model, spec)[:2]  # the family/backend line and layer 0's swap
    elif spec["gc"] == "full":
        enable_hf_gc(model)
    model.train()
    step = layer_step(model, spec) if spec["what"] == "layer" else model_step(model, spec, fast)
    out.update(time_steps(step, spec["warmup"], spec["steps"], spec["device"]))
    out["tokens_per_s"] = spec["batch"] * spec["seq"] / (out["step_ms"] / 1e3)
    out["build_s"] = round(time.time() - t0, 1)
    return out


# --------------------------------------------------------------------------- the parent


def layer_flops_per_token(cfg: dict, seq: int) -> float:
    """4*N_matmul + 12*d*s + 6*N_lora for one decoder layer (DESIGN.md's terms with L = 1, no lm_head)."""
    d, ffn, r = cfg["hidden_size"], cfg["intermediate_size"], LORA["r"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ffn), (d, ffn), (ffn, d)]  # (in, out) of each projection
    n_matmul = sum(i * o for i, o in shapes)
    n_lora = sum(r * (i + o) for i, o in shapes)
    return 4 * n_matmul + 12 * d * seq + 6 * n_lora


def run_child(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    env = dict(os.environ, **({"TRITON_INTERPRET": "1"} if spec["device"] == "cpu" else {}))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    lines = [line for line in res.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        return {"error": (res.stderr.strip().splitlines() or ["no output"])[-1][:500]}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def load_config(name: str) -> tuple[str, dict]:
    if name in MODELS:
        return MODELS[name]
    path = Path(name)
    return path.stem.removeprefix("config_"), json.loads(path.read_text(encoding="utf-8"))


def markdown(doc: dict) -> str:
    rows = ["| what | stack | batch x seq | ms/step | tokens/s | TFLOP/s | share | peak GiB | ppalli / hf |",
            "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["what"], r["stack"]): r for r in doc["runs"]}
    for r in doc["runs"]:
        if "error" in r:
            rows.append(f"| {r['what']} | {r['stack']} | {r['batch']}x{r['seq']} | error: {r['error']} |||||")
            continue
        hf = by.get((r["what"], "hf"), {})
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf.get("tokens_per_s") else "-"
        rows.append(f"| {r['what']} | {r['stack']} | {r['batch']}x{r['seq']} | {r['step_ms']:.1f} | "
                    f"{r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | {r['share_of_peak']:.0%} | "
                    f"{r['peak_gib']:.1f} | {ratio if r['stack'] == 'ppalli' else ''} |")
    head = f"# Fast path vs HF + PEFT: {doc['model']} ({doc['device']}, {doc['date']})\n\n"
    return head + "\n".join(rows) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="1b", help="1b, 8b, tiny (benchmarks/peers.py) or a config.json path")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    p.add_argument("--what", default="layer,model", help="layer, model or both (comma separated)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the config's)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="auto", help="ppalli's attention backend (resolve_backend names)")
    p.add_argument("--gc", choices=("none", "full"), default="none")
    p.add_argument("--stacks", default="hf,ppalli", help="hf, ppalli or both (comma separated)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per run")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a plumbing check (--config tiny, Triton interpreted, wall-clock time), not a benchmark")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        try:
            result = child(spec)
        except Exception as e:  # noqa: BLE001 - reported as this run's error; the parent goes on
            result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    import torch

    name, cfg = load_config(args.config)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    layers = args.layers or cfg["num_hidden_layers"]
    flops = {"model": model_flops_per_token({**cfg, "num_hidden_layers": layers}, args.seq),
             "layer": layer_flops_per_token(cfg, args.seq)}
    runs = []
    for what in args.what.split(","):
        for stack in args.stacks.split(","):
            spec = dict(what=what, stack=stack, model_config=cfg, layers=args.layers, batch=args.batch,
                        seq=args.seq, steps=args.steps, warmup=args.warmup, backend=args.backend, gc=args.gc,
                        device=args.device)
            res = run_child(spec, args.timeout)
            record = {"case": f"fast-{what}", "what": what, "stack": stack, "model": name, "layers": layers,
                      "batch": args.batch, "seq": args.seq, "gc": args.gc, "setting": f"gc {args.gc}", **res}
            if "tokens_per_s" in res:
                record["tflops"] = res["tokens_per_s"] * flops[what] / 1e12
                record["share_of_peak"] = record["tflops"] / CEILING_TFLOPS
            print(json.dumps(record), flush=True)
            runs.append(record)
    day = datetime.date.today().isoformat()
    doc = {"device": device, "date": day, "model": name, "versions": versions(), "ceiling_tflops": CEILING_TFLOPS,
           "flops_per_token": flops, "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{day}-{gpu_slug(device)}-fast-{name}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(doc), encoding="utf-8")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
