"""Issue 3: a packed batch gives the same per-sample losses as the samples run alone (reference path, fp32)."""

import json

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config

from ppalli import config as C
from ppalli.data.collate import pack_collate, pad_collate
from ppalli.data.pipeline import prepare
from ppalli.models.load import load_model
from ppalli.models.tokenizer import load_tokenizer


def _token_losses(model, batch) -> torch.Tensor:
    """(T-1,) per-token losses of row 0 under the HF shift (0 where the label is ignored)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs).logits[0, :-1].float()
    return F.cross_entropy(logits, batch["labels"][0, 1:], ignore_index=-100, reduction="none")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_per_sample_losses_equal_unpacked(tmp_path, shared_data, arch):
    model_json = tmp_path / "config.json"
    model_json.write_text(json.dumps(tiny_config(arch)))
    tok = load_tokenizer(shared_data / "tokenizer_qwen2.5")
    data = C.from_dict({"data": {"path": str(shared_data / "ko_chatbot_qa" / "ChatbotData.csv"),
                                 "columns": {"question": "Q", "answer": "A"}, "template": "chatml",
                                 "limit": 6, "eval_split": 0, "train_on": "all", "num_proc": 1,
                                 "cache_dir": str(tmp_path / "cache")}}).data
    samples = prepare(data, tok, seed=0).train
    assert len({len(s["input_ids"]) for s in samples}) > 1, "want samples of unequal length"
    model = load_model(str(model_json), dtype=torch.float32, device="cpu", seed=0).eval()

    packed = pack_collate(samples)
    with torch.no_grad():
        losses = _token_losses(model, packed)
        bounds = packed["cu_seqlens"].tolist()
        for i, s in enumerate(samples):
            alone = _token_losses(model, pad_collate([s], tok.pad_token_id))
            # token t of sample i predicts token t+1; the packed row's last position of a sample predicts the
            # next sample's first token, whose label is -100 (so it adds 0)
            got = losses[bounds[i]:bounds[i + 1] - 1]
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
            assert float(losses[bounds[i + 1] - 1]) == 0.0 if i + 1 < len(samples) else True
