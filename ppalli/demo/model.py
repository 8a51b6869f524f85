"""The demo model: a tiny Llama config that the normal loader builds with random weights.

`prepare_demo` writes one self-contained folder (config.json, generation_config.json and the tokenizer),
so `ppalli train` with no config goes through the same loading path as a real model folder.
"""

from __future__ import annotations

from pathlib import Path

from transformers import GenerationConfig, LlamaConfig

from ppalli.demo.data import write_demo_data
from ppalli.demo.tokenizer import EOS, IM_END, PAD, SPECIAL_TOKENS, build_demo_tokenizer

PAD_ID, EOS_ID, IM_END_ID = (SPECIAL_TOKENS.index(t) for t in (PAD, EOS, IM_END))

# Training settings the demo needs on top of the config defaults. LoRA on a random base learns slowly at
# the usual 2e-4; measured on 2 CPU threads (torch 2.13, fp32, batch 8, r=16 all-linear, cosine):
# lr 2e-4 -> loss 8.1 to 6.9 in 80 steps; lr 5e-3 -> 8.3-8.5 to 1.1-1.2 in 100 steps, 26 ms a step.
DEMO_TRAIN = {"lr": 5e-3, "max_steps": 200, "warmup_steps": 5}


def demo_model_config(vocab_size: int) -> LlamaConfig:
    """A 1.9 M-parameter Llama (hidden 192, 4 layers, GQA 4/2) sized for seconds of CPU training."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,  # 2 layers reached loss 3.0 where 4 reached 2.2 in the same 80 steps
        num_attention_heads=4,
        num_key_value_heads=2,  # exercises the grouped-query paths that real models take
        max_position_embeddings=512,
        tie_word_embeddings=True,
        # The frozen tied embedding caps the logits LoRA can reach at about std * hidden: at HF's 0.02 that
        # is ~4, too flat to fit the data (loss stuck near 5); 0.1 trains well, 0.2 starts unstable.
        initializer_range=0.1,
        pad_token_id=PAD_ID,
        bos_token_id=None,  # the ChatML template marks turns itself
        eos_token_id=[IM_END_ID, EOS_ID],  # answers end with <|im_end|>; <|eos|> stops too
    )


def _write_model_dir(model_dir: Path) -> None:
    tokenizer = build_demo_tokenizer(model_dir)
    config = demo_model_config(len(tokenizer))
    config.save_pretrained(model_dir)
    generation = GenerationConfig(eos_token_id=[IM_END_ID, EOS_ID], pad_token_id=PAD_ID, do_sample=True,
                                  temperature=0.7, top_p=0.9)
    generation.save_pretrained(model_dir)


def prepare_demo(cache_dir: str | Path) -> dict[str, Path]:
    """Write the demo model folder and data under `cache_dir` (cheap to repeat: the tokenizer is cached).

    Returns ``{"model_dir", "data_path", "tokenizer_dir"}``; the tokenizer lives in the model folder.
    """
    root = Path(cache_dir)
    model_dir = root / "model"
    _write_model_dir(model_dir)
    return {"model_dir": model_dir, "data_path": write_demo_data(root), "tokenizer_dir": model_dir}
