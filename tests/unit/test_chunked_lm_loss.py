"""chunked_lm_loss (ppalli/train/objectives.py): the evaluation loss without (B, T, V) logits equals the
reference loss (full logits, fp32 cross entropy) on tiny fp32 models, padding and unlabeled positions included;
eval_lm_loss keeps the reference for a model whose head ppalli does not know."""

import pytest
import torch
from fast.fast_reference import reference_loss, tiny_lora_model

from ppalli.train.objectives import chunked_lm_loss, eval_lm_loss, reference_lm_loss


def _batch():
    torch.manual_seed(3)
    ids = torch.randint(3, 256, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :5] = -100  # prompts carry no loss
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# gemma2: the final logit softcap (3.0 in its tiny config); qwen3: q/k norms; llama: the plain case
@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("rows", [4, 2048])  # 4: many chunks, the last one short; 2048: one chunk
def test_chunked_loss_equals_the_reference(family, rows):
    model = tiny_lora_model(family, attn="eager" if family == "gemma2" else "sdpa")
    with torch.no_grad():  # logits of a few units: well inside gemma2's cap of 3.0 they would pass through unchanged
        model.get_output_embeddings().weight.mul_(200)
    batch = _batch()
    assert eval_lm_loss(model) is chunked_lm_loss
    with torch.no_grad():
        ref, n_ref = reference_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
        got, n = chunked_lm_loss(model, batch, rows=rows)
    assert n == int(n_ref) == 12 + 7 + 12  # positions 5..16 labeled; the padded row stops at 11
    # fp32 on both sides; the head's GEMM over fewer rows may sum in another order: a few ulps of ~100
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_a_model_without_a_known_head_keeps_the_reference_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32))
    assert eval_lm_loss(model) is reference_lm_loss
