"""Collation exactly per docs/CONTRACTS.md, and first-fit-decreasing packing."""

from __future__ import annotations

import random

import pytest
import torch

from ppalli.data.collate import (
    longest_sequence,
    most_tokens,
    pack_collate,
    pack_samples,
    pad_collate,
    preference_collate,
    preference_pack_collate,
)
from ppalli.errors import DataError

IGNORE = -100


def _sample(ids, trained_from):
    return {"input_ids": list(ids), "labels": [IGNORE] * trained_from + list(ids[trained_from:])}


SAMPLES = [_sample([11, 12, 13, 14], 2), _sample([21, 22], 1), _sample([31, 32, 33], 0)]


def test_pad_collate_right_pads():
    batch = pad_collate(SAMPLES, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == (3, 4) for t in batch.values())
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14], [21, 22, 0, 0], [31, 32, 33, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 13, 14], [IGNORE, 22, IGNORE, IGNORE],
                                        [31, 32, 33, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]


def test_pad_collate_keeps_a_trained_eos_equal_to_pad():
    eos = 2
    batch = pad_collate([_sample([5, 6, eos], 1), _sample([7, eos], 1)], pad_id=eos)
    assert batch["labels"].tolist() == [[IGNORE, 6, eos], [IGNORE, eos, IGNORE]]


def test_pack_collate_restarts_positions_and_masks_each_first_token():
    batch = pack_collate(SAMPLES)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 31, 32, 33]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    # the third sample was labeled from its first token on: packing still masks it, no loss crosses a boundary
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 13, 14, IGNORE, 22, IGNORE, 32, 33]]
    assert batch["cu_seqlens"].tolist() == [0, 4, 6, 9] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 4
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, 9)
    assert batch["input_ids"].dtype == batch["position_ids"].dtype == torch.long


def test_pack_collate_labels_equal_unpacked_shifted_targets():
    """Per sample, the (input, next label) pairs the loss sees packed are exactly those it sees unpacked."""
    packed = pack_collate(SAMPLES)
    labels = packed["labels"][0].tolist()
    bounds = packed["cu_seqlens"].tolist()
    for s, (a, b) in zip(SAMPLES, zip(bounds, bounds[1:])):
        assert labels[a + 1:b] == s["labels"][1:]
        assert labels[a] == IGNORE


def test_preference_collate_stacks_chosen_then_rejected():
    pair = {"chosen_input_ids": [1, 2, 3], "chosen_labels": [IGNORE, IGNORE, 3],
            "rejected_input_ids": [1, 2], "rejected_labels": [IGNORE, 2]}
    batch = preference_collate([pair, pair], pad_id=0)
    assert batch["num_pairs"] == 2 and batch["input_ids"].shape == (4, 3)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 2, 3], [1, 2, 0], [1, 2, 0]]
    assert batch["labels"][2].tolist() == [IGNORE, 2, IGNORE]


def test_preference_pack_collate_packs_chosen_then_rejected():
    pairs = [{"chosen_input_ids": [1, 2, 3], "chosen_labels": [IGNORE, IGNORE, 3],
              "rejected_input_ids": [1, 2], "rejected_labels": [IGNORE, 2]},
             {"chosen_input_ids": [4, 5], "chosen_labels": [IGNORE, 5],
              "rejected_input_ids": [4, 6, 7, 8], "rejected_labels": [IGNORE, 6, 7, 8]}]
    batch = preference_pack_collate(pairs)
    assert batch["num_pairs"] == 2 and "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 1, 2, 4, 6, 7, 8]]  # chosen 0, 1, rejected 0, 1
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 7, 11] and batch["max_seqlen"] == 4
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 3, IGNORE, 5, IGNORE, 2, IGNORE, 6, 7, 8]]


def test_most_tokens_sums_the_k_longest_samples():
    sft = [{"input_ids": [1] * n} for n in (5, 9, 2, 7)]
    pair = {"chosen_input_ids": [1] * 7, "chosen_labels": [1] * 7, "rejected_input_ids": [1] * 4,
            "rejected_labels": [1] * 4}
    assert most_tokens(sft, 2) == 16 and most_tokens(sft, 10) == 23 and most_tokens([], 3) is None
    assert most_tokens([pair], 1) == 11  # both answers of a pair


def _naive_ffd(lengths, cap):
    bins = []
    for n in sorted(lengths, reverse=True):
        for b in bins:
            if sum(b) + n <= cap:
                b.append(n)
                break
        else:
            bins.append([n])
    return bins


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_samples_is_first_fit_decreasing(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 512) for _ in range(400)]
    samples = [{"input_ids": [0] * n, "labels": [0] * n} for n in lengths]
    packing = pack_samples(samples, 512)
    got = [[len(s["input_ids"]) for s in b] for b in packing.bins]
    assert got == _naive_ffd(lengths, 512)
    assert all(sum(b) <= 512 for b in got)
    assert sorted(id(s) for b in packing.bins for s in b) == sorted(id(s) for s in samples)
    assert packing.efficiency == pytest.approx(sum(lengths) / (len(got) * 512))
    assert packing.efficiency > 0.95  # uniform lengths pack tightly


def test_pack_samples_rejects_a_sample_longer_than_the_row():
    with pytest.raises(DataError, match="does not fit a packed row of 4"):
        pack_samples([{"input_ids": [1] * 5, "labels": [1] * 5}], 4)


def test_empty_packing():
    assert pack_samples([], 8).efficiency == 0.0


def test_longest_sequence_counts_a_pairs_longer_answer_not_both():
    sft = [{"input_ids": [1] * 5}, {"input_ids": [1] * 9}]
    pairs = [{"chosen_input_ids": [1] * 7, "chosen_labels": [1] * 7, "rejected_input_ids": [1] * 4,
              "rejected_labels": [1] * 4}]
    assert longest_sequence(sft) == 9 and longest_sequence(pairs) == 7 and longest_sequence([]) is None
    # the padded width preference_collate gives the pair's rows
    assert preference_collate(pairs, 0)["input_ids"].shape[1] == longest_sequence(pairs)
