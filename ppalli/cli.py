"""The `ppalli` command: one verb each. Errors meant for the user print as one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from ppalli.errors import PpalliError

COMPILE_HELP = ("compile the CUDA-graph decode step with torch.compile: 20-40 s once per cache size, then ~1.4-1.5x "
                "the tokens/s of HF's layers (H200, 16-bit base); for models ppalli's decode layers do not cover "
                "(they decode merged Llama/Qwen/Mistral/Phi-3/Gemma faster uncompiled, and take over)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ppalli", description="Fast, lean, self-planning LoRA/QLoRA fine-tuning.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="fine-tune (no config: the embedded demo)")
    _add_config_args(p)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue a run from its last checkpoint (default: the newest run)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its doc")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes (one per GPU), launched through torchrun")

    p = sub.add_parser("plan", help="what-if plan: memory, speed and choices, for this or another GPU")
    _add_config_args(p)
    p.add_argument("--gpu", help="a card name, e.g. 'RTX 3060 12GB', T4, A100-80GB, H100")
    p.add_argument("--gpu-memory", help="GPU memory, e.g. 12GiB")
    p.add_argument("--capability", help="compute capability, e.g. 7.5")
    p.add_argument("--no-data", action="store_true",
                   help="plan without reading the data (rows sized for data.max_seq_len, as before any data)")

    sub.add_parser("doctor", help="check this machine: GPU, versions, optional packages, known-bad combinations")

    for verb, helptext in (("bench", "time a config's training steps here: step ms, tokens/s, peak memory, beside "
                                     "the plan's predictions"),
                           ("sweep", "bench every combination of some settings, each in its own process, ranked")):
        p = sub.add_parser(verb, help=helptext)
        _add_config_args(p)
        p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
        p.add_argument("--warmup", type=int, default=5, help="untimed steps first: compiles, autotuning, "
                       "allocator (default 5)")
        if verb == "bench":
            p.add_argument("--out", help="also write the result as JSON here")
            p.add_argument("--json", action="store_true", help="print the result as JSON")
        else:
            p.add_argument("--over", action="append", default=[], required=True, metavar="KEY=V1,V2",
                           help="a setting and its values, e.g. --over plan.checkpointing=none,selective "
                                "(repeatable: every combination runs)")
            p.add_argument("--out", help="also write each setting's result as a JSON line here")

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_verb", required=True)
    pv = dsub.add_parser("preview", help="rendered samples with trained tokens highlighted, lengths, packing")
    _add_config_args(pv)
    pv.add_argument("--n", type=int, default=3, help="samples to show")
    pv.add_argument("--json", action="store_true", help="machine-readable output")

    for verb, helptext in (("chat", "chat with a trained run (streaming; sampling on)"),
                           ("generate", "answer prompts with a trained run")):
        p = sub.add_parser(verb, help=helptext)
        p.add_argument("run_dir", help="a run directory written by `ppalli train`")
        p.add_argument("--temperature", type=float, default=0.7)
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--greedy", action="store_true", help="always pick the likeliest token (no sampling)")
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--no-merge", action="store_true", help="decode with the adapter kept apart, as "
                       "trained, instead of merged into the 16-bit weights (its branch runs inside ppalli's decode "
                       "layers where they cover the model, else through PEFT's, ~2x slower)")
        p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
        if verb == "chat":
            p.add_argument("--tools", default=None, help="a JSON file of function schemas (a list) offered to a run "
                           "trained on tool use: its calls are shown and you type each result")
        if verb == "generate":
            p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
            p.add_argument("--file", help="a text file with one prompt per line")
            p.add_argument("--out", help="write answers as JSONL here (default: print)")
            p.add_argument("--json-schema", help="a JSON schema file: every answer is JSON that it accepts, decoded "
                           "under its grammar (needs xgrammar: pip install 'ppalli[structured]')")
            p.add_argument("--json", action="store_true", help="every answer is a JSON object (any keys)")

    p = sub.add_parser("serve", help="serve a trained run over an OpenAI-compatible HTTP API "
                       "(/v1/chat/completions, /v1/completions, streaming)")
    p.add_argument("run_dir", help="a run directory written by `ppalli train`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-new-tokens", type=int, default=512, help="the most tokens an answer may take (requests "
                   "ask for fewer with max_tokens)")
    p.add_argument("--no-merge", action="store_true", help="decode with the adapter kept apart (see chat --no-merge)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--api-key", default=os.environ.get("PPALLI_API_KEY"), help="answer only requests that send "
                   "'Authorization: Bearer KEY' (the openai client's api_key); default $PPALLI_API_KEY, else none "
                   "(set one before --host 0.0.0.0)")
    p.add_argument("--reasoning", action="store_true", help="a chat answer's opening <think> block comes back as "
                   "reasoning_content, apart from the content (a run trained on reasoning answers)")
    p.add_argument("--batch-size", type=int, default=8, help="the most requests decoded together: those waiting "
                   "when a batch starts share it (each with its own sampling and limit; a batch out of GPU memory "
                   "halves this)")

    p = sub.add_parser("eval", help="loss, perplexity and scored greedy answers (exact match, Korean-aware ROUGE)")
    p.add_argument("run_dir", help="a run directory written by `ppalli train`")
    p.add_argument("--data", help="evaluate on every row of this file (default: the run's held-out rows)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's data config, e.g. --set data.columns.question=Q (repeatable)")
    p.add_argument("--n", type=int, default=100, help="rows to answer and score (0: all); the loss covers all")
    p.add_argument("--turns", choices=("all", "first"), default="all", help="the answers of a multi-turn row to "
                   "score: each, after the conversation before it (all), or the first only")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, help="rows per loss forward (default: 16, or 4 for a model whose "
                   "loss needs full logits)")
    p.add_argument("--out", help="folder for eval.json and eval_samples.jsonl (default: the run directory)")
    p.add_argument("--no-merge", action="store_true", help="answer with the adapter kept apart, as trained, "
                   "instead of merged into the 16-bit weights (see chat --no-merge); the loss never merges")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)

    p = sub.add_parser("export", help="merge the adapter into 16-bit weights and save safetensors (and GGUF)")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--gguf", choices=["bf16", "f16", "q8_0", "f32", "q4_k_m", "q5_k_m", "q6_k"],
                   help="also write the merged model as one GGUF file of this type, and an Ollama Modelfile for it "
                        "(llama.cpp, Ollama, LM Studio; "
                        "Llama, Mistral, Qwen2/3, Gemma 2/3, EXAONE 3/4, Phi-3 families); the k-quants are made by "
                        "llama.cpp's quantizer and need llama-cpp-python")
    return ap


def _load_config(args):
    from ppalli import config as C

    return C.load(args.config, args.overrides)


def cmd_train(args) -> int:
    from ppalli import config as C
    from ppalli.train.recipe import train

    if args.help_config:
        for key, tp, doc in C.describe():
            print(f"{key:32s} {tp:28s} {doc}")
        return 0
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc, args.argv)
    resume = None
    if args.resume is not None:
        resume = Path(args.resume) if args.resume else _newest_run()
        if args.config is None and (resume / "config.yaml").is_file():
            args.config = str(resume / "config.yaml")
    cfg = _load_config(args)
    result = train(cfg, resume=resume)
    if os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 reports the run
    print(f"\nadapter: {result.adapter_dir}\nreport:  {result.report}")
    if result.sample:
        print(f"sample:  Q: {result.sample['prompt']}\n         A: {result.sample['output']}")
    print(f"chat:    ppalli chat {result.run_dir}")
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Re-launch this very command under torchrun with N processes (rank 0 prints and writes the run)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ppalli.cli", *rest]
    return subprocess.run(cmd, check=False).returncode


def _newest_run() -> Path:
    runs = sorted((p for p in Path("runs").glob("*/checkpoints") if any(p.iterdir())),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise PpalliError("--resume: no run with checkpoints under runs/; give the run folder: --resume RUN_DIR")
    return runs[-1].parent


def cmd_plan(args) -> int:
    from ppalli.models.load import read_model_config
    from ppalli.plan.memory import ModelSpec
    from ppalli.plan.whatif import format_plan, whatif
    from ppalli.train.recipe import resolve_demo

    cfg = resolve_demo(_load_config(args), Path.home() / ".cache" / "ppalli" / "demo")
    spec = ModelSpec.from_config(read_model_config(cfg.model.name_or_path, revision=cfg.model.revision,
                                                   trust_remote_code=cfg.model.trust_remote_code))
    memory = _parse_gib(args.gpu_memory) if args.gpu_memory else None
    cap = tuple(int(x) for x in args.capability.split(".")) if args.capability else None
    shape = {} if args.no_data else _data_shape(cfg)
    print(format_plan(whatif(cfg, spec, gpu=args.gpu, gpu_memory_gib=memory, capability=cap, **shape)))
    return 0


def _data_shape(cfg) -> dict:
    """The data's lengths for the plan, as `ppalli train` reads them (tokenized once, then from the cache);
    {} with a note when the data or its tokenizer cannot be read."""
    from ppalli.train.distributed import World
    from ppalli.train.recipe import data_shape, load_data

    try:
        _, prepared = load_data(cfg, World())
    except PpalliError as e:
        print(f"data: not read ({e}); rows sized for data.max_seq_len ({cfg.data.max_seq_len})")
        return {}
    return data_shape(prepared.train + prepared.eval, cfg.train.batch_size)


def _parse_gib(text: str) -> float:
    t = text.strip().lower().replace(" ", "")
    for suffix, scale in (("gib", 1.0), ("gb", 1e9 / 2**30), ("g", 1.0), ("mib", 1 / 1024)):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], scale
            break
    else:
        mult = 1.0
    try:
        return float(t) * mult
    except ValueError:
        raise PpalliError(f"--gpu-memory {text!r}: expected a size like 12GiB or 24GB") from None


def cmd_doctor(args) -> int:
    from ppalli.doctor import doctor_report
    from ppalli.env import probe

    rows = doctor_report(probe())
    width = max(len(r[0]) for r in rows)
    bad = 0
    for check, value, status in rows:
        bad += status.startswith("bad")
        print(f"{check:{width}s}  {value}  [{status}]")
    return 1 if bad else 0


def cmd_data(args) -> int:
    from ppalli.data.preview import format_preview, preview
    from ppalli.models.tokenizer import load_tokenizer
    from ppalli.train.recipe import resolve_demo

    cfg = resolve_demo(_load_config(args), Path.home() / ".cache" / "ppalli" / "demo")
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, revision=cfg.model.revision,
                         trust_remote_code=cfg.model.trust_remote_code)
    result = preview(cfg.data, tok, args.n)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=1))
    else:
        from rich.console import Console

        Console().print(format_preview(result))
    return 0


def cmd_chat(args) -> int:
    from ppalli.infer.chat import chat_loop, read_tools
    from ppalli.models.load import load_run

    tools = read_tools(args.tools) if args.tools else None
    run = load_run(args.run_dir, merge=not args.no_merge)
    print(f"ppalli chat: {args.run_dir}  (sampling {'off' if args.greedy else 'on'}; {run.note}; /reset, /exit)")
    grammar = None
    if tools:  # a call the model opens is held to the tools' schemas (None, free, without xgrammar)
        from ppalli.infer.structured import Grammars

        grammar = Grammars.for_run(run).for_request(None, tools, None)
    chat_loop(run.model, run.tokenizer, run.render_prompt, temperature=args.temperature, top_p=args.top_p,
              max_new_tokens=args.max_new_tokens, greedy=args.greedy, stop_ids=run.stop_ids, compile=args.compile,
              tools=tools, grammar=grammar)
    return 0


def cmd_generate(args) -> int:
    from ppalli.infer.chat import generate_batch, read_prompts
    from ppalli.models.load import load_run

    prompts = list(args.prompt) + (read_prompts(args.file) if args.file else [])
    if not prompts:
        raise PpalliError("generate: give --prompt TEXT or --file PROMPTS.txt")
    schema = _json_schema(args.json_schema, args.json)
    run = load_run(args.run_dir, merge=not args.no_merge)
    print(run.note, file=sys.stderr)
    grammar = None
    if schema is not None:
        from ppalli.infer.structured import ConstraintError, Grammars

        try:
            grammar = Grammars.for_run(run).for_request(schema, None, None)
        except ConstraintError as e:
            raise PpalliError(f"generate: {args.json_schema or '--json'}: {e}") from None
    out = args.out or "-"
    generate_batch(run.model, run.tokenizer, run.render_prompt, prompts, out, temperature=args.temperature,
                   top_p=args.top_p, max_new_tokens=args.max_new_tokens, greedy=args.greedy, seed=args.seed,
                   stop_ids=run.stop_ids, compile=args.compile, grammar=grammar)
    return 0


def _json_schema(path: str | None, any_object: bool) -> dict | None:
    """generate's --json-schema FILE (read and checked before the model loads) or --json (any object)."""
    if path and any_object:
        raise PpalliError("generate: give --json-schema FILE or --json, not both")
    if not path:
        return {"type": "object"} if any_object else None
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise PpalliError(f"generate: --json-schema {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise PpalliError(f"generate: --json-schema {path}: not JSON ({e.msg}, line {e.lineno}); give a JSON "
                          "schema file") from None
    if not isinstance(schema, dict):
        raise PpalliError(f"generate: --json-schema {path}: a schema is a JSON object, e.g. {{\"type\": \"object\"}}")
    return schema


