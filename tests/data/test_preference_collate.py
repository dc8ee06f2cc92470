"""Preference / unpaired collation (one forward pass over chosen and rejected) and
per-sequence sums through ``sequence_sums``, padded and padding-free alike."""

from __future__ import annotations

import pytest
import torch

from posttrain.data.formats import DataFormat
from posttrain.data.loading import from_records
from posttrain.data.preference import PreferenceExample, UnpairedExample, prepare_preference_examples
from posttrain.data.preference_collate import collate_preference, collate_unpaired
from posttrain.losses.reductions import sequence_sums

PAD = 2  # == EOS, like SmolLM2: the EOS must still be a target

PAIRS = [
    PreferenceExample(
        prompt_ids=[10, 11, 12], chosen_ids=[20, 21, PAD], rejected_ids=[30, PAD], row=1, margin=1.0
    ),
    PreferenceExample(
        prompt_ids=[13], chosen_ids=[22, PAD], rejected_ids=[31, 32, 33, 34, PAD], row=2, margin=-0.5
    ),
]


def _fake_values(batch):
    """Per-target fake 'log-probs' depending only on the token and its position in its
    sequence: v(t) = input_ids[t] + 0.01 * position_ids[t], aligned with targets [:, 1:]."""
    return (batch["input_ids"][:, 1:] + 0.01 * batch["position_ids"][:, 1:]).double()


def _expected_sums(prompts, completions):
    """sum over each sequence's completion tokens of token + 0.01 * position, by hand."""
    out = []
    for p, c in zip(prompts, completions):
        out.append(sum(tok + 0.01 * (len(p) + j) for j, tok in enumerate(c)))
    return torch.tensor(out, dtype=torch.float64)


def test_collate_preference_padded_layout():
    b = collate_preference(PAIRS, pad_token_id=PAD, padding_free=False)
    assert b["num_sequences"] == 4
    assert b["input_ids"].tolist() == [
        [10, 11, 12, 20, 21, PAD],  # prompt_0 + chosen_0
        [13, 22, PAD, PAD, PAD, PAD],  # prompt_1 + chosen_1 (+ padding)
        [10, 11, 12, 30, PAD, PAD],  # prompt_0 + rejected_0
        [13, 31, 32, 33, 34, PAD],  # prompt_1 + rejected_1
    ]
    assert b["attention_mask"].tolist() == [[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] * 6]
    assert b["completion_mask"].tolist() == [
        [0, 0, 0, 1, 1, 1],  # the EOS (== pad id) is a target
        [0, 1, 1, 0, 0, 0],  # ... the pads after it are not
        [0, 0, 0, 1, 1, 0],
        [0, 1, 1, 1, 1, 1],
    ]
    assert b["segment_ids"].tolist() == [
        [0, 0, 0, 0, 0, 0],
        [1, 1, 1, -1, -1, -1],
        [2, 2, 2, 2, 2, -1],
        [3, 3, 3, 3, 3, 3],
    ]
    assert b["position_ids"].tolist()[1] == [0, 1, 2, 0, 0, 0]
    assert b["completion_lengths"].tolist() == [3, 2, 2, 5]
    assert b["completion_mask"].sum(1).tolist() == b["completion_lengths"].tolist()
    assert b["margin"].tolist() == [1.0, -0.5]


