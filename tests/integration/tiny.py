"""Tiny model configs shared by the integration tests."""

QWEN_VOCAB = 151936  # Qwen2.5's embedding rows (the tokenizer has 151,665 tokens)


def tiny_config(arch: str) -> dict:
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, vocab_size=QWEN_VOCAB,
                  # LoRA on a frozen random base learns only if the frozen output head is not too flat
                  # (the demo measured 0.1 trains well where HF's 0.02 stalls)
                  initializer_range=0.1, tie_word_embeddings=False, rms_norm_eps=1e-6)
    if arch == "llama":
        return dict(common, model_type="llama", architectures=["LlamaForCausalLM"])
    return dict(common, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
