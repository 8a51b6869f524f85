"""Tokenized data cached by content hash.

The key covers everything the samples depend on: the bytes of every data file, the tokenizer (its full
serialized form, chat template and special tokens), the template source, every data setting, the seed and the
objective, and CACHE_VERSION (bump it when ppalli's data code changes its output). A hit skips reading and
tokenizing; a changed byte anywhere is a miss.

Entries are single .npz files of int32 arrays (no pickle, so a cache file can never run code), written to a
temporary name and renamed, so an interrupted write leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger("ppalli.data")

CACHE_VERSION = 2  # 2: rows with tool calls and tool turns (they were refused)
_BLOCK = 1 << 22  # 4 MiB reads when hashing files
SFT_FIELDS = ("input_ids", "labels")
PREFERENCE_FIELDS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ppalli" / "data"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of every file of a folder (relative names included)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else "").encode())
        with open(f, "rb") as stream:
            while block := stream.read(_BLOCK):
                h.update(block)
    return h.hexdigest()


# tokenizer -> (cheap fingerprint, digest). Serializing a 150k-token vocabulary takes ~0.3 s; a tokenizer whose
# size, template and special tokens are unchanged is the same tokenizer, so its digest is reused.
_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_digest(tokenizer) -> str:  # noqa: ANN001 - any HF tokenizer
    quick = (len(tokenizer), str(tokenizer.chat_template), tokenizer.bos_token, tokenizer.eos_token,
             tokenizer.pad_token, tuple(tokenizer.get_added_vocab().items()))
    known = _DIGESTS.get(tokenizer)
    if known is not None and known[0] == quick:
        return known[1]
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(),
                                                                              sort_keys=True).encode())
    h.update(json.dumps(quick[1:5]).encode())
    _DIGESTS[tokenizer] = (quick, h.hexdigest())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    payload = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _pack(prefix: str, samples: list[dict], fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    arrays = {f"{prefix}/n": np.array([len(samples)], dtype=np.int64)}
    for name in fields:
        lists = [s[name] for s in samples]
        arrays[f"{prefix}/{name}/len"] = np.array([len(x) for x in lists], dtype=np.int64)
        arrays[f"{prefix}/{name}"] = np.fromiter((t for x in lists for t in x), dtype=np.int32)
    return arrays


def _unpack(data, prefix: str, fields: tuple[str, ...]) -> list[dict]:  # noqa: ANN001 - NpzFile
    n = int(data[f"{prefix}/n"][0])
    samples = [{} for _ in range(n)]
    for name in fields:
        flat = data[f"{prefix}/{name}"].tolist()
        ends = np.cumsum(data[f"{prefix}/{name}/len"]).tolist()
        start = 0
        for sample, end in zip(samples, ends):
            sample[name] = flat[start:end]
            start = end
    return samples


def save(cache_dir: Path, key: str, train: list[dict], evals: list[dict], stats: dict) -> None:
    fields = PREFERENCE_FIELDS if train and "chosen_input_ids" in train[0] else SFT_FIELDS
    arrays = {**_pack("train", train, fields), **_pack("eval", evals, fields)}
    arrays["stats"] = np.frombuffer(json.dumps(stats, ensure_ascii=False).encode(), dtype=np.uint8)
    arrays["fields"] = np.frombuffer(json.dumps(fields).encode(), dtype=np.uint8)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{key}.npz"
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, target)
    log.info("cached tokenized data: %s", target)


def load(cache_dir: Path, key: str) -> tuple[list[dict], list[dict], dict] | None:
    target = cache_dir / f"{key}.npz"
    if not target.is_file():
        return None
    try:
        with np.load(target, allow_pickle=False) as data:
            fields = tuple(json.loads(data["fields"].tobytes()))
            stats = json.loads(data["stats"].tobytes())
            return _unpack(data, "train", fields), _unpack(data, "eval", fields), stats
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # a damaged entry is rebuilt, never trusted
        log.warning("ignoring unreadable cache entry %s (%s)", target, e)
        return None
