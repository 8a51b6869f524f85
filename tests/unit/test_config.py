"""The config tree: unknown keys, types, YAML quirks, overrides."""

import pytest

from ppalli import config as C
from ppalli.errors import ConfigError


def test_defaults_validate():
    cfg = C.from_dict({})
    assert cfg.train.batch_size == 8 and cfg.lora.targets == "all-linear"


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'; did you mean 'train.lr'"):
        C.from_dict({"train": {"lrr": 1}})


def test_nested_list_of_sections_is_checked():
    with pytest.raises(ConfigError, match=r"data.sources\[0\].wieght.*did you mean 'data.sources\[0\].weight'"):
        C.from_dict({"data": {"sources": [{"path": "a.csv", "wieght": 2}]}})


@pytest.mark.parametrize("text, value", [("off", "off"), ("on", "on"), ("false", "off"), ("auto", "auto")])
def test_yaml_on_off_read_as_words(tmp_path, text, value):
    """YAML 1.1 reads `off` as False: a user writing `fast_path: off` means the word."""
    p = tmp_path / "c.yaml"
    p.write_text(f"plan:\n  fast_path: {text}\n")
    assert C.load(p).plan.fast_path == value
    assert C.load(None, [f"plan.fast_path={text}"]).plan.fast_path == value


def test_scientific_numbers_without_dot(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 2e-4\n")  # YAML 1.1 reads this as text
    assert C.load(p).train.lr == pytest.approx(2e-4)


@pytest.mark.parametrize("override, match", [
    ("train.batch_size=many", "whole number"),
    ("lora.r=0", "must be above 0"),
    ("train.micro_batch_size=3", "multiple of"),
    ("plan.precision=bf61", "did you mean 'bf16'"),
    ("train.lr", "key=value"),
])
def test_bad_values_name_field_and_fix(override, match):
    with pytest.raises(ConfigError, match=match):
        C.load(None, [override])


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for p in configs:
        C.load(p)


def test_describe_lists_every_field_with_a_doc():
    rows = C.describe()
    assert all(doc for _, _, doc in rows), [k for k, _, doc in rows if not doc]
    assert any(k == "train.lr" for k, _, _ in rows)