def test_collate_preference_padding_free_layout():
    b = collate_preference(PAIRS, pad_token_id=PAD, padding_free=True)
    assert b["input_ids"].tolist() == [
        [10, 11, 12, 20, 21, PAD, 13, 22, PAD, 10, 11, 12, 30, PAD, 13, 31, 32, 33, 34, PAD]
    ]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]]
    assert b["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1]]
    assert b["segment_ids"].tolist() == [[0] * 6 + [1] * 3 + [2] * 5 + [3] * 6]
    assert b["seq_lens"] == [6, 3, 5, 6] and b["num_sequences"] == 4
    assert "attention_mask" not in b


@pytest.mark.parametrize("padding_free", [False, True])
def test_sequence_sums_match_hand_computed_padded_and_padding_free(padding_free):
    b = collate_preference(PAIRS, pad_token_id=PAD, padding_free=padding_free)
    sums, counts = sequence_sums(
        _fake_values(b), b["completion_mask"][:, 1:], b["segment_ids"][:, 1:], b["num_sequences"]
    )
    prompts = [ex.prompt_ids for ex in PAIRS] * 2
    completions = [ex.chosen_ids for ex in PAIRS] + [ex.rejected_ids for ex in PAIRS]
    torch.testing.assert_close(sums, _expected_sums(prompts, completions))
    assert counts.tolist() == [3, 2, 2, 5]


def test_sequence_sums_padded_equals_padding_free_real_tokenizer(tokenizer):
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    rows = [
        {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5, or maybe 22"},
        {"chosen": [u("hi"), a("Hello!")], "rejected": [u("hi"), a("Go away.")]},
        {"prompt": [u("Capital of France?")], "chosen": [a("Paris.")], "rejected": [a("Lyon.")]},
    ]
    examples, _ = prepare_preference_examples(
        from_records(rows), DataFormat.PREFERENCE, tokenizer, max_length=None, max_prompt_length=None
    )
    pad = tokenizer.pad_token_id
    assert pad == tokenizer.eos_token_id
    results = []
    for padding_free in (False, True):
        b = collate_preference(examples, pad_token_id=pad, padding_free=padding_free)
        results.append(
            sequence_sums(
                _fake_values(b), b["completion_mask"][:, 1:], b["segment_ids"][:, 1:], b["num_sequences"]
            )
        )
        # the last target of every sequence is the EOS (pitfall 1, pad == eos)
        ids, mask, seg = b["input_ids"], b["completion_mask"], b["segment_ids"]
        for s in range(b["num_sequences"]):
            last = (mask.bool() & (seg == s)).nonzero()[-1]
            assert ids[last[0], last[1]].item() == tokenizer.eos_token_id
    (s_pad, c_pad), (s_free, c_free) = results
    torch.testing.assert_close(s_pad, s_free)
    assert (
        c_pad.tolist()
        == c_free.tolist()
        == [len(ex.chosen_ids) for ex in examples] + [len(ex.rejected_ids) for ex in examples]
    )


def test_sequence_sums_by_hand_ignores_nan_on_masked_and_padding():
    """values [[1, 2, nan], [4, 5, 6]], mask [[1, 1, 0], [0, 1, 1]], segments [[0, 0, -1], [1, 1, 1]]:
    segment 0 = 1 + 2 = 3 (2 tokens), segment 1 = 5 + 6 = 11 (2 tokens), segment 2 unused = 0."""
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    seg = torch.tensor([[0, 0, -1], [1, 1, 1]])
    sums, counts = sequence_sums(values, mask, seg, 3)
    assert sums.tolist() == [3.0, 11.0, 0.0] and counts.tolist() == [2, 2, 0]
    assert counts.dtype == torch.long and sums.dtype == torch.float32
    sums.sum().backward()
    assert values.grad.tolist() == [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
    # padding-free: one row, several segments
    sums, counts = sequence_sums(
        torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1, 0, 1, 1]]), torch.tensor([[0, 0, 1, 1]]), 2
    )
    assert sums.tolist() == [1.0, 7.0] and counts.tolist() == [1, 2]
    with pytest.raises(ValueError, match="same shape"):
        sequence_sums(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long), 2)


def test_margin_all_or_none():
    plain = [PreferenceExample([1], [2], [3], row=1), PreferenceExample([1], [4], [3], row=2)]
    assert "margin" not in collate_preference(plain, pad_token_id=PAD, padding_free=False)
    mixed = [PAIRS[0], PreferenceExample([1], [2], [3], row=7)]
    with pytest.raises(ValueError, match=r"rows without: \[7\]"):
        collate_preference(mixed, pad_token_id=PAD, padding_free=True)


UNPAIRED = [
    UnpairedExample(prompt_ids=[10, 11], completion_ids=[20, PAD], label=True, row=1),
    UnpairedExample(prompt_ids=[12], completion_ids=[21, 22, PAD], label=False, row=2),
    UnpairedExample(prompt_ids=[13, 14, 15], completion_ids=[PAD], label=True, row=3),
]


@pytest.mark.parametrize("padding_free", [False, True])
def test_collate_unpaired_and_kl_shift(padding_free):
    b = collate_unpaired(UNPAIRED, pad_token_id=PAD, padding_free=padding_free)
    assert b["labels"].tolist() == [True, False, True] and b["num_sequences"] == 3
    k = collate_unpaired(UNPAIRED, pad_token_id=PAD, padding_free=padding_free, kl_shift=True)
    assert k["labels"].tolist() == [True, False, True]
    # KTO's mismatched pairs: prompt_i with completion_{(i+1) mod B}
    prompts = [ex.prompt_ids for ex in UNPAIRED]
    shifted = [UNPAIRED[1].completion_ids, UNPAIRED[2].completion_ids, UNPAIRED[0].completion_ids]
    assert k["completion_lengths"].tolist() == [3, 1, 2]
    if padding_free:
        assert k["input_ids"].tolist() == [[10, 11, 21, 22, PAD, 12, PAD, 13, 14, 15, 20, PAD]]
    else:
        assert k["input_ids"].tolist() == [
            [10, 11, 21, 22, PAD],
            [12, PAD, PAD, PAD, PAD],
            [13, 14, 15, 20, PAD],
        ]
    for batch, comps in ((b, [ex.completion_ids for ex in UNPAIRED]), (k, shifted)):
        sums, counts = sequence_sums(
            _fake_values(batch),
            batch["completion_mask"][:, 1:],
            batch["segment_ids"][:, 1:],
            batch["num_sequences"],
        )
        torch.testing.assert_close(sums, _expected_sums(prompts, comps))
        assert counts.tolist() == [len(c) for c in comps]
