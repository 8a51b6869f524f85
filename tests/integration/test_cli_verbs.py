"""The verbs beside train, through the real entry point: data preview, plan, doctor."""

import json

import yaml
from tiny import tiny_config

from ppalli.cli import main


def _cfg(tmp_path, shared_data) -> str:
    model_json = tmp_path / "config.json"
    model_json.write_text(json.dumps(tiny_config("qwen2")))
    cfg = {"model": {"name_or_path": str(model_json), "tokenizer": str(shared_data / "tokenizer_qwen2.5")},
           "data": {"path": str(shared_data / "ko_chatbot_qa" / "ChatbotData.csv"), "limit": 20,
                    "columns": {"question": "Q", "answer": "A"}, "num_proc": 1,
                    "cache_dir": str(tmp_path / "cache")}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return str(path)


def test_data_preview_json_keeps_korean(capsys, tmp_path, shared_data):
    assert main(["data", "preview", _cfg(tmp_path, shared_data), "--n", "2", "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["stats"]["rows_read"] == 20
    text = json.dumps(view, ensure_ascii=False)
    assert "12시 땡!" in text and "\ufffd" not in text


def test_plan_for_a_card_we_do_not_have(capsys, tmp_path, shared_data):
    assert main(["plan", _cfg(tmp_path, shared_data), "--gpu", "T4"]) == 0
    out = capsys.readouterr().out
    precision = next(line for line in out.splitlines() if line.startswith("precision"))
    assert precision.split()[1] == "fp16", precision  # a T4 (7.5) has no bf16


def test_plan_by_memory_and_capability(capsys, tmp_path, shared_data):
    assert main(["plan", _cfg(tmp_path, shared_data), "--gpu-memory", "12GiB", "--capability", "7.5"]) == 0
    assert "predicted peak" in capsys.readouterr().out


def test_plan_reads_the_data_as_train_does(capsys, tmp_path, shared_data):
    cfg = _cfg(tmp_path, shared_data)
    assert main(["plan", cfg, "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    # 20 short Q/A rows: a step's 8 samples hold far fewer tokens than 8 packed rows of data.max_seq_len
    rows = next(line for line in out.splitlines() if line.startswith("rows: "))
    assert "a step's 8 samples hold at most" in rows, rows
    assert main(["plan", cfg, "--gpu", "H100", "--no-data"]) == 0
    without = capsys.readouterr().out
    assert "rows: " not in without and _peak(without) > _peak(out)


def _peak(out: str) -> float:
    line = next(line for line in out.splitlines() if line.startswith("memory: "))
    return float(line.split("predicted peak ")[1].split()[0])


def test_plan_says_when_it_cannot_read_the_data(capsys, tmp_path, shared_data):
    cfg = yaml.safe_load(open(_cfg(tmp_path, shared_data)))
    cfg["data"]["path"] = str(tmp_path / "missing.jsonl")
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(path), "--gpu", "H100"]) == 0
    assert "data: not read" in capsys.readouterr().out


def test_doctor_lists_the_machine(capsys):
    code = main(["doctor"])
    out = capsys.readouterr().out
    assert code in (0, 1) and "python" in out.lower() and "torch" in out.lower()
