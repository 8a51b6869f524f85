"""`ppalli eval` on a tiny trained run: the held-out loss training wrote, references read from the data."""

import csv
import json

import pytest

pytest.importorskip("rouge_score")

from ppalli.cli import main  # noqa: E402
from ppalli.data.masking import answer_spans, prompt_and_reference  # noqa: E402
from ppalli.train import recipe  # noqa: E402


def _final_eval_loss(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r["eval_loss"] for r in rows if "eval_loss" in r][-1]


@pytest.fixture
def run_dir(make_cfg, quiet):
    cfg = make_cfg(name="evaluated", data__limit=16, data__eval_split=4, train__max_steps=4)
    return recipe.train(cfg, print_fn=quiet).run_dir


def test_eval_repeats_the_runs_held_out_loss_and_scores_answers(run_dir, shared_data, capsys):
    assert main(["eval", str(run_dir), "--n", "3", "--max-new-tokens", "6", "--batch-size", "3"]) == 0
    summary = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    assert summary["loss_rows"] == 4 and summary["answered"] == 3 and summary["settings"]["micro_batch_size"] == 3
    assert summary["loss"] == pytest.approx(_final_eval_loss(run_dir), rel=1e-5)  # same rows, same adapter
    assert summary["perplexity"] == pytest.approx(2.718281828 ** summary["loss"], rel=1e-6)
    assert set(summary["metrics"]) == {"exact_match"} | {f"{u}.rouge{k}" for u in ("word", "syllable")
                                                          for k in ("1", "2", "L")}
    assert all(0.0 <= v <= 1.0 for v in summary["metrics"].values())

    with (shared_data / "ko_chatbot_qa" / "ChatbotData.csv").open(encoding="utf-8") as f:
        answers = {row["Q"]: row["A"] for row in csv.DictReader(f)}
    rows = [json.loads(x) for x in (run_dir / "eval_samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["prompt"] in answers, row["prompt"]  # the question alone, role lines dropped
        assert row["reference"] == answers[row["prompt"]]  # the data's answer, without the end-of-turn token
        assert set(row["scores"]) == set(summary["metrics"])
    assert "syllable.rougeL" in capsys.readouterr().out


def test_merged_answers_equal_the_adapters_in_fp32(run_dir, tmp_path, capsys):
    """eval, generate: the adapter merged for decoding (the default) answers as PEFT's separate branch does, in
    fp32 (summation order only); the loss never merges."""
    for flag in ([], ["--no-merge"]):
        out = tmp_path / ("separate" if flag else "merged")
        assert main(["eval", str(run_dir), "--n", "3", "--max-new-tokens", "6", "--out", str(out), *flag]) == 0
        assert main(["generate", str(run_dir), "--prompt", "안녕하세요", "--prompt", "배고파", "--greedy",
                     "--max-new-tokens", "6", "--out", str(out / "answers.jsonl"), *flag]) == 0
    merged, separate = (json.loads((tmp_path / k / "eval.json").read_text()) for k in ("merged", "separate"))
    assert "merged into" in merged["answers_model"] and "separate" in separate["answers_model"]
    assert merged["loss"] == separate["loss"] and merged["metrics"] == separate["metrics"]
    for name in ("eval_samples.jsonl", "answers.jsonl"):
        texts = [[json.loads(x)["output"] for x in
                  (tmp_path / k / name).read_text(encoding="utf-8").splitlines()] for k in ("merged", "separate")]
        assert texts[0] == texts[1] and len(texts[0]) in (2, 3)
    assert "adapter merged into" in capsys.readouterr().err  # generate says how it decodes


def test_generate_holds_answers_to_a_json_schema(run_dir, tmp_path, capsys):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high"]}},
              "required": ["ok", "level"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    out = tmp_path / "answers.jsonl"
    assert main(["generate", str(run_dir), "--prompt", "서울 날씨 어때?", "--prompt", "배고파", "--greedy",
                 "--max-new-tokens", "48", "--json-schema", str(tmp_path / "schema.json"), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["json"] == json.loads(row["output"]) and set(row["json"]) == {"ok", "level"}
    (tmp_path / "bad.json").write_text("{type: object}")
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "x", "--json-schema", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: not JSON" in capsys.readouterr().err


def test_eval_on_a_file_takes_every_row(run_dir, shared_data, tmp_path):
    data = shared_data / "ko_chatbot_qa" / "ChatbotData.csv"
    out = tmp_path / "eval-file"
    assert main(["eval", str(run_dir), "--data", str(data), "--set", "data.limit=5", "--n", "2",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    summary = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert summary["loss_rows"] == 5 and summary["answered"] == 2 and "every row" in summary["rows"]
    assert summary["settings"]["micro_batch_size"] == 16  # a Llama: the chunked loss, so the larger default
    assert not (run_dir / "eval.json").exists()


def test_eval_scores_each_answer_of_a_multi_turn_row_after_the_conversation_before_it(run_dir, tmp_path):
    turns = [("서울 날씨 어때?", "맑아요."), ("내일은?", "비가 온대요."), ("우산 챙길까?", "네, 챙기세요.")]
    rows = [{"messages": [m for q, a in turns[k:k + 2] for m in ({"role": "user", "content": q},
                                                                   {"role": "assistant", "content": a})]}
            for k in range(2)]
    data = tmp_path / "multi.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    for flag, answered in (("all", 4), ("first", 2)):
        out = tmp_path / flag
        assert main(["eval", str(run_dir), "--data", str(data), "--set", "data.columns={}", "--turns", flag,
                     "--max-new-tokens", "3", "--out", str(out)]) == 0
        summary = json.loads((out / "eval.json").read_text(encoding="utf-8"))
        assert summary["answered"] == answered and summary["answered_rows"] == 2
    samples = [json.loads(x) for x in (tmp_path / "all" / "eval_samples.jsonl").read_text().splitlines()]
    assert [(s["row"], s["turn"], s["reference"]) for s in samples] == [
        (0, 0, "맑아요."), (0, 1, "비가 온대요."), (1, 0, "비가 온대요."), (1, 1, "네, 챙기세요.")]
    assert "맑아요." in samples[1]["prompt"] and "내일은?" in samples[1]["prompt"]  # the conversation so far
    assert "맑아요." not in samples[0]["prompt"]


def test_eval_without_held_out_rows_says_what_to_give(make_cfg, quiet, capsys):
    run_dir = recipe.train(make_cfg(name="no-split", train__max_steps=1), print_fn=quiet).run_dir
    assert main(["eval", str(run_dir), "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert "data.eval_split: 0" in err and "--data FILE" in err


def test_prompt_and_reference_of_sft_and_preference_samples():
    sft = {"input_ids": [1, 2, 3, 4, 5, 6, 7], "labels": [-100, -100, -100, 4, 5, -100, 7]}
    assert prompt_and_reference(sft) == ([1, 2, 3], [4, 5])  # the first trained run only
    assert answer_spans(sft) == [([1, 2, 3], [4, 5]), ([1, 2, 3, 4, 5, 6], [7])]  # each, after all before it
    pair = {"chosen_input_ids": [1, 2, 8], "chosen_labels": [-100, -100, 8],
            "rejected_input_ids": [1, 2, 9], "rejected_labels": [-100, -100, 9]}
    assert prompt_and_reference(pair) == ([1, 2], [8])
    assert prompt_and_reference({"input_ids": [1, 2], "labels": [-100, -100]}) is None


def test_eval_of_a_dpo_run_scores_the_chosen_answers(make_cfg, quiet, shared_data):
    from ppalli.eval.runner import EvalSettings, evaluate_run

    cfg = make_cfg(name="dpo-eval", train__objective="dpo", train__max_steps=2, train__batch_size=4,
                   data__path=str(shared_data / "ko_preference_rlhf" / "step2_yitingxie_ko.jsonl"), data__columns={},
                   data__max_seq_len=256, data__packing="off", data__limit=12, data__eval_split=3)
    run_dir = recipe.train(cfg, print_fn=quiet).run_dir
    summary = evaluate_run(run_dir, settings=EvalSettings(n=2, max_new_tokens=4), print_fn=quiet)
    assert summary["objective"] == "dpo" and summary["perplexity"] is None and summary["loss_rows"] == 3
    assert summary["loss"] == pytest.approx(_final_eval_loss(run_dir), rel=1e-5)
    rows = [json.loads(x) for x in (run_dir / "eval_samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and all(r["reference"] for r in rows)
    # the held-out pairs' implicit rewards, as training's last eval row wrote them (3 pairs: thirds)
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    assert summary["reward_accuracy"] == last["eval_reward_accuracy"] and summary["reward_accuracy"] * 3 in (0, 1, 2, 3)
    assert summary["reward_margin"] == pytest.approx(last["eval_reward_margin"], rel=1e-4, abs=1e-7)
