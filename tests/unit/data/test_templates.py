"""Templates: exact text of every built-in, trained segments, EOS always ending a response, the sandbox."""

from __future__ import annotations

import logging

import pytest

from ppalli.data.sources import RowError
from ppalli.data.templates import render_segments, resolve_template, text_segments
from ppalli.errors import DataError

CHAT = [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "반가워"}]
TWO_TURNS = [{"role": "system", "content": "짧게"}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
             {"role": "assistant", "content": "d"}]


def _trained(segments) -> list[str]:
    return [text for text, trained in segments if trained]


def test_chatml(qwen_tok):
    tpl = resolve_template("chatml", qwen_tok)
    segments = render_segments(tpl, CHAT, "responses", "x")
    assert segments == [("<|im_start|>user\n안녕<|im_end|>\n<|im_start|>assistant\n", False),
                        ("반가워<|im_end|>", True), ("\n", False)]


def test_llama3(llama3_tok):
    tpl = resolve_template("llama3", llama3_tok)
    assert render_segments(tpl, CHAT, "responses", "x") == [
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n안녕<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("반가워<|eot_id|>", True)]


def test_alpaca_ko_and_en(llama2_tok):
    ko = resolve_template("alpaca_ko", llama2_tok)
    assert render_segments(ko, CHAT, "responses", "x") == [
        ("<s>아래는 작업을 설명하는 지시문입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n"
         "### 질문:\n안녕\n\n### 답변:\n", False),
        ("반가워</s>", True)]
    en = resolve_template("alpaca_en", llama2_tok)
    text = "".join(t for t, _ in render_segments(en, TWO_TURNS, "responses", "x"))
    assert text == ("<s>짧게\n\n### Instruction:\na\n\n### Response:\nb</s>\n\n### Instruction:\nc\n\n"
                    "### Response:\nd</s>")  # a system message replaces the preamble


def test_gemma_folds_system_into_the_user_turn(tiny_tok):
    tok = tiny_tok(["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>")
    tpl = resolve_template("gemma", tok)
    messages = [{"role": "system", "content": "S"}] + CHAT
    assert render_segments(tpl, messages, "responses", "x") == [
        ("<bos><start_of_turn>user\nS\n\n안녕<end_of_turn>\n<start_of_turn>model\n", False),
        ("반가워<end_of_turn>", True), ("\n", False)]


def test_exaone(tiny_tok):
    tok = tiny_tok(["[|endofturn|]"], None, "[|endofturn|]")
    tpl = resolve_template("exaone", tok)
    assert render_segments(tpl, CHAT, "responses", "x") == [
        ("[|system|][|endofturn|]\n[|user|]안녕\n[|assistant|]", False), ("반가워[|endofturn|]", True),
        ("\n", False)]


def test_train_on_every_last_or_all(qwen_tok):
    tpl = resolve_template("chatml", qwen_tok)
    assert _trained(render_segments(tpl, TWO_TURNS, "responses", "x")) == ["b<|im_end|>", "d<|im_end|>"]
    assert _trained(render_segments(tpl, TWO_TURNS, "last", "x")) == ["d<|im_end|>"]
    everything = render_segments(tpl, TWO_TURNS, "all", "x")
    assert all(trained for _, trained in everything)
    assert "".join(t for t, _ in everything) == tpl.render(TWO_TURNS)


def test_auto_picks_the_model_template_else_alpaca(qwen_tok, llama2_tok, llama3_tok):
    assert resolve_template("auto", qwen_tok).name == "model"
    own = resolve_template("auto", qwen_tok)
    assert own.render(CHAT).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert resolve_template("auto", llama3_tok).source == resolve_template("llama3", llama3_tok).source
    assert resolve_template("auto", llama2_tok).name == "alpaca_en"


def test_stops_are_eos_and_end_of_turn_tokens_of_the_vocabulary(qwen_tok, llama3_tok):
    assert resolve_template("chatml", qwen_tok).stops == ("<|endoftext|>", "<|im_end|>")
    assert resolve_template("llama3", llama3_tok).stops == ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")


def test_template_that_drops_eos_gets_it_appended_with_a_warning(qwen_tok, caplog):
    plain = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")
    with caplog.at_level(logging.WARNING, logger="ppalli.data"):
        tpl = resolve_template(plain, qwen_tok)
    assert tpl.name == "custom" and tpl.appends_eos
    assert "appends <|endoftext|>" in caplog.text
    assert render_segments(tpl, CHAT, "responses", "x") == [("user: 안녕\nassistant: ", False),
                                                           ("반가워\n<|endoftext|>", True)]


def test_turn_token_missing_from_the_vocabulary_warns(llama2_tok, caplog):
    with caplog.at_level(logging.WARNING, logger="ppalli.data"):
        tpl = resolve_template("chatml", llama2_tok)
    assert "<|im_end|> is not a token of this tokenizer" in caplog.text
    assert _trained(render_segments(tpl, CHAT, "responses", "x")) == ["반가워<|im_end|>\n</s>"]


def test_raw_text_segments(llama2_tok):
    tpl = resolve_template("alpaca_en", llama2_tok)
    assert text_segments(tpl, "본문") == [("<s>", False), ("본문</s>", True)]


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # reaching Python internals
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}{% for m in messages %}{{ m.content }}{% endfor %}",
    "{% include '/etc/passwd' %}",  # no file access: the environment has no loader
])
def test_sandbox_refuses_code(qwen_tok, source):
    with pytest.raises(DataError, match="data.template: template custom failed"):
        resolve_template(source, qwen_tok)


