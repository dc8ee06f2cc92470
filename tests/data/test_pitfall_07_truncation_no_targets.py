"""Pitfall 7: a row whose training targets are all cut by truncation never reaches the loss; it
is dropped and counted in the truncation report."""

from __future__ import annotations

from posttrain.data.collate import collate_padded, collate_padding_free
from posttrain.data.formats import DataFormat
from posttrain.data.loading import from_records
from posttrain.data.prepare import prepare_sft_examples

LONG = "word " * 200


def test_overlong_prompt_dropped_and_counted(tokenizer):
    loaded = from_records(
        [
            {"prompt": "Short question?", "completion": " Short answer."},
            {"prompt": LONG, "completion": " Lost answer."},
            {"prompt": "Another?", "completion": " " + LONG},  # truncated but keeps targets
        ]
    )
    examples, report = prepare_sft_examples(loaded, DataFormat.PROMPT_COMPLETION, tokenizer, max_length=32)
    assert [ex.row for ex in examples] == [1, 3]
    assert (report.total, report.truncated, report.dropped_no_targets, report.dropped_rows) == (3, 2, 1, [2])
    assert all(len(ex.input_ids) <= 32 and ex.num_targets > 0 for ex in examples)
    text = "\n".join(report.lines())
    assert "1 dropped" in text and "rows 2" in text and "2 truncated" in text

    # Nothing with zero targets can reach a loss through either collator.
    for batch in (collate_padded(examples, tokenizer.pad_token_id), collate_padding_free(examples)):
        assert batch["completion_mask"].sum() > 0
    padded = collate_padded(examples, tokenizer.pad_token_id)
    assert (padded["completion_mask"][:, 1:].sum(dim=1) > 0).all()


def test_long_system_prompt_drops_conversation(tokenizer):
    loaded = from_records(
        [
            {
                "messages": [
                    {"role": "system", "content": LONG},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                ]
            },
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        ]
    )
    examples, report = prepare_sft_examples(
        loaded, DataFormat.MESSAGES, tokenizer, max_length=64, assistant_only_loss=True
    )
    assert [ex.row for ex in examples] == [2]
    assert report.dropped_no_targets == 1 and report.dropped_rows == [1]


def test_left_truncation_keeps_the_end(tokenizer):
    loaded = from_records([{"prompt": LONG, "completion": " The answer."}])
    examples, report = prepare_sft_examples(
        loaded, DataFormat.PROMPT_COMPLETION, tokenizer, max_length=16, truncation_side="left"
    )
    (ex,) = examples
    assert len(ex.input_ids) == 16 and ex.completion_mask[0] == 0
    assert ex.input_ids[-1] == tokenizer.eos_token_id and report.truncated == 1
    assert (
        tokenizer.decode([i for i, m in zip(ex.input_ids, ex.completion_mask) if m])
        == " The answer.<|im_end|>"
    )


def test_report_without_problems(tokenizer):
    loaded = from_records([{"text": "hi there"}])
    _, report = prepare_sft_examples(loaded, DataFormat.LANGUAGE_MODELING, tokenizer, max_length=None)
    assert report.lines() == ["1 examples, no max_length: 1 kept, 0 truncated"]
