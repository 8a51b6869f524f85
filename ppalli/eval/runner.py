"""`ppalli eval RUN_DIR`: the loss of a trained run on held-out rows, and its answers scored against theirs.

Rows: the run's own held-out split by default, rebuilt from the run's saved config with its seed (so the
loss equals the one training wrote at its end); with `data_path`, every row of that file instead.

- Loss: the run's objective, normalized like training (sum over trained tokens / their count); for SFT also
  the perplexity exp(loss).
- Answers: greedy (a metric should not depend on sampling luck), one for each answer a row trains (each run of
  trained labels; `turns="first"`: the first only), after the prompt the model was trained on for it (the
  sample's tokens before it: in a multi-turn row, the conversation so far with earlier answers as the data has
  them); the reference is that run of labels (for preference data, the chosen answer). Scored by exact match and
  ROUGE-1/2/L in words and in syllables, and tool calls by name and arguments (`ppalli.eval.metrics`).

Writes `eval.json` (the means and the settings) and `eval_samples.jsonl` (one row per answer, written as
each finishes, so a stopped eval keeps what it has) in the run directory or `out_dir`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ppalli.data.masking import answer_spans
from ppalli.data.templates import prompt_text
from ppalli.errors import DataError
from ppalli.eval.metrics import UNITS, mean_scores, score_pairs


@dataclass(frozen=True)
class EvalSettings:
    n: int | None = 100  # rows answered and scored (None: all); the loss always covers every row
    # which answers of a multi-turn row are scored: "all" (each with the conversation before it) or "first"
    turns: str = "all"
    max_new_tokens: int = 256
    # rows per loss forward; None: 16 with the chunked loss (H200, 1B, 591 short rows: 1.6 s against 4.9 at 4,
    # results/2026-12-04-h200-s18-eval-loss-1b*.json), 4 where eval_lm_loss builds full (rows, T, V) logits
    micro_batch_size: int | None = None
    units: tuple[str, ...] = UNITS
    # answers decoded with the adapter merged into a 16-bit base (~2x faster, export.merge.merge_for_inference);
    # the loss is always the adapter's own, before the merge, so it equals training's
    merge: bool = True
    # prompts decoded together (left-padded, greedy): one sequence's decoding is bound by the host's launches, so
    # a batch of rows costs little more than one (H200, Llama-3.2-1B from the CUDA graph: 16 rows 4,030 new tokens/s
    # against 344 for one, results/2026-12-04-h200-s21-generate-compile-1b.json)
    answer_rows: int = 16
    # the answers' decode step compiled by torch.compile (infer.generate.generate: once per cache size)
    compile: bool = False


@dataclass(frozen=True)
class _Batches:
    """The two plan fields `evaluate` reads."""

    micro_batch_size: int
    packing: bool = False


def eval_rows(run_dir: Path, tokenizer, overrides: list[str], data_path: str | None) -> tuple[list[dict], str]:
    """Tokenized rows to evaluate and a line saying where they came from."""
    from ppalli import config as C
    from ppalli.data.pipeline import prepare

    if data_path:
        overrides = [*overrides, f"data.path={data_path}", "data.sources=[]", "data.eval_path=null",
                     "data.eval_split=0"]
    cfg = C.load(run_dir / "config.yaml", overrides)
    prepared = prepare(cfg.data, tokenizer, seed=cfg.train.seed, objective=cfg.train.objective)
    if data_path:
        return prepared.train, f"{data_path}: every row ({len(prepared.train)})"
    if not prepared.eval:
        raise DataError(f"{run_dir}: the run held out no rows (data.eval_split: {cfg.data.eval_split:g}); give "
                        "--data FILE to evaluate on a file")
    held = cfg.data.eval_path or f"data.eval_split={cfg.data.eval_split:g}, seed {cfg.train.seed}"
    return prepared.eval, f"the run's held-out rows ({held}): {len(prepared.eval)}"


def eval_loss(run, rows: list[dict], settings: EvalSettings) -> tuple[dict, int]:
    """(loop.evaluate's result: the run's objective over rows, normalized like training, and for preference
    pairs their reward margin and accuracy; the rows per forward it used)"""
    from ppalli.train.loop import evaluate
    from ppalli.train.objectives import chunked_lm_loss, eval_lm_loss, make_objective
    from ppalli.train.recipe import make_collate

    cfg = run.config
    lm_loss = eval_lm_loss(run.model)
    objective = make_objective(cfg.train.objective, beta=cfg.train.beta, gamma=cfg.train.simpo_gamma,
                               lm_loss=lm_loss)
    collate = make_collate(run.tokenizer, run.model.device, cfg.train.objective)
    micro = settings.micro_batch_size or (16 if lm_loss is chunked_lm_loss else 4)
    # preference pairs packed, as training packs them by default (no compute on padding, the same log-probs)
    batches = _Batches(micro, packing=cfg.train.objective != "sft")
    return evaluate(run.model, objective, rows, batches, collate), micro


def answers(run, prompts: list[list[int]], max_new_tokens: int, compile: bool = False, rows: int = 0) -> list[str]:
    """Greedy answers to these prompts, decoded together (infer.generate.generate_greedy_rows); where the decode
    step is compiled (step_compiles), a short batch is filled to `rows` so that it reuses the full batches'."""
    from ppalli.infer.generate import generate_greedy_rows, step_compiles

    fill = rows if step_compiles(run.model, compile=compile) else 0
    new = generate_greedy_rows(run.model, run.tokenizer, prompts, max_new_tokens=max_new_tokens,
                               stop_ids=run.stop_ids, compile=compile, fill_rows=fill)
    return [run.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file


def evaluate_run(run_dir: str | Path, *, settings: EvalSettings = EvalSettings(), data_path: str | None = None,
                 overrides: list[str] | None = None, out_dir: str | Path | None = None, device: str | None = None,
                 print_fn=print) -> dict:
    """Evaluate a run directory; returns what eval.json holds."""
    from ppalli.eval.metrics import rouge_scorer
    from ppalli.models.load import load_run

    rouge_scorer()  # a missing rouge-score fails here, before minutes of loading and generating
    run_dir = Path(run_dir)
    run = load_run(run_dir, device=device)
    rows, source = eval_rows(run_dir, run.tokenizer, list(overrides or []), data_path)
    print_fn(f"eval rows: {source}")
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    result, micro = eval_loss(run, rows, settings)
    loss, pair_means = result["loss"], {k: v for k, v in result.items() if k != "loss"}
    loss_seconds = time.perf_counter() - start
    print_fn(f"loss {loss:.4f} over {len(rows)} rows ({loss_seconds:.1f} s)"
             + "".join(f", {k} {v:.4f}" for k, v in pair_means.items()))

    if settings.merge:
        from ppalli.export.merge import merge_for_inference

        model, note = merge_for_inference(run.model)
        run = replace(run, model=model, note=note)
    print_fn(f"answers: {run.note}")
    start = time.perf_counter()
    pairs = _answer_rows(run, rows, settings, out / "eval_samples.jsonl", print_fn)
    scores = score_pairs([(p["output"], p["reference"]) for p in pairs], settings.units)
    means = mean_scores(scores)
    sft = run.config.train.objective == "sft"
    summary = {
        "run": str(run_dir), "rows": source, "objective": run.config.train.objective,
        "loss": loss, "perplexity": math.exp(loss) if sft and loss < 700 else None, "loss_rows": len(rows),
        **pair_means,
        "answered": len(pairs), "answered_rows": len({p["row"] for p in pairs}), "metrics": means,
        "settings": asdict(settings) | {"micro_batch_size": micro},
        "decoding": "greedy", "answers_model": run.note,
        "seconds": {"loss": round(loss_seconds, 2), "answers": round(time.perf_counter() - start, 2)},
    }
    _write_json(out / "eval.json", summary)
    _add_scores(out / "eval_samples.jsonl", pairs, scores)
    for name, value in means.items():
        print_fn(f"{name:<18} {value:.4f}")
    return summary


def _answer_rows(run, rows: list[dict], settings: EvalSettings, path: Path, print_fn) -> list[dict]:
    """Greedy answers for the first `settings.n` rows that train a token (each answer of a row, or its first, as
    settings.turns says), written as they finish."""
    if settings.turns not in ("all", "first"):
        raise ValueError(f"eval turns: {settings.turns!r}; choose all or first")
    start = time.perf_counter()
    limit = len(rows) if settings.n is None else settings.n
    pairs: list[dict] = []
    spans = [s for s in map(answer_spans, rows) if s][:limit]
    splits = [(row, turn, *span) for row, found in enumerate(spans)
              for turn, span in enumerate(found[:1] if settings.turns == "first" else found)]
    with path.open("w", encoding="utf-8") as f:
        for first in range(0, len(splits), settings.answer_rows):
            chunk = splits[first:first + settings.answer_rows]
            outputs = answers(run, [prompt_ids for _, _, prompt_ids, _ in chunk], settings.max_new_tokens,
                              settings.compile, settings.answer_rows)
            for (row, turn, prompt_ids, ref_ids), output in zip(chunk, outputs):
                pair = {"row": row, "turn": turn, "prompt": prompt_text(run.tokenizer, prompt_ids),
                        "reference": run.tokenizer.decode(ref_ids, skip_special_tokens=True).strip(),
                        "output": output}
                pairs.append(pair)
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
            f.flush()  # a stopped eval keeps every finished batch of answers
    print_fn(f"answered {len(pairs)} answers of {len(spans)} rows ({time.perf_counter() - start:.1f} s, greedy, "
             f"at most {settings.max_new_tokens} new tokens, {settings.answer_rows} rows at a time)")
    return pairs


def _add_scores(path: Path, pairs: list[dict], scores: list[dict]) -> None:
    """The answer file again, each row with its own scores (for reading the worst answers)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for pair, row in zip(pairs, scores):
            f.write(json.dumps({**pair, "scores": row}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
