"""The Ollama Modelfile `ppalli export --gguf` writes: its Go TEMPLATE for each built-in template, executed by Go's
own text/template as Ollama executes it (benchmarks/check_modelfile_go.go; skipped without a `go` toolchain),
renders what the Jinja template renders for training, less the BOS the GGUF has the runtime add."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ppalli.data.templates import BUILTIN, resolve_template
from ppalli.export.gguf import adds_bos
from ppalli.export.modelfile import go_template, modelfile_text
from ppalli.models.tokenizer import load_tokenizer

GO_RENDERER = Path(__file__).resolve().parents[2] / "benchmarks" / "check_modelfile_go.go"
# template -> the tokenizer it is checked with (its BOS rule decides whether the Go template writes BOS)
TOKENIZERS = {"alpaca_en": "tokenizer_llama3", "alpaca_ko": "tokenizer_qwen2.5", "chatml": "tokenizer_qwen2.5",
              "llama3": "tokenizer_llama3", "gemma": "tokenizer_llama2", "exaone": "tokenizer_qwen2.5"}
CONVERSATIONS = [
    [{"role": "user", "content": "오늘 뭐 먹지?"}],
    [{"role": "system", "content": "너는 친절한 비서야."}, {"role": "user", "content": "안녕?"}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2입니다."},
     {"role": "user", "content": "그럼 2+2는?"}],
    [{"role": "system", "content": "Answer in English."}, {"role": "user", "content": "Line one\nline two"},
     {"role": "assistant", "content": "Sure:\n- a\n- b"}, {"role": "user", "content": "Thanks {{ .System }}"}],
]


def go_renders(cases: list[dict]) -> list[str]:
    """Each {template, messages} rendered by Go's text/template with Ollama's .System / .Messages."""
    done = subprocess.run(["go", "run", str(GO_RENDERER)], input=json.dumps(cases), capture_output=True, text=True,
                          check=True, timeout=300)
    return json.loads(done.stdout)


def jinja_and_go(shared_data, name: str) -> list[tuple[str, str]]:
    """(Jinja render less the runtime's BOS, Go render) for each conversation, with `name`'s tokenizer."""
    tok = load_tokenizer(shared_data / TOKENIZERS[name])
    tpl, bos = resolve_template(name, tok), adds_bos(tok)
    go = go_template(tpl, bos)
    want = []
    for messages in CONVERSATIONS:
        text = tpl.render(messages, add_generation_prompt=True)
        want.append(text[len(tok.bos_token):] if bos and text.startswith(tok.bos_token) else text)
    got = go_renders([{"template": go, "messages": m} for m in CONVERSATIONS])
    return list(zip(want, got))


@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain (apt install golang-go)")
@pytest.mark.parametrize("name", list(BUILTIN))
def test_go_template_renders_what_training_rendered(shared_data, name):
    for want, got in jinja_and_go(shared_data, name):
        assert got == want


def test_modelfile_names_the_gguf_template_system_and_stops(shared_data):
    tok = load_tokenizer(shared_data / "tokenizer_qwen2.5")
    text = modelfile_text("model-q4_k_m.gguf", resolve_template("alpaca_ko", tok), adds_bos=False,
                          system_prompt="너는 한국어 비서야.")
    lines = text.splitlines()
    assert lines[1] == "FROM ./model-q4_k_m.gguf"
    assert 'TEMPLATE """' in text and "### 질문:" in text and "### 답변:" in text and "<BOS>" not in text
    assert "tools are not translated" in text
    assert 'SYSTEM """너는 한국어 비서야."""' in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    custom = resolve_template("{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}", tok)
    text = modelfile_text("m.gguf", custom, adds_bos=False)
    assert not any(line.startswith("TEMPLATE") for line in text.splitlines()) and "# no TEMPLATE: custom" in text


def test_bos_goes_in_the_template_only_when_the_runtime_does_not_add_it(shared_data):
    tok = load_tokenizer(shared_data / "tokenizer_llama3")
    tpl = resolve_template("llama3", tok)
    assert not go_template(tpl, adds_bos=True).startswith("<|begin_of_text|>")
    assert go_template(tpl, adds_bos=False).startswith("<|begin_of_text|>")
