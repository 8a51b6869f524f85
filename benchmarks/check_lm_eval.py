"""lm-evaluation-harness against `ppalli serve`, on the CPU: its `local-completions` model (token-id prompts, echo,
logprobs) scores a multiple-choice task and answers a generation task over HTTP, and each figure it reads is set
beside ppalli's own: every choice's log-likelihood from one forward (infer/logprobs.py), every answer from `generate`
cut at the task's first stop string. Run twice: with the tokenizer's folder on the harness' side, and with its
default "auto", which finds serve's /tokenizer_info and /tokenize and tokenizes on the server.

    pip install "lm-eval[api]"
    python benchmarks/check_lm_eval.py --out benchmarks/results/DATE-cpu-lm-eval.json

The model is the serve tests' tiny Qwen2 run (real Qwen2.5 tokenizer, a few steps on ko_chatbot_qa): its accuracy
means nothing, the agreement is the check. The tasks are built here from ../shared/data/ko_chatbot_qa (each question
with its own answer and another row's as the two choices; the first rows' questions for generation).
"""

import argparse
import json
import random
import sys
import tempfile
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from ppalli.infer.generate import generate  # noqa: E402
from ppalli.infer.logprobs import prompt_logprobs  # noqa: E402
from ppalli.infer.serve import ChatServer  # noqa: E402

PROMPT = "질문: {{question}}\n답:"
STOPS = ["\n", "질문:"]


def _rows(shared: Path, n: int) -> list[dict]:
    """The first n question/answer pairs of ko_chatbot_qa, short ones (a tiny model's positions)."""
    import csv

    path = next((shared / "ko_chatbot_qa").glob("*.csv"))
    with open(path, encoding="utf-8") as f:
        rows = [{"question": r["Q"], "answer": r["A"]} for r in csv.DictReader(f)]
    return [r for r in rows if len(r["question"]) + len(r["answer"]) < 80][:n]


def _tasks(folder: Path, rows: list[dict], generations: int) -> list[str]:
    """Two task YAMLs and their JSONL data in `folder`: ko_qa_choice (multiple choice), ko_qa_gen (generate_until)."""
    rng = random.Random(0)
    choice = []
    for i, r in enumerate(rows):
        other = rows[(i + 1 + rng.randrange(len(rows) - 1)) % len(rows)]["answer"]
        label = rng.randrange(2)
        choices = [" " + r["answer"], " " + other] if label == 0 else [" " + other, " " + r["answer"]]
        choice.append({"question": r["question"], "choices": choices, "label": label})
    (folder / "choice.jsonl").write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in choice))
    (folder / "gen.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:generations]))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: " + json.dumps(PROMPT, ensure_ascii=False) + "\n"
    (folder / "ko_qa_choice.yaml").write_text(
        f"task: ko_qa_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'choice.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    (folder / "ko_qa_gen.yaml").write_text(
        f"task: ko_qa_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: answer\n"
        f"generation_kwargs:\n  until: {json.dumps(STOPS, ensure_ascii=False)}\n  max_gen_toks: 12\n"
        "  do_sample: false\n  temperature: 0\nmetric_list:\n  - metric: exact_match\n", encoding="utf-8")
    return ["ko_qa_choice", "ko_qa_gen"]


def _own_loglikelihood(run, context: str, continuation: str) -> float:
    """The continuation's log-likelihood after the context, tokenized as the harness does (the whole string, the
    context's tokens split off: its _encode_pair), from one forward over the whole."""
    tok = run.tokenizer
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tok(context, add_special_tokens=False)["input_ids"])
    return sum(lp for lp, _ in prompt_logprobs(run.model, whole, top=0)[n:])


def _own_answer(run, context: str) -> str:
    ids = run.tokenizer(context, add_special_tokens=False)["input_ids"]
    text = run.tokenizer.decode(generate(run.model, run.tokenizer, torch.tensor([ids]), max_new_tokens=12,
                                         greedy=True, stop_ids=run.stop_ids), skip_special_tokens=True)
    cuts = [text.find(s) for s in STOPS if s in text]
    return text[:min(cuts)] if cuts else text


def _same(a: dict, b: dict) -> bool:
    """Whether two harness runs read the same responses, document by document, in both tasks."""
    return all([s["resps"] for s in a["samples"][t]] == [s["resps"] for s in b["samples"][t]] for t in b["samples"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--docs", type=int, default=24, help="multiple-choice documents")
    ap.add_argument("--generations", type=int, default=6)
    args = ap.parse_args()
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import check_remote_tokenizer_support
    from tiny import tiny_run_config

    from ppalli.models.load import load_run
    from ppalli.train import recipe

    tmp = Path(tempfile.mkdtemp())
    cfg = tiny_run_config(tmp, args.shared, "qwen2", name="served", train__max_steps=20,
                          logging__sample_max_new_tokens=1)
    run = load_run(recipe.train(cfg, print_fn=lambda *a, **k: None).run_dir, merge=True)
    run.tokenizer.save_pretrained(tmp / "tokenizer")  # the harness reads the same tokenizer from a folder
    server = ChatServer(("127.0.0.1", 0), run, "served", max_new_tokens=64)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
    tasks = _tasks(tmp, _rows(args.shared, args.docs), args.generations)
    found = {}
    try:
        for backend in ("huggingface", "auto"):  # a tokenizer folder on the harness' side; the server's routes
            args_ = {"model": "served", "base_url": url, "tokenizer_backend": backend, "tokenized_requests": True,
                     "num_concurrent": 1, **({"tokenizer": str(tmp / "tokenizer")} if backend == "huggingface" else {})}
            found[backend] = lm_eval.simple_evaluate(
                model="local-completions", tasks=tasks, task_manager=TaskManager(include_path=str(tmp)),
                log_samples=True, model_args=args_)
        remote = check_remote_tokenizer_support(url)  # what "auto" asked before it chose the server's tokenizer
    finally:
        server.shutdown()
        server.server_close()
    result = found["huggingface"]
    worst, picks_agree, choices = 0.0, 0, 0
    for sample in result["samples"]["ko_qa_choice"]:
        theirs = [resp[0][0] for resp in sample["resps"]]
        ours = [_own_loglikelihood(run, args_[0], args_[1]) for args_ in sample["arguments"]]
        worst = max(worst, *(abs(a - b) for a, b in zip(theirs, ours)))
        picks_agree += int(max(range(len(ours)), key=ours.__getitem__) == max(range(len(theirs)),
                                                                              key=theirs.__getitem__))
        choices += len(ours)
    gens = [(s["resps"][0][0], _own_answer(run, s["arguments"][0][0])) for s in result["samples"]["ko_qa_gen"]]
    rows = {"lm_eval": lm_eval.__version__, "torch": torch.__version__, "docs": len(result["samples"]["ko_qa_choice"]),
            "choices": choices, "max_abs_loglikelihood_diff": worst, "argmax_agree": picks_agree,
            "acc": result["results"]["ko_qa_choice"].get("acc,none"),
            "generations": len(gens), "generations_equal": sum(a == b for a, b in gens),
            "remote_tokenizer_detected": remote, "remote_tokenizer_same_results": _same(found["auto"], result),
            "generation_pairs": gens}
    print(json.dumps({k: v for k, v in rows.items() if k != "generation_pairs"}, ensure_ascii=False))
    for theirs, ours in gens:
        print(f"  harness {theirs!r:40} ppalli {ours!r}")
    args.out.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
