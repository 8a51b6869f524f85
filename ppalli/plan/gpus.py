"""Common GPUs: memory, compute capability and an approximate dense matmul rate, for what-if plans and speed guesses.

`tflops` is the dense (no 2:4 sparsity) tensor-core rate with fp32 accumulation, in bf16 where the card has it,
else fp16, else plain fp32 for cards without tensor cores; from NVIDIA's datasheets and architecture whitepapers,
rounded. GeForce cards accumulate fp32 at half their fp16-accumulate rate (GA102/AD102 whitepapers), which
is the rate training sees. These are upper bounds, used only for a rough tokens/s estimate.

`memory_gib` is roughly what `torch.cuda.get_device_properties().total_memory` reports, which is a few percent
below the size on the box (driver reservations; ECC on data-centre cards): an H100 80GB reports 79.2 GiB,
a T4 14.7 GiB. Values not read off a real card are the nominal size less ~2%.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ppalli.errors import PpalliError


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float
    capability: tuple[int, int]
    tflops: float
    keys: tuple[str, ...]  # each key matches when all its words are in the asked name

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)


CARDS: tuple[Card, ...] = (
    Card("Tesla T4", 14.7, (7, 5), 65, ("t4",)),
    Card("L4", 22.0, (8, 9), 121, ("l4",)),
    Card("A10G", 22.0, (8, 6), 70, ("a10g",)),
    Card("A10", 22.0, (8, 6), 125, ("a10",)),
    Card("L40S", 44.4, (8, 9), 362, ("l40s",)),
    Card("A40", 44.4, (8, 6), 150, ("a40",)),
    Card("A100 40GB", 39.4, (8, 0), 312, ("a100 40gb", "a100")),
    Card("A100 80GB", 79.2, (8, 0), 312, ("a100 80gb", "a100")),
    Card("H100 80GB SXM", 79.2, (9, 0), 989, ("h100", "h100 sxm")),
    Card("H100 PCIe", 79.2, (9, 0), 756, ("h100 pcie",)),
    Card("H100 NVL", 93.1, (9, 0), 835, ("h100 nvl",)),
    Card("H200", 139.8, (9, 0), 989, ("h200",)),
    Card("B200", 178.0, (10, 0), 2250, ("b200",)),
    Card("V100 16GB", 15.8, (7, 0), 125, ("v100 16gb", "v100")),
    Card("V100 32GB", 31.7, (7, 0), 125, ("v100 32gb", "v100")),
    Card("P100 16GB", 15.9, (6, 0), 18.7, ("p100",)),  # no tensor cores: fp16 at 2x fp32
    Card("Quadro M6000 12GB", 11.9, (5, 2), 7.0, ("m6000",)),  # Maxwell: fp32 only
    Card("Quadro M6000 24GB", 23.9, (5, 2), 7.0, ("m6000 24gb",)),
    Card("RTX 2080 Ti", 10.7, (7, 5), 54, ("2080 ti",)),
    Card("RTX 3060 12GB", 11.7, (8, 6), 25.6, ("3060",)),
    Card("RTX 3070", 7.8, (8, 6), 40.6, ("3070",)),
    Card("RTX 3080 10GB", 9.8, (8, 6), 59.5, ("3080",)),
    Card("RTX 3090", 23.6, (8, 6), 71, ("3090",)),
    Card("RTX A6000", 47.5, (8, 6), 155, ("a6000",)),
    Card("RTX 4060 8GB", 7.6, (8, 9), 30, ("4060",)),
    Card("RTX 4060 Ti 16GB", 15.6, (8, 9), 44, ("4060 ti",)),
    Card("RTX 4070 12GB", 11.6, (8, 9), 58, ("4070",)),
    Card("RTX 4080 16GB", 15.6, (8, 9), 97, ("4080",)),
    Card("RTX 4090", 23.6, (8, 9), 165, ("4090",)),
    Card("RTX 6000 Ada", 47.5, (8, 9), 364, ("6000 ada",)),
    Card("RTX 5090", 31.4, (12, 0), 209, ("5090",)),
)

_NOISE = {"nvidia", "geforce", "tesla", "quadro", "rtx", "gpu", "graphics"}


def _words(name: str) -> frozenset[str]:
    """'NVIDIA GeForce RTX 4090' -> {'4090'}; 'A100-SXM4-80GB' -> {'a100', 'sxm4', '80gb'}; 'rtx3060' -> {'3060'}."""
    words = set()
    for w in re.split(r"[^a-z0-9]+", name.lower()):
        w = w.removeprefix("rtx") if re.fullmatch(r"rtx\d+", w) else w
        if w and w not in _NOISE:
            words.add(w)
    return frozenset(words)


def _score(card: Card, words: frozenset[str]) -> int:
    """Words of the card's most specific key found in the name; 0 when no key matches."""
    return max((len(k) for key in card.keys if (k := _words(key)) <= words), default=0)


def candidates(name: str) -> list[Card]:
    """The cards whose most specific matching key is the longest among all cards (ties kept)."""
    words = _words(name)
    scored = [(_score(c, words), c) for c in CARDS]
    best = max(s for s, _ in scored)
    return [c for s, c in scored if s and s == best]


def find_card(name: str, memory_gib: float | None = None) -> Card | None:
    """The card a device name most likely is (a tie goes to the closest memory), or None."""
    found = candidates(name)
    if not found:
        return None
    if memory_gib is None:
        return found[0] if len(found) == 1 else None
    return min(found, key=lambda c: abs(c.memory_gib - memory_gib))


def lookup_gpu(name: str, memory_gib: float | None = None) -> Card:
    """A card by a loose name ('4090', 'rtx 3060', 'h100', 'NVIDIA A100-SXM4-80GB'); errors list what is known."""
    found = candidates(name)
    if not found:
        known = ", ".join(c.name for c in CARDS)
        raise PpalliError(f"unknown GPU {name!r}; known: {known} (or give its memory and compute capability)")
    if len(found) > 1 and memory_gib is None:
        names = ", ".join(c.name for c in found)
        raise PpalliError(f"GPU {name!r} matches {names}: say which, e.g. {found[-1].keys[0]!r}, or give its memory")
    return find_card(name, memory_gib)  # type: ignore[return-value]  # found is not empty
