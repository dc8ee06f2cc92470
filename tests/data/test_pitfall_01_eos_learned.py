"""Pitfall 1: the EOS / end-of-turn token is a training target in every format, even though
the SmolLM2 pad id == eos id (labels come from explicit masks, never from pad ids)."""

from __future__ import annotations

import pytest

from posttrain.data.collate import collate_padded, collate_padding_free
from posttrain.data.formats import detect_format
from posttrain.data.loading import from_records
from posttrain.data.prepare import prepare_sft_examples

ROWS = {
    "language_modeling": [{"text": "The sky is blue."}, {"text": "Water is wet"}],
    "prompt_completion": [{"prompt": "The capital of France is", "completion": " Paris."}],
    "conversational_prompt_completion": [
        {
            "prompt": [{"role": "user", "content": "Capital of France?"}],
            "completion": [{"role": "assistant", "content": "Paris."}],
        }
    ],
    "messages": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."}]},
    ],
}


@pytest.mark.parametrize("fmt_name", list(ROWS))
@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_last_supervised_token_is_eos(tokenizer, fmt_name, assistant_only_loss):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap this test guards
    loaded = from_records(ROWS[fmt_name])
    fmt = detect_format(loaded.rows, loaded.source)
    assert fmt.value == fmt_name
    examples, report = prepare_sft_examples(
        loaded, fmt, tokenizer, max_length=None, assistant_only_loss=assistant_only_loss
    )
    assert len(examples) == len(ROWS[fmt_name]) and report.dropped_no_targets == 0
    for ex in examples:
        last = max(t for t, m in enumerate(ex.completion_mask) if m)
        assert ex.input_ids[last] == tokenizer.eos_token_id

    # And it survives collation with pad == eos, padded and padding-free.
    batch = collate_padded(examples, pad_token_id=tokenizer.pad_token_id)
    for b, ex in enumerate(examples):
        last = max(t for t, m in enumerate(ex.completion_mask) if m)
        assert batch["completion_mask"][b, last] == 1
        assert batch["input_ids"][b, last] == tokenizer.eos_token_id
    flat = collate_padding_free(examples)
    eos_targets = (flat["input_ids"][0] == tokenizer.eos_token_id) & (flat["completion_mask"][0] == 1)
    assert int(eos_targets.sum()) >= len(examples)
