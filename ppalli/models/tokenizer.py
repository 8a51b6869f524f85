"""Load a tokenizer: an HF folder, a hub id, or a folder holding only a `tokenizer.model`.

A bare `tokenizer.model` is either a tiktoken rank file (Llama 3: one "base64 rank" pair per line) or a
SentencePiece protobuf (Llama 2). Meta ships both that way, without the HF `tokenizer.json`, so ppalli builds
the fast tokenizer itself. Every tokenizer returned has a pad token (a dedicated one when the vocabulary has
it, else EOS) and says which in a log line.

transformers and tokenizers are imported inside the functions: importing ppalli stays cheap and side-effect free.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ppalli.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("ppalli.tokenizer")

# The pre-tokenizer regex of Llama 3 (meta-llama/llama-models, models/llama3/tokenizer.py `pat_str`):
# case-insensitive English contractions, letters with one optional leading non-letter, digits in runs of at
# most three, punctuation runs, and whitespace that keeps a trailing space with the next word.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RANKS = 128_000

# Llama 3 instruct format: header tokens around the role, content trimmed as Meta's template does, <|eot_id|>
# closing every turn. Written for ppalli; the same source is the `llama3` built-in template.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + (m.content | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Tokens that serve as padding in common vocabularies, preferred over reusing EOS.
_DEDICATED_PADS = ("<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+\r?$")


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3.1 / 3.2 in id order (128000-128255), named as the HF release names them.

    Positions without a named role are `<|reserved_special_token_N|>` with N counting only those positions.
    """
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
             6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
             10: "<|python_tag|>"}
    tokens, reserved = [], 0
    for i in range(256):
        if i in named:
            tokens.append(named[i])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tokens


