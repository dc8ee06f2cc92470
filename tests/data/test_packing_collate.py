"""Best-fit-decreasing packing and the two collators."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.data.collate import collate_padded, collate_padding_free
from posttrain.data.packing import pack_best_fit_decreasing
from posttrain.data.prepare import TokenizedExample


def test_bfd_bins_valid_and_complete():
    rng = random.Random(0)
    for _trial in range(50):
        max_length = rng.randint(8, 64)
        lengths = [rng.randint(1, max_length) for _ in range(rng.randint(0, 60))]
        bins = pack_best_fit_decreasing(lengths, max_length)
        flat = sorted(i for b in bins for i in b)
        assert flat == list(range(len(lengths)))  # every example exactly once
        assert all(sum(lengths[i] for i in b) <= max_length for b in bins)
        assert all(b for b in bins)
        assert bins == pack_best_fit_decreasing(list(lengths), max_length)  # deterministic
        # BFD never needs more than ~11/9 OPT + 1 bins; sanity-check against the volume bound.
        lower = -(-sum(lengths) // max_length)
        assert len(bins) <= 11 * lower / 9 + 1


def test_bfd_known_case():
    # Decreasing order 6,5,4,3,2: 6 -> A, 5 -> B, 4 -> A (10), 3 -> B (8), 2 -> B (10).
    assert pack_best_fit_decreasing([3, 6, 2, 5, 4], 10) == [[1, 4], [3, 0, 2]]
    # Best fit picks the fullest bin that still fits, not the first.
    assert pack_best_fit_decreasing([7, 5, 3], 10) == [[0, 2], [1]]


def test_bfd_rejects_overlong():
    with pytest.raises(ValueError, match="more than max_length"):
        pack_best_fit_decreasing([3, 11], 10)


def _ex(ids, mask, row=1):
    return TokenizedExample(input_ids=ids, completion_mask=mask, row=row)


EXAMPLES = [_ex([5, 6, 7], [0, 1, 1], 1), _ex([8, 9], [1, 1], 2), _ex([10, 11, 12, 13], [0, 0, 1, 1], 3)]


def test_padding_free():
    b = collate_padding_free(EXAMPLES)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # The first token of each example is never a target (not even if its mask said so).
    assert b["completion_mask"].tolist() == [[0, 1, 1, 0, 1, 0, 0, 1, 1]]
    assert b["seq_lens"] == [3, 2, 4]
    assert all(t.dtype == torch.long for k, t in b.items() if k != "seq_lens")


def test_padded_right():
    b = collate_padded(EXAMPLES, pad_token_id=2)
    assert b["input_ids"].tolist() == [[5, 6, 7, 2], [8, 9, 2, 2], [10, 11, 12, 13]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 0], [0, 1, 2, 3]]
    assert b["completion_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]]
    assert all(t.dtype == torch.long for t in b.values())


def test_padded_left():
    b = collate_padded(EXAMPLES, pad_token_id=2, padding_side="left")
    assert b["input_ids"].tolist() == [[2, 5, 6, 7], [2, 2, 8, 9], [10, 11, 12, 13]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 0, 1, 2], [0, 0, 0, 1], [0, 1, 2, 3]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]


def test_packed_bins_collate_to_bounded_rows():
    lengths = [len(e.input_ids) for e in EXAMPLES]
    for b in pack_best_fit_decreasing(lengths, 6):
        batch = collate_padding_free([EXAMPLES[i] for i in b])
        assert batch["input_ids"].shape[1] == sum(batch["seq_lens"]) <= 6
