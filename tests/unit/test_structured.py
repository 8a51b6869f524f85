"""Structured output (infer/structured.py): the call layout read off real templates, grammars that take the text a
template writes for a call and refuse other calls, and generate_rows holding a tiny random model's rows to them
(free decoding of the same prompt is not JSON: the grammar is what makes it so)."""

import json

import pytest
import torch
import xgrammar as xg
from transformers import LlamaConfig, LlamaForCausalLM

from ppalli.data.templates import render_pair, resolve_template
from ppalli.data.tools import calls_in_answer
from ppalli.infer.generate import Sampling, generate, generate_rows
from ppalli.infer.structured import ConstraintError, Grammars, call_layout, response_format, tools_and_choice
from ppalli.models.tokenizer import load_tokenizer

TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["KST", "UTC"]}}, "required": ["tz"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}
# Llama 3.1's way: a bare {"name", "parameters"} object after the header, one call a turn (it raises on more)
LLAMA31 = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
           "{% if m.tool_calls %}{% if m.tool_calls | length != 1 %}"
           "{{ raise_exception('This model only supports single tool-calls at once!') }}{% endif %}"
           "{{ '{\"name\": \"' + m.tool_calls[0].function.name + '\", \"parameters\": ' }}"
           "{{ m.tool_calls[0].function.arguments | tojson }}{{ '}' }}"
           "{% else %}{{ m.content }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QUESTION = [{"role": "user", "content": "지금 서울은 몇 시야?"}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high"]}},
          "required": ["ok", "level"]}


@pytest.fixture(scope="module")
def tok(shared_data):
    return load_tokenizer(shared_data / "tokenizer_qwen2.5")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_the_call_layout_is_read_off_the_templates(tok):
    qwen = call_layout(resolve_template("auto", tok))  # Qwen2.5's own template, from the tokenizer
    assert (qwen.opening, qwen.between, qwen.closing) == ("<tool_call>\n", "\n</tool_call>\n<tool_call>\n",
                                                          "\n</tool_call>")
    assert qwen.keys == ("name", "arguments")
    assert call_layout(resolve_template("chatml", tok)) == qwen
    llama = call_layout(resolve_template(LLAMA31, tok))
    assert (llama.opening, llama.between, llama.closing, llama.keys) == ("", None, "", ("name", "parameters"))
    with pytest.raises(ConstraintError, match="does not write a call as a JSON object"):
        call_layout(resolve_template("{% for m in messages %}{{ m.content }}{{ '<|im_end|>' }}{% endfor %}", tok))


@pytest.mark.parametrize("spec", ["auto", LLAMA31])
def test_a_forced_call_grammar_takes_the_templates_own_call_and_no_other(tok, spec):
    template = resolve_template(spec, tok)
    grammars = Grammars(tok, 151936, template)
    call = {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "KST"}}}

    def written_calls(*calls) -> str:  # the calls as the template writes them, up to the turn's end
        turn = {"role": "assistant", "content": "", "tool_calls": list(calls)}
        pre, post = render_pair(template, QUESTION + [turn], 1, "test", [TIME, WEATHER])
        return post[len(pre):].split("<|im_end|>")[0]

    written = written_calls(call)

    def takes(text: str, forced: str) -> bool:
        matcher = xg.GrammarMatcher(grammars.for_request(None, [TIME, WEATHER], forced))
        return matcher.accept_string(text) and matcher.is_completed()

    assert takes(written, "get_time") and takes(written, "required")
    assert not takes(written, "get_weather")  # a named choice takes only its tool
    assert not takes(written.replace("KST", "PST"), "required")  # arguments outside the tool's schema
    assert not takes(written.replace('"tz"', '"zone"'), "get_time")
    if spec == "auto":  # parallel calls, where the template writes them
        weather = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "서울", "days": 2}}}
        two = written_calls(call, weather)
        assert takes(two, "required") and not takes(two, "get_time")  # a named choice is one call
        one = xg.GrammarMatcher(grammars.for_request(None, [TIME, WEATHER], "required", parallel=False))
        assert not (one.accept_string(two) and one.is_completed())  # parallel_tool_calls false: one call


def test_auto_calls_are_held_to_the_tools_and_text_stays_free(tok):
    grammars = Grammars(tok, 151936, resolve_template("auto", tok))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    call = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "KST"}}\n</tool_call>'

    def takes(text: str, parallel: bool = True) -> bool:  # the text, then the end of the turn
        matcher = xg.GrammarMatcher(grammars.for_request(None, [TIME, WEATHER], None, parallel),
                                    override_stop_tokens=[end])
        return all(matcher.accept_token(t) for t in tok(text, add_special_tokens=False)["input_ids"] + [end])

    assert takes("지금은 오후 3시예요.") and takes("확인해 볼게요.\n" + call) and takes(call + "\n" + call)
    assert not takes(call.replace("KST", "PST")) and not takes(call.replace("get_time", "get_date"))
    assert not takes(call[:-len("\n</tool_call>")])  # a call left open cannot end the turn
    assert not takes(call + "\n" + call, parallel=False) and takes(call, parallel=False)
    # Llama 3.1's calls open with no marker: nothing tells a call's start from text, so auto stays free
    assert Grammars(tok, 151936, resolve_template(LLAMA31, tok)).for_request(None, [TIME], None) is None


