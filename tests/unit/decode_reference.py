"""Test helper: one prompt decoded through a given step function (a _Decoder or a StaticDecoder, eager or from a
CUDA graph) by generate_rows' own loop, so tests compare the steps under the same picking and stopping."""

import torch

from ppalli.infer.generate import Sampling, _RowPicker, _Rows, _rows_loop


def decode_one(step, ids: torch.Tensor, max_new_tokens: int, sampling: Sampling, seed: int | None = None) -> list[int]:
    """The new ids after the prompt `ids` (1, T), no stop tokens, sampled with `seed` as generate(seed=...)."""
    rows = _Rows(1, 1, [max_new_tokens], set(), None, None, None)
    pick = _RowPicker([ids[0].tolist()], [sampling], [seed], ids.device)
    mask = torch.ones_like(ids)  # (1, T)
    _rows_loop(step, ids, mask, mask.cumsum(-1) - 1, pick, rows)
    return rows.out[0]
