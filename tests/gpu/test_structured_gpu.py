"""Structured output on the GPU: xgrammar's bitmask applied to CUDA logits holds rows decoded from the CUDA graph
(under ppalli's decode layers) to their grammars, and a free row beside them decodes as it does alone."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

pytest.importorskip("xgrammar")

from ppalli.data.templates import resolve_template  # noqa: E402
from ppalli.data.tools import calls_in_answer  # noqa: E402
from ppalli.infer.generate import Sampling, generate_rows  # noqa: E402
from ppalli.infer.structured import Grammars  # noqa: E402
from ppalli.models.tokenizer import load_tokenizer  # noqa: E402

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high"]}},
          "required": ["ok", "level"]}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["KST", "UTC"]}}, "required": ["tz"]}}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_decoded_from_the_graph_keep_to_their_grammars(shared_data, dtype):
    tok = load_tokenizer(shared_data / "tokenizer_qwen2.5")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to("cuda", dtype).eval()
    template = resolve_template("chatml", tok)
    grammars = Grammars(tok, 151936, template)
    prompt = tok(template.render([{"role": "user", "content": "지금 몇 시야?"}], add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    held = [None, grammars.for_request(SCHEMA, None, None), grammars.for_request(None, [TIME], "get_time")]
    stop = [tok.convert_tokens_to_ids("<|im_end|>")]
    for sampling in (Sampling(greedy=True), Sampling(temperature=1.5, top_p=1.0)):
        new = generate_rows(model, tok, [prompt] * 3, max_new_tokens=96, sampling=sampling, seeds=[1, 2, 3],
                            grammars=held, stop_ids=stop, graph=True)
        free, answer, call = (tok.decode(ids) for ids in new)
        assert set(json.loads(answer)) == {"ok", "level"}
        content, calls = calls_in_answer(call, {"get_time"})
        assert content is None and calls[0]["function"]["arguments"]["tz"] in ("KST", "UTC")
        alone = generate_rows(model, tok, [prompt], max_new_tokens=96, sampling=sampling, seeds=[1], stop_ids=stop,
                              graph=True)
        assert tok.decode(alone[0]) == free