@pytest.mark.parametrize("spec", ["auto", LLAMA31])
def test_a_schema_beside_tools_on_auto_takes_its_json_or_calls(tok, spec):
    """response_format with tools and tool_choice "auto": the reply is the schema's JSON, or the tools' calls in the
    template's layout (Qwen2.5's <tool_call> blocks; Llama 3.1's bare object); free text and other JSON are not."""
    grammars = Grammars(tok, 151936, resolve_template(spec, tok))
    call = ('<tool_call>\n{"name": "get_time", "arguments": {"tz": "KST"}}\n</tool_call>' if spec == "auto"
            else '{"name": "get_time", "parameters": {"tz": "KST"}}')

    def takes(text: str, tools=(TIME, WEATHER)) -> bool:
        matcher = xg.GrammarMatcher(grammars.for_request(SCHEMA, list(tools) or None, None))
        return matcher.accept_string(text) and matcher.is_completed()

    assert takes('{"ok": true, "level": "low"}') and takes(call)
    assert not takes(call.replace("KST", "PST")) and not takes('{"ok": "yes", "level": "low"}')
    assert not takes("지금은 오후 3시예요.")
    assert not takes(call, tools=())  # without tools, the schema alone
    if spec == "auto":
        assert takes(call + "\n" + call)  # parallel calls, as the template writes them


def test_a_reasoning_runs_thinking_stays_free_and_its_reply_is_held(tok):
    """serve --reasoning: the answer may open with a <think> block (free text), then the shape asked."""
    grammars = Grammars(tok, 151936, resolve_template("auto", tok))
    think = "<think>\n서울 시간은 KST로 답하자. {아직 JSON 아님}\n</think>\n\n"
    call = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "KST"}}\n</tool_call>'

    def takes(request: tuple, text: str, thinking: bool = True) -> bool:
        matcher = xg.GrammarMatcher(grammars.for_request(*request, thinking=thinking))
        return matcher.accept_string(text) and matcher.is_completed()

    for request, reply in (((SCHEMA, None, None), '{"ok": true, "level": "low"}'),
                           ((None, [TIME, WEATHER], "get_time"), call)):
        assert takes(request, think + reply) and takes(request, reply)
        assert not takes(request, think + reply, thinking=False)
        assert not takes(request, "생각: " + reply) and not takes(request, think + "그냥 답할게요.")


def test_requests_name_the_field_that_cannot_be_served():
    assert tools_and_choice({"tools": [TIME]}) == ([TIME], None)
    assert tools_and_choice({"tools": [TIME], "tool_choice": "none"}) == (None, None)
    assert tools_and_choice({"tools": [TIME], "tool_choice": "required"}) == ([TIME], "required")
    named = {"type": "function", "function": {"name": "get_time"}}
    assert tools_and_choice({"tools": [TIME], "tool_choice": named}) == ([TIME], "get_time")
    for bad, says in ((named, "offers 'get_weather'"), ("any", "must be"),
                      ({"type": "function"}, "a named choice")):
        tools = [WEATHER] if says.startswith("offers") else [TIME]
        with pytest.raises(ConstraintError, match=says):
            tools_and_choice({"tools": tools, "tool_choice": bad})
    with pytest.raises(ConstraintError, match="offers none"):
        tools_and_choice({"tool_choice": "required"})
    assert response_format({"type": "text"}) is None and response_format(None) is None
    assert response_format({"type": "json_object"}) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) == schema
    for bad in ({"type": "json_schema"}, {"type": "yaml"}, "json"):
        with pytest.raises(ConstraintError, match="'response_format'"):
            response_format(bad)


def test_a_schema_that_does_not_compile_and_two_constraints_at_once_are_refused(tok):
    grammars = Grammars(tok, 151936, resolve_template("chatml", tok))
    with pytest.raises(ConstraintError, match="does not compile"):
        grammars.for_request({"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}}, None, None)
    with pytest.raises(ConstraintError, match="send one of them"):
        grammars.for_request({"type": "object"}, [TIME], "required")
    assert grammars.for_request(None, None, None) is None  # no tools, no format: free text, no grammar


GREEDY = Sampling(greedy=True)


def _decode(model, tok, prompts, grammars, sampling=GREEDY, n=40) -> list[str]:
    new = generate_rows(model, tok, prompts, max_new_tokens=n, sampling=sampling, grammars=grammars,
                        stop_ids=[tok.convert_tokens_to_ids("<|im_end|>")], graph=False)
    return [tok.decode(ids) for ids in new]


def test_generate_rows_holds_each_row_to_its_own_grammar(model, tok):
    template = resolve_template("chatml", tok)
    grammars = Grammars(tok, 151936, template)
    prompt = tok(template.render(QUESTION, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    json_schema = grammars.for_request(SCHEMA, None, None)
    json_object = grammars.for_request({"type": "object"}, None, None)
    forced = grammars.for_request(None, [TIME, WEATHER], "get_time")
    free, held, anything, called = _decode(model, tok, [prompt] * 4, [None, json_schema, json_object, forced])
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)  # the random model's own answer: no JSON
    assert _decode(model, tok, [prompt], None) == [free]  # a free row beside held ones decodes as it does alone
    value = json.loads(held)
    alone = generate(model, tok, torch.tensor([prompt]), greedy=True, max_new_tokens=40, grammar=json_schema,
                     stop_ids=[tok.convert_tokens_to_ids("<|im_end|>")], graph=False)
    assert tok.decode(alone) == held  # generate (chat's) holds its one row as generate_rows does
    assert set(value) == {"ok", "level"} and isinstance(value["ok"], bool) and value["level"] in ("low", "high")
    assert isinstance(json.loads(anything), dict)
    content, calls = calls_in_answer(called, {"get_time", "get_weather"})
    assert content is None and [c["function"]["name"] for c in calls] == ["get_time"]
    assert calls[0]["function"]["arguments"]["tz"] in ("KST", "UTC")
    sampled = _decode(model, tok, [prompt] * 3, [json_schema] * 3, Sampling(temperature=1.5, top_p=1.0))
    for text in sampled:  # sampling at a high temperature stays inside the grammar too
        assert set(json.loads(text)) == {"ok", "level"}