def load_tokenizer(path_or_id: str | Path, *, revision: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a folder or hub id; build it from a bare tokenizer.model when that is all there is."""
    path = Path(path_or_id)
    if path.is_dir() and not _has_hf_files(path):
        model_file = path / "tokenizer.model"
        if not model_file.is_file():
            raise ModelError(f"tokenizer folder {path}: no tokenizer.json, tokenizer_config.json, vocab.json or "
                             "tokenizer.model in it; give the model folder or a hub id")
        tok = _tiktoken_llama3(model_file) if is_tiktoken_file(model_file) else _sentencepiece(path)
    else:
        tok = _auto(str(path_or_id), revision, trust_remote_code)
    ensure_pad_token(tok)
    return tok


def _has_hf_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def is_tiktoken_file(model_file: Path) -> bool:
    """True for a tiktoken rank file ("base64 rank" lines); SentencePiece files are binary protobuf."""
    with open(model_file, "rb") as f:
        first = f.readline(4096).rstrip(b"\n")
    return bool(_TIKTOKEN_LINE.match(first))


def _auto(path_or_id: str, revision: str | None, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if trust_remote_code:
        log.warning("trust_remote_code is on: the tokenizer repository's own Python code will run (%s)", path_or_id)
    try:
        return AutoTokenizer.from_pretrained(path_or_id, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"tokenizer {path_or_id}: cannot load it ({first}); give a local folder with "
                         "tokenizer.json / tokenizer_config.json / tokenizer.model, or a hub id") from None


def _sentencepiece(folder: Path) -> PreTrainedTokenizerBase:
    """A bare SentencePiece BPE model (Llama 2) as a fast tokenizer that encodes exactly as sentencepiece does.

    transformers' own conversion orders merges so that runs of spaces split differently from sentencepiece
    ("▁▁▁▁|count" instead of "▁▁▁|▁count" in indented code). SentencePiece BPE joins the adjacent pair whose
    joined piece scores best, which is the tiktoken rule with rank = score order, so the merges are built the
    same way as for Llama 3. Every chunk of text, also after a special token, gets the dummy "▁" prefix, as
    when Meta's code encodes each piece of a prompt separately, also before a leading space (" x" -> "▁▁x"): a
    Prepend normalizer, not Metaspace's prepend, which skips text that already starts with "▁" and so dropped
    one space from every text that began with one (2,000 of 2,000 ko_chatbot_qa answers written " A").
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    model_file = folder / "tokenizer.model"
    proto = _sentencepiece_proto(model_file)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = Tokenizer(models.BPE(vocab, _sentencepiece_merges(proto), unk_token=proto.trainer_spec.unk_piece,
                                   fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback))
    prefix = proto.normalizer_spec.add_dummy_prefix
    backend.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                              + [normalizers.Replace(" ", "▁")])  # no pre-tokenizer: no splits
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    spec = proto.trainer_spec
    specials = [p.piece for p in proto.pieces if p.type in (_SP_CONTROL, _SP_UNKNOWN)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = processors.TemplateProcessing(single=f"{spec.bos_piece} $A",
                                                           pair=f"{spec.bos_piece} $A {spec.bos_piece} $B:1",
                                                           special_tokens=[(spec.bos_piece, vocab[spec.bos_piece])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec.bos_piece, eos_token=spec.eos_piece,
                                  unk_token=spec.unk_piece, clean_up_tokenization_spaces=False,
                                  name_or_path=str(folder))
    log.info("built a fast tokenizer from the SentencePiece model %s (%d tokens)", model_file, len(tok))
    return tok


_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER, _SP_BYTE = 1, 2, 3, 4, 6  # sentencepiece ModelProto piece types
_SP_BPE = 2  # TrainerSpec.model_type


def _sentencepiece_proto(model_file: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise ModelError(f"{model_file}: reading a SentencePiece model needs sentencepiece and protobuf: "
                         "pip install 'ppalli[tokenizers]'") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError type, not a common base class
        raise ModelError(f"{model_file}: not a SentencePiece model ({e})") from None
    if proto.trainer_spec.model_type != _SP_BPE:
        raise ModelError(f"{model_file}: a SentencePiece model of type {proto.trainer_spec.model_type}, not BPE; "
                         "only BPE models are built without a tokenizer.json: add the model's tokenizer.json")
    return proto


def _sentencepiece_merges(proto) -> list[tuple[str, str]]:  # noqa: ANN001 - a sentencepiece ModelProto
    """Every split of every normal piece into two normal pieces, best joined score first (ties by piece id)."""
    normal = {p.piece for p in proto.pieces if p.type in (_SP_NORMAL, _SP_USER)}
    merges = []
    for i, p in enumerate(proto.pieces):
        if p.piece not in normal:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in normal and right in normal:
                merges.append((-p.score, i, left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def read_tiktoken_ranks(model_file: Path) -> dict[bytes, int]:
    """Read a tiktoken rank file: one "base64(token bytes) rank" pair per line."""
    ranks: dict[bytes, int] = {}
    with open(model_file, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise ModelError(f"{model_file} line {n}: not a 'base64 rank' pair; the file is not a tiktoken "
                                 "rank file") from None
    return ranks


def bpe_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn tiktoken ranks into a byte-level BPE vocab and merge list that encode identically.

    tiktoken repeatedly joins the adjacent pair whose joined bytes have the lowest rank. A BPE merge list that
    holds every split (left, right) of every token whose halves are both tokens, ordered by the rank of the
    joined token, makes the BPE model pick the same pair at every step. Ties between splits of one token are
    ordered by the halves' ranks so the order is deterministic.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    as_str = [table[b] for b in range(256)]

    def text(token: bytes) -> str:
        return "".join(as_str[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {text(token): rank for token, rank in ranks.items()}
    return vocab, [(text(left), text(right)) for *_, left, right in merges]


def _tiktoken_llama3(model_file: Path) -> PreTrainedTokenizerBase:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ranks = read_tiktoken_ranks(model_file)
    if len(ranks) != LLAMA3_NUM_RANKS:
        raise ModelError(f"{model_file}: a tiktoken file with {len(ranks)} ranks; only the Llama 3 file "
                         f"({LLAMA3_NUM_RANKS} ranks) can be built without a tokenizer.json; add the model's "
                         "tokenizer.json to the folder")
    vocab, merges = bpe_from_ranks(ranks)
    # ignore_merges: a whole pre-token that is itself a token is taken as is, as tiktoken does.
    backend = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    specials = llama3_special_tokens()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos, eos = "<|begin_of_text|>", _llama3_eos(model_file.parent, specials)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                      special_tokens=[(bos, LLAMA3_NUM_RANKS)]),
    ])
    # No pad_token here: ensure_pad_token finds <|finetune_right_pad_id|> and logs it as the dedicated pad.
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, model_max_length=131_072,
                                  clean_up_tokenization_spaces=False, name_or_path=str(model_file.parent))
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    log.info("built a Llama 3 fast tokenizer from the tiktoken file %s (%d tokens, eos %s)", model_file,
             len(tok), eos)
    return tok


def _llama3_eos(folder: Path, specials: list[str]) -> str:
    """EOS from a config*.json beside the rank file: base models end with <|end_of_text|>, instruct with <|eot_id|>."""
    for config in sorted(folder.glob("config*.json")):
        try:
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        ids = eos if isinstance(eos, list) else [eos]
        ids = [i for i in ids if isinstance(i, int) and LLAMA3_NUM_RANKS <= i < LLAMA3_NUM_RANKS + len(specials)]
        if ids:
            eot = LLAMA3_NUM_RANKS + specials.index("<|eot_id|>")
            return specials[(eot if eot in ids else ids[0]) - LLAMA3_NUM_RANKS]
    return "<|end_of_text|>"


def _has_token(tok: PreTrainedTokenizerBase, token: str) -> bool:
    tid = tok.convert_tokens_to_ids(token)
    return tid is not None and (tid != tok.unk_token_id or token == tok.unk_token)


def ensure_pad_token(tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token: keep its own, else a dedicated pad of the vocabulary, else EOS.

    Reusing EOS as pad is safe in ppalli because padding is masked by position (attention_mask, labels -100 on
    padded positions), never by comparing ids with pad_id, so the trained EOS keeps its loss.
    """
    if tok.pad_token is not None:
        same = " (same as eos)" if tok.pad_token == tok.eos_token else ""
        log.info("pad token: %s, from the tokenizer%s", tok.pad_token, same)
        return
    for candidate in _DEDICATED_PADS:
        if _has_token(tok, candidate):
            tok.pad_token = candidate
            log.info("pad token: %s (dedicated pad token of the vocabulary)", candidate)
            return
    if tok.eos_token is None:
        raise ModelError(f"tokenizer {tok.name_or_path}: has neither a pad nor an eos token; add one "
                         "(tokenizer.add_special_tokens({'pad_token': '<pad>'})) before training")
    tok.pad_token = tok.eos_token
    log.info("pad token: %s (eos reused; the vocabulary has no dedicated pad token)", tok.eos_token)