def cmd_serve(args) -> int:
    from ppalli.infer.serve import ChatServer
    from ppalli.models.load import load_run

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise PpalliError("serve: --max-new-tokens and --batch-size must be 1 or more")
    run = load_run(args.run_dir, merge=not args.no_merge)
    name = Path(args.run_dir).resolve().name
    try:
        server = ChatServer((args.host, args.port), run, name, max_new_tokens=args.max_new_tokens,
                            compile=args.compile, batch_size=args.batch_size, api_key=args.api_key,
                            reasoning=args.reasoning)
    except OSError as e:
        raise PpalliError(f"serve: cannot listen on {args.host}:{args.port} ({e.strerror}); pick another "
                          "--port") from None
    host, port = server.server_address[:2]
    print(f"ppalli serve: {name} ({run.note}) on http://{host}:{port}/v1  (POST /v1/chat/completions; Ctrl-C stops)")
    if args.api_key:
        print("requests must send 'Authorization: Bearer <the --api-key>'")
    elif host not in ("127.0.0.1", "::1", "localhost"):
        print(f"note: {host} is reachable from other machines and no --api-key is set: anyone who reaches port "
              f"{port} can use the model")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped")
    finally:
        server.server_close()
    return 0


def cmd_eval(args) -> int:
    from ppalli.eval.runner import EvalSettings, evaluate_run

    if args.n < 0 or args.max_new_tokens < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise PpalliError("eval: --n must be 0 or more, --max-new-tokens and --batch-size 1 or more")
    settings = EvalSettings(n=args.n or None, max_new_tokens=args.max_new_tokens, micro_batch_size=args.batch_size,
                            merge=not args.no_merge, compile=args.compile, turns=args.turns)
    summary = evaluate_run(args.run_dir, settings=settings, data_path=args.data, overrides=args.overrides,
                           out_dir=args.out)
    print(f"written: {Path(args.out or args.run_dir) / 'eval.json'} ({summary['answered']} answers scored)")
    return 0


