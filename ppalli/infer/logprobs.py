"""Token log-probabilities, as `ppalli serve` answers OpenAI's `logprobs`, `top_logprobs` and `echo`.

The figures are the model's own distribution at each position (log-softmax of its logits in fp32), before the
penalties, temperature and top-p that sampling applies: what vLLM returns by default, and what a scorer needs
(lm-evaluation-harness' `local-completions` asks `echo` with `logprobs` to score a continuation from the prompt's
own tokens). A decoded answer's figures come from the decode loop's logits (generate_rows' `top_logprobs`); a
prompt's from one forward over it (`prompt_logprobs`), the head applied a chunk of positions at a time.

Token strings are each token decoded alone (a byte-level token holding part of a character decodes to U+FFFD);
`bytes` are the token's exact bytes, so a client can join the parts of a character (OpenAI's chat format).
"""

from __future__ import annotations

import json
import re

import torch

TokenLogprob = tuple[float | None, list[tuple[int, float]]]  # (the token's log-prob, the top (id, log-prob) there)
MOST_TOP = 20  # alternatives a position may ask for: OpenAI's chat API takes 0-20


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """(n, V) logits and the (n,) tokens taken there -> each token's log-prob and the `top` likeliest tokens."""
    lp = logits.float().log_softmax(-1)  # (n, V)
    chosen = lp.gather(1, tokens.view(-1, 1).to(lp.device))[:, 0].tolist()
    if top <= 0:
        return [(c, []) for c in chosen]
    values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)  # (n, top)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]


def prompt_logprobs(model, ids: list[int], top: int, rows: int = 1024) -> list[TokenLogprob]:
    """Each prompt token's log-prob given the tokens before it, and the `top` likeliest there; the first token
    has none (None, []). One forward: score_prompt."""
    return score_prompt(model, ids, top, rows)[0]


@torch.inference_mode()
def score_prompt(model, ids: list[int], top: int, rows: int = 1024) -> tuple[list[TokenLogprob], torch.Tensor]:
    """(prompt_logprobs' figures, the (V,) logits after the prompt's last token: what its first answer token is
    picked from). Where ppalli knows the model's head (a fast-path family: the lm_head, and Gemma's final softcap),
    the decoder runs once and the head `rows` positions at a time: Llama 3's 128,256-token vocabulary makes a
    4,096-token prompt's fp32 logits 2.1 GB at once, 0.5 GB in chunks of 1,024. Else the model's logits."""
    from ppalli.models.fast import backbone_of, causal_lm
    from ppalli.train.objectives import _known_family, head_chunks

    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    targets = x[0, 1:]  # (T-1,): position t predicts token t + 1
    was_training = model.training
    model.eval()
    try:
        out: list[TokenLogprob] = [(None, [])]
        if not _known_family(model):
            logits = model(input_ids=x, use_cache=False).logits[0]  # (T, V)
            return out + logprobs_of(logits[:-1], targets, top), logits[-1].float()
        hidden = backbone_of(model)(input_ids=x, use_cache=False).last_hidden_state[0]  # (T, d)
        for start, logits in head_chunks(causal_lm(model), hidden, rows):  # (rows, V)
            scored = targets[start:start + rows]  # the last chunk holds one position more: the answer's first
            out += logprobs_of(logits[:scored.shape[0]], scored, top)
        return out, logits[-1].float()
    finally:
        model.train(was_training)


class TokenPieces:
    """Each token id's text (decoded alone, special tokens as written) and exact bytes, for one tokenizer.

    Byte-level BPE (Llama 3, Qwen, EXAONE) writes a token's bytes as GPT-2's printable stand-ins, one character a
    byte; SentencePiece (Llama 2, Mistral, Gemma) writes a space as U+2581 and an unknown byte as <0xNN>."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = _decoder_type(tokenizer) == "ByteLevel"
        self.specials = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.cache.get(token_id)
        if piece is None:
            piece = self.cache[token_id] = self._piece(token_id)
        return piece

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        raw = self.tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self.specials or not isinstance(raw, str):
            return text, list(text.encode())
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", raw)
        if byte:
            return text, [int(byte.group(1), 16)]
        if self.byte_level and all(c in _UNICODE_TO_BYTE for c in raw):
            return text, [_UNICODE_TO_BYTE[c] for c in raw]
        return text, list(raw.replace("\u2581", " ").encode() if "\u2581" in raw else text.encode())


def _decoder_type(tokenizer) -> str | None:
    """The type of a fast tokenizer's decoder ("ByteLevel", "Metaspace", "Sequence", ...), or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return None
    return decoder.get("type")


def _byte_stand_ins() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte -> the byte. Bytes
    that print (! to ~, and Latin-1's from inverted-exclamation on, less the soft hyphen) stand for themselves; the
    others take the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(moved)}}


_UNICODE_TO_BYTE = _byte_stand_ins()


def chat_logprobs(pieces: TokenPieces, ids: list[int], lps: list[TokenLogprob]) -> dict:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    def entry(token_id: int, lp: float) -> dict:
        text, raw = pieces(token_id)
        return {"token": text, "logprob": lp, "bytes": raw}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in alts]}
                        for t, (lp, alts) in zip(ids, lps)]}


def text_logprobs(pieces: TokenPieces, ids: list[int], lps: list[TokenLogprob], top: int, offset: int = 0) -> dict:
    """A text completion's `logprobs`: {tokens, token_logprobs, top_logprobs (one {token: log-prob} a position, None
    where there is none), text_offset (where each token's text starts, counted from `offset`)}."""
    tokens = [pieces(t)[0] for t in ids]
    starts, at = [], offset
    for text in tokens:
        starts.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in lps],
            "top_logprobs": [None if lp is None else {pieces(i)[0]: v for i, v in alts[:top]} for lp, alts in lps],
            "text_offset": starts}


def covering(tokenizer, ids: list[int], text: str) -> int:
    """How many of `ids` an answer cut short by a stop string keeps: the fewest whose text reaches the answer's."""
    for n in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:n], skip_special_tokens=True)) >= len(text):
            return n
    return len(ids)