def test_non_incremental_template_is_refused(qwen_tok):
    rewrites = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m.content }}|{% endfor %}"
                "{% if add_generation_prompt %}A:{% endif %}")
    with pytest.raises(DataError, match="does not render turn 2 as an extension"):
        resolve_template(rewrites, qwen_tok)


# As Qwen3's template does: the answer after the last user turn opens with its thinking (an empty <think> block when
# it has none); an earlier answer shows only its text after any thinking. So rendered alone as the last turn, an
# earlier answer reads otherwise than inside the whole conversation.
THINKING = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% set answer = m.content.split('</think>')[-1].strip() %}"
    "{% set thought = m.content.split('</think>')[0].split('<think>')[-1].strip() if '</think>' in m.content else '' %}"
    "{{ '<|im_start|>assistant\\n' }}{% if loop.index0 > ns.last %}{{ '<think>\\n' + thought + '\\n</think>\\n\\n' }}"
    "{% endif %}{{ answer + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_template_that_drops_earlier_thinking_trains_what_the_conversation_shows(qwen_tok):
    """Qwen3-style: every answer is located in the whole conversation's text; the earlier one trains without its
    thinking (as the history shows it), the last one with its <think> block."""
    tpl = resolve_template(THINKING, qwen_tok)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>hm</think>b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>ok</think>d"}]
    segments = render_segments(tpl, messages, "responses", "x")
    assert _trained(segments) == ["b<|im_end|>", "<think>\nok\n</think>\n\nd<|im_end|>"]
    assert "".join(t for t, _ in segments) == tpl.render(messages)
    broken = THINKING.replace("answer + '<|im_end|>", "'<|im_end|>")  # a template that loses the answers
    with pytest.raises(RowError, match="writes assistant turn 2 differently"):
        render_segments(resolve_template(broken, qwen_tok), messages, "responses", "x")


def test_reasoning_apart_goes_to_a_template_that_reads_it_else_in_front_as_a_think_block(qwen_tok):
    """An answer with "reasoning_content" (Qwen3's / DeepSeek-R1's data): a template that reads the field renders it
    itself; chatml, which does not, gets it as a <think> block in front of the answer. Both train it."""
    from ppalli.data.formats import normalize
    from ppalli.data.sources import Row

    answer = {"role": "assistant", "content": "4", "reasoning_content": "둘 더하기 둘"}
    row = Row({"messages": [{"role": "user", "content": "2+2?"}, answer]}, "f", "line", 1)
    messages = normalize(row, "messages", {})["messages"]
    assert messages[1] == {"role": "assistant", "content": "4", "reasoning_content": "둘 더하기 둘"}
    chatml = resolve_template("chatml", qwen_tok)
    assert _trained(render_segments(chatml, messages, "responses", "x")) == [
        "<think>\n둘 더하기 둘\n</think>\n\n4<|im_end|>"]
    reads = resolve_template(THINKING.replace("m.content.split('</think>')[0].split('<think>')[-1].strip() if "
                                              "'</think>' in m.content else ''", "m.reasoning_content or ''"), qwen_tok)
    assert _trained(render_segments(reads, messages, "responses", "x")) == [
        "<think>\n둘 더하기 둘\n</think>\n\n4<|im_end|>"]


def test_raise_exception_becomes_a_row_error(qwen_tok):
    picky = ("{% for m in messages %}{% if m.content == 'bad' %}{{ raise_exception('no bad words') }}{% endif %}"
             "{{ m.content + eos_token }}{% endfor %}")
    tpl = resolve_template(picky, qwen_tok)
    with pytest.raises(RowError, match=r"f line 3: template custom refused the conversation \(no bad words\)"):
        render_segments(tpl, [{"role": "user", "content": "bad"}, CHAT[1]], "responses", "f line 3")


def test_unknown_name_and_bad_jinja(qwen_tok):
    with pytest.raises(DataError, match="unknown template 'chatmel'"):
        resolve_template("chatmel", qwen_tok)
    with pytest.raises(DataError, match="not valid Jinja"):
        resolve_template("{% for m in messages %}", qwen_tok)


@pytest.mark.parametrize("spec,tok_name", [("alpaca_ko", "llama2_tok"), ("alpaca_en", "llama2_tok"),
                                           ("chatml", "qwen_tok"), ("llama3", "llama3_tok"), ("gemma", "llama2_tok")])
def test_exported_template_renders_in_transformers_as_training_did(spec, tok_name, request):
    """standalone_source (what `ppalli export` saves as the chat_template): transformers' own apply_chat_template,
    which passes no template variables, renders the prompts render_prompt gave training (Alpaca's Korean
    headers and preamble included)."""
    import copy

    from ppalli.data.templates import render_prompt, standalone_source
    from ppalli.data.tokenize import with_system

    tok = copy.deepcopy(request.getfixturevalue(tok_name))
    tpl = resolve_template(spec, tok)
    tok.chat_template = standalone_source(tpl)
    for messages in ([{"role": "user", "content": "오늘 뭐 먹지?\n\"따옴표\" {{ x }}"}],
                     [{"role": "system", "content": "짧게."}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]):
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
            render_prompt(tpl, messages)
    system = "너는 \"친절한\" 상담원이야. {{ x }}"  # a run's data.system_prompt goes in front where none is sent
    tok.chat_template = standalone_source(tpl, system)
    for messages in ([{"role": "user", "content": "a"}], [{"role": "system", "content": "짧게."},
                                                          {"role": "user", "content": "a"}]):
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
            render_prompt(tpl, with_system(messages, system))