def cmd_export(args) -> int:
    import torch

    from ppalli.data.templates import standalone_source
    from ppalli.export.merge import merge_adapter
    from ppalli.models.load import load_run

    run = load_run(args.run_dir)
    # What the run trained on goes with the model: its chat template (a built-in or custom one replaces the
    # tokenizer's own) and its stop tokens as generation_config's EOS, so HF, vLLM, llama.cpp and Ollama prompt
    # and stop as training did.
    template, system = run.template, run.config.data.system_prompt
    if template.name != "model" or system:
        run.tokenizer.chat_template = standalone_source(template, system)
    run.model.get_base_model().generation_config.eos_token_id = run.stop_ids
    out = merge_adapter(run.model, out_dir=args.out, dtype=getattr(torch, args.dtype), tokenizer=run.tokenizer)
    print(f"merged model: {out}")
    if args.gguf:
        from ppalli.export.gguf import adds_bos, export_gguf
        from ppalli.export.modelfile import write_modelfile

        tokenizer = run.tokenizer
        del run  # the merged weights are read back from the folder, a tensor at a time
        path = export_gguf(out, outtype=args.gguf)
        print(f"GGUF: {path}")
        modelfile = write_modelfile(out, path, template, adds_bos(tokenizer), system)
        print(f"Ollama: ollama create NAME -f {modelfile}")
    return 0


