"""An Ollama Modelfile beside the exported GGUF, so `ollama create NAME -f Modelfile` prompts and stops as training
did.

Ollama renders prompts with Go's text/template, not Jinja, and falls back to `{{ .Prompt }}` (the bare user text)
for a GGUF whose chat_template it does not recognise, which ppalli's Korean Alpaca template and any template with
its variables set inside will not be. So ppalli's built-in templates are written here as Go templates over what
Ollama passes (template/template.go, Execute): `.Messages` (system turns included; consecutive turns of one role
joined by a blank line) and `.System` (the system turns, joined). Each renders a conversation as the Jinja
template renders it with add_generation_prompt, less the BOS token that Ollama's runner adds by itself when the
GGUF says so (tokenizer.ggml.add_bos_token). benchmarks/check_modelfile_go.py executes them with Go's own
text/template against the Jinja renders.

Two differences stay, both Go's: Llama 3's template trims each message's content in Jinja (Go templates have no
trim), and Gemma's keeps only the last system turn before a user turn where Ollama has already joined
consecutive ones. A model's own template or a custom Jinja one is not translated: the Modelfile then has no
TEMPLATE (Ollama detects the templates of the model families it knows from the GGUF) and says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ppalli.data.templates import Template
from ppalli.errors import ModelError

log = logging.getLogger("ppalli")

# Placeholders filled per run: <BOS> (the BOS text when the GGUF does not add BOS itself), Alpaca's <SYSTEM>,
# <INSTRUCTION>, <RESPONSE> and <EOS>. Each template is the Jinja built-in of the same name in
# ppalli/data/templates.py, messages in, add_generation_prompt on.
GO_TEMPLATES = {
    "chatml": (
        "<BOS>{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"),
    "llama3": (
        "<BOS>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "gemma": (  # a system turn goes in front of the next user turn, as Google's template does
        '<BOS>{{- $system := "" }}{{- range .Messages }}'
        '{{- if eq .Role "system" }}{{ $system = printf "%s\\n\\n" .Content }}'
        '{{- else if eq .Role "user" }}<start_of_turn>user\n{{ $system }}{{ .Content }}<end_of_turn>\n'
        '{{ $system = "" }}'
        "{{- else }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}{{- end }}"
        "<start_of_turn>model\n"),
    "exaone": (  # an empty system block first when the conversation has none; user turns end with a newline
        "<BOS>{{- range $i, $m := .Messages }}"
        '{{- if and (eq $i 0) (ne .Role "system") }}[|system|][|endofturn|]\n{{ end }}'
        '[|{{ .Role }}|]{{ .Content }}{{ if eq .Role "user" }}\n{{ else }}[|endofturn|]\n{{ end }}'
        "{{- end }}[|assistant|]"),
    "alpaca": (  # the first turn's system text, else the default preamble; later system turns dropped
        '<BOS>{{- if and .Messages (eq (index .Messages 0).Role "system") }}{{ (index .Messages 0).Content }}'
        "{{- else }}<SYSTEM>{{ end }}"
        '{{- range .Messages }}{{ if eq .Role "user" }}\n\n<INSTRUCTION>\n{{ .Content }}'
        '{{- else if eq .Role "assistant" }}\n\n<RESPONSE>\n{{ .Content }}<EOS>{{ end }}'
        "{{- end }}\n\n<RESPONSE>\n"),
}


def go_template(tpl: Template, adds_bos: bool) -> str | None:
    """The run's built-in template as Ollama's Go TEMPLATE (its variables written in), or None for a model's own or
    a custom Jinja template. adds_bos: whether the runtime puts BOS before the prompt (the GGUF's add_bos_token);
    when it does not, a template that starts with BOS writes it as text."""
    family = "alpaca" if tpl.name in ("alpaca_en", "alpaca_ko") else tpl.name
    if family not in GO_TEMPLATES:
        return None
    values = dict(tpl.variables)
    starts_with_bos = bool(values.get("bos_token")) and tpl.render([{"role": "user", "content": "x"}], True) \
        .startswith(values["bos_token"])
    fill = {"<BOS>": values["bos_token"] if starts_with_bos and not adds_bos else "",
            "<EOS>": values.get("eos_token", ""), "<SYSTEM>": values.get("default_system", ""),
            "<INSTRUCTION>": values.get("instruction_header", ""), "<RESPONSE>": values.get("response_header", "")}
    go = GO_TEMPLATES[family]
    for mark, text in fill.items():
        if "{{" in text or '"""' in text:
            raise ModelError(f"template {tpl.name}: {text!r} cannot go into a Modelfile TEMPLATE")
        go = go.replace(mark, text)
    if tpl.appends_eos:
        log.warning("Modelfile: training appended %s after each response of template %s (its end of turn is not a "
                    "token); the history Ollama renders lacks it", tpl.eos, tpl.name)
    if adds_bos and not starts_with_bos:
        log.warning("Modelfile: the GGUF adds BOS before every prompt, but template %s did not start with one in "
                    "training; Ollama's prompts begin with a token the model never saw there", tpl.name)
    return go


def modelfile_text(gguf_name: str, tpl: Template, adds_bos: bool, system_prompt: str | None = None) -> str:
    """A Modelfile: FROM the GGUF beside it, the Go TEMPLATE, the run's system prompt, a stop per stop string."""
    lines = [f"# ollama create NAME -f Modelfile   (written by ppalli export; template {tpl.name})",
             f"FROM ./{gguf_name}"]
    go = go_template(tpl, adds_bos)
    if go is None:
        which = "the model's own" if tpl.name == "model" else "custom"
        lines.append(f"# no TEMPLATE: {which} Jinja template, not translated; Ollama uses the one it knows for this "
                     "model family, if any, else write TEMPLATE yourself")
    else:
        lines.append(f'TEMPLATE """{go}"""')
        lines.append("# the TEMPLATE renders system, user and assistant turns only: tools are not translated (the "
                     "GGUF carries the run's Jinja chat template, which llama.cpp's llama-server --jinja renders)")
    if system_prompt:
        if '"""' in system_prompt:
            raise ModelError('data.system_prompt holds """, which a Modelfile SYSTEM cannot carry')
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in tpl.stops]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_modelfile(out_dir: Path, gguf_path: Path, tpl: Template, adds_bos: bool,
                    system_prompt: str | None = None) -> Path:
    path = Path(out_dir) / "Modelfile"
    path.write_text(modelfile_text(Path(gguf_path).name, tpl, adds_bos, system_prompt), encoding="utf-8")
    return path
