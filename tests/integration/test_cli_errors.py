"""Bad inputs through the real `ppalli` entry point: each a clear one-line error, never a traceback."""

import json

import yaml
from tiny import tiny_config

from ppalli.cli import main


def _write_cfg(tmp_path, shared_data, data: dict, **extra) -> str:
    model_json = tmp_path / "config.json"
    model_json.write_text(json.dumps(tiny_config("llama")))
    cfg = {"model": {"name_or_path": str(model_json), "tokenizer": str(shared_data / "tokenizer_qwen2.5")},
           "data": dict({"template": "chatml", "eval_split": 0, "num_proc": 1,
                         "cache_dir": str(tmp_path / "cache")}, **data),
           "train": {"max_steps": 1, "batch_size": 2},
           "plan": {"device": "cpu"}, "logging": {"progress": "none"},
           "output_dir": str(tmp_path / "runs" / "{name}"), "name": "bad"}
    cfg.update(extra)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return str(path)


def _run(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_missing_config_file(capsys, tmp_path):
    msg = _run(capsys, ["train", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in msg and "not found" in msg


def test_unknown_config_key_names_the_closest(capsys, tmp_path, shared_data):
    cfg = _write_cfg(tmp_path, shared_data, {"path": "x.csv"})
    msg = _run(capsys, ["train", cfg, "--set", "train.learning_rate=1e-4"])
    assert "train.learning_rate" in msg


def test_typo_names_the_closest_key(capsys, tmp_path, shared_data):
    cfg = _write_cfg(tmp_path, shared_data, {"path": "x.csv"})
    msg = _run(capsys, ["train", cfg, "--set", "lora.alpah=8"])
    assert "did you mean 'lora.alpha'" in msg


def test_wrong_type(capsys, tmp_path, shared_data):
    cfg = _write_cfg(tmp_path, shared_data, {"path": "x.csv"})
    msg = _run(capsys, ["train", cfg, "--set", "train.batch_size=many"])
    assert "train.batch_size" in msg and "whole number" in msg


def test_missing_data_file(capsys, tmp_path, shared_data):
    cfg = _write_cfg(tmp_path, shared_data, {"path": str(tmp_path / "missing.jsonl")})
    msg = _run(capsys, ["train", cfg])
    assert "missing.jsonl" in msg


def test_empty_data(capsys, tmp_path, shared_data):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = _write_cfg(tmp_path, shared_data, {"path": str(empty)})
    msg = _run(capsys, ["train", cfg])
    assert "empty.jsonl" in msg


def test_row_missing_its_output_column(capsys, tmp_path, shared_data):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "안녕?", "output": "안녕하세요."}, ensure_ascii=False) + "\n"
                    + json.dumps({"instruction": "잘 지내?"}, ensure_ascii=False) + "\n")
    cfg = _write_cfg(tmp_path, shared_data, {"path": str(rows), "format": "alpaca"})
    msg = _run(capsys, ["train", cfg])
    assert "rows.jsonl" in msg and "2" in msg and "output" in msg


def test_max_seq_len_smaller_than_the_prompt(capsys, tmp_path, shared_data):
    rows = tmp_path / "long.jsonl"
    rows.write_text(json.dumps({"instruction": "아주 긴 질문입니다. " * 20, "output": "네."},
                               ensure_ascii=False) + "\n")
    cfg = _write_cfg(tmp_path, shared_data, {"path": str(rows), "max_seq_len": 8})
    msg = _run(capsys, ["train", cfg])
    assert "max_seq_len" in msg


def test_malformed_override(capsys, tmp_path, shared_data):
    cfg = _write_cfg(tmp_path, shared_data, {"path": "x.csv"})
    msg = _run(capsys, ["train", cfg, "--set", "train.lr"])
    assert "key=value" in msg