def cmd_bench(args) -> int:
    from ppalli.train.bench import bench, format_bench

    result = bench(_load_config(args), steps=args.steps, warmup=args.warmup,
                   print_fn=_quiet if args.json else print)
    if args.out:
        Path(args.out).write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
    print(json.dumps(result.to_dict(), ensure_ascii=False, indent=1) if args.json else "\n".join(format_bench(result)))
    return 0


def cmd_sweep(args) -> int:
    from ppalli.train.bench import format_sweep, sweep

    rows = sweep(args.config, args.overrides, args.over, steps=args.steps, warmup=args.warmup,
                 out=Path(args.out) if args.out else None)
    print("\n".join(format_sweep(rows)))
    return 1 if any("error" in r for r in rows) else 0


def _quiet(*args, **kwargs) -> None:
    return None


VERBS = {"train": cmd_train, "plan": cmd_plan, "doctor": cmd_doctor, "data": cmd_data, "chat": cmd_chat,
         "generate": cmd_generate, "eval": cmd_eval, "export": cmd_export, "bench": cmd_bench, "sweep": cmd_sweep,
         "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:  # bitsandbytes 0.50 warns at import (PEFT imports it) on a CPU with AVX512-BF16 that its
        # hub CPU gemm kernel did not load; ppalli runs no 4-bit CPU GEMM, and every chat/serve/eval printed it
        logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)
        # PEFT's PeftModel reads transformers' deprecated is_gradient_checkpointing (transformers 5.25): a
        # FutureWarning at every run loaded, about neither ppalli's code nor the user's
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        return VERBS[args.verb](args)
    except PpalliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from ppalli.train.oom import explain_cuda_error, is_oom

        if "CUDA" in str(e) or "CUBLAS" in str(e) or is_oom(e):
            print(f"error: {explain_cuda_error(e)}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
