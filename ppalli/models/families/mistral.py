"""Mistral: Llama's layer; config.sliding_window (4096 in v0.1, null from v0.2) applies to every layer."""

from ppalli.models.families import FamilySpec


def _window(layer, config) -> int | None:
    return getattr(config, "sliding_window", None)


MISTRAL = FamilySpec(name="mistral", layer_classes=("MistralDecoderLayer",), window=_window)
