"""The demo tokenizer: a small byte-level BPE trained on the demo data, built once and cached.

Byte-level means every string, Hangul included, round-trips: text the merges never saw falls back to
single bytes instead of an unknown token. The chat template is ChatML, so the demo model learns to end
its answers with <|im_end|>.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ppalli.demo.data import demo_pairs

PAD, EOS, IM_START, IM_END = "<|pad|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END]  # ids 0..3, in this order
# An upper bound: the demo corpus saturates first (every word a single token at ~1,500 entries), and
# inventing text only to fill the vocabulary would teach the demo model nothing.
VOCAB_SIZE = 3000
_STAMP = "ppalli_demo_tokenizer.json"

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words of the templates the data stage may render (ChatML roles, alpaca in English and Korean), so
# they become whole tokens rather than byte runs.
_TEMPLATE_TEXT = [
    "system\nuser\nassistant\n",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "아래는 작업을 설명하는 지시문입니다. 요청을 적절히 완료하는 응답을 작성하세요.",
    "### 지시:\n### 입력:\n### 응답:\n",
    "You are a helpful assistant. 당신은 친절한 도우미입니다.",
]


def _corpus() -> list[str]:
    texts = list(_TEMPLATE_TEXT)
    for q, a in demo_pairs():
        texts.append(f"{q}\n{a}")
    return texts


def _fingerprint() -> str:
    """Changes whenever the corpus or the settings change, so a stale cache is rebuilt, never reused."""
    blob = json.dumps([_corpus(), SPECIAL_TOKENS, VOCAB_SIZE, CHAT_TEMPLATE], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _train_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,  # the corpus is tiny; a pair seen once still saves the model a step
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_demo_tokenizer(dir: str | Path) -> PreTrainedTokenizerFast:
    """Train (first call) or load (later calls) the demo tokenizer in `dir`; the result is deterministic."""
    path = Path(dir)
    stamp = path / _STAMP
    fp = _fingerprint()
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")).get("fingerprint") == fp:
        return AutoTokenizer.from_pretrained(path)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(),
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    stamp.write_text(json.dumps({"fingerprint": fp}), encoding="utf-8")  # written last: marks a complete folder
    return AutoTokenizer.from_pretrained(path)
