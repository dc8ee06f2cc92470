"""prepare_sft_examples end to end: every SFT format, masks as documented, rows cited."""

from __future__ import annotations

from posttrain.data.formats import DataFormat
from posttrain.data.loading import from_records
from posttrain.data.prepare import prepare_sft_examples
from tests.data.helpers import supervised_text


def test_sharegpt_rows_are_rendered_like_messages(tokenizer):
    share = from_records(
        [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    )
    msgs = from_records(
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    )
    (a,), _ = prepare_sft_examples(
        share, DataFormat.MESSAGES, tokenizer, max_length=None, assistant_only_loss=True
    )
    (b,), _ = prepare_sft_examples(
        msgs, DataFormat.MESSAGES, tokenizer, max_length=None, assistant_only_loss=True
    )
    assert (a.input_ids, a.completion_mask) == (b.input_ids, b.completion_mask)
    assert supervised_text(tokenizer, a.input_ids, a.completion_mask) == "Yo<|im_end|>"


def test_conversational_prompt_completion_masks(tokenizer):
    rows = from_records(
        [
            {
                "prompt": [{"role": "user", "content": "2+2?"}],
                "completion": [{"role": "assistant", "content": "4"}],
            }
        ]
    )
    fmt = DataFormat.CONVERSATIONAL_PROMPT_COMPLETION
    (ex,), _ = prepare_sft_examples(rows, fmt, tokenizer, max_length=None)
    assert supervised_text(tokenizer, ex.input_ids, ex.completion_mask) == "4<|im_end|>"
    (full,), _ = prepare_sft_examples(rows, fmt, tokenizer, max_length=None, completion_only_loss=False)
    assert full.input_ids == ex.input_ids
    # Everything but position 0 and the trailing newline is trained.
    assert full.completion_mask == [0] + [1] * (len(ex.input_ids) - 2) + [0]


def test_language_modeling_all_trained(tokenizer):
    (ex,), _ = prepare_sft_examples(
        from_records([{"text": "abc def"}]), DataFormat.LANGUAGE_MODELING, tokenizer, max_length=None
    )
    assert ex.input_ids == tokenizer("abc def")["input_ids"] + [tokenizer.eos_token_id]
    assert ex.completion_mask == [0] + [1] * (len(ex.input_ids) - 1)
    assert ex.row == 1 and ex.num_targets == len(ex.input_ids) - 1


def test_rows_keep_their_record_numbers(tokenizer):
    loaded = from_records([{"text": "a"}, {"text": "b"}, {"text": "c"}])
    loaded.row_numbers = [3, 7, 9]
    examples, _ = prepare_sft_examples(loaded, DataFormat.LANGUAGE_MODELING, tokenizer, max_length=None)
    assert [e.row for e in examples] == [3, 7, 9]
