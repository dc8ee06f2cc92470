"""Prompt preparation: tokens as the offline methods make them, every bad row reported by number."""

from __future__ import annotations

import pytest

from posttrain.data.chat_masks import render_ids, tokenize_prompt_completion
from posttrain.data.formats import DataFormat, detect_format
from posttrain.data.loading import from_records
from posttrain.data.validation import DataValidationError
from posttrain.rollout.prompts import prepare_prompts


def prepare(records, tokenizer, **kw):
    loaded = from_records(records, source="prompts.jsonl")
    fmt = detect_format(loaded.rows, loaded.source)
    kw.setdefault("max_prompt_length", None)
    return fmt, prepare_prompts(loaded, fmt, tokenizer, **kw)


def test_conversational_prompts_with_extra_columns(tokenizer):
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    fmt, (ex,) = prepare([{"prompt": msgs, "answer": "5", "source": "demo"}], tokenizer)
    assert fmt == DataFormat.PROMPT_ONLY
    assert ex.prompt_ids == render_ids(tokenizer, msgs, add_generation_prompt=True)
    assert tokenizer.decode(ex.prompt_ids).endswith("<|im_start|>assistant\n")
    assert ex.prompt == msgs and ex.conversational
    assert ex.columns == {"answer": "5", "source": "demo"} and ex.row == 1 and not ex.truncated


def test_string_prompt_ids_match_the_offline_tokenisation(tokenizer):
    _, (ex,) = prepare([{"prompt": "The capital of France is", "answer": "Paris"}], tokenizer)
    ids, mask = tokenize_prompt_completion(
        "The capital of France is", " Paris", tokenizer, conversational=False, completion_only_loss=True
    )
    assert ex.prompt_ids == ids[: mask.index(1)]
    assert not ex.conversational


def test_prompt_completion_and_preference_rows_give_their_prompt(tokenizer):
    _, (ex,) = prepare([{"prompt": "Say hi", "completion": "hi"}], tokenizer)
    assert ex.prompt == "Say hi" and "completion" not in ex.columns
    user = {"role": "user", "content": "Pick one"}
    _, (ex,) = prepare(
        [
            {
                "chosen": [user, {"role": "assistant", "content": "A"}],
                "rejected": [user, {"role": "assistant", "content": "B"}],
            }
        ],
        tokenizer,
    )
    assert ex.prompt == [user]


def test_truncation_keeps_end_or_start(tokenizer):
    rec = [{"prompt": [{"role": "user", "content": "word " * 50}]}]
    _, (full,) = prepare(rec, tokenizer)
    _, (end,) = prepare(rec, tokenizer, max_prompt_length=10)
    _, (start,) = prepare(rec, tokenizer, max_prompt_length=10, truncation_mode="keep_start")
    assert end.prompt_ids == full.prompt_ids[-10:] and end.truncated
    assert start.prompt_ids == full.prompt_ids[:10]
    with pytest.raises(ValueError, match="truncation_mode"):
        prepare(rec, tokenizer, truncation_mode="middle")


def test_bad_rows_are_reported_with_their_numbers(tokenizer):
    records = [
        {"prompt": "fine", "answer": "1"},
        {"prompt": "   ", "answer": "2"},
        {"answer": "3"},
        {"prompt": [], "answer": "4"},
        {"prompt": 7},
    ]
    with pytest.raises(DataValidationError) as info:
        prepare(records, tokenizer)
    text = str(info.value)
    assert "prompts.jsonl:2: prompt: empty string" in text
    assert "prompts.jsonl:3: prompt: missing field" in text
    assert "prompts.jsonl:4: prompt: empty conversation" in text
    assert "prompts.jsonl:5: prompt: expected a string, got integer" in text
    assert "prompts.jsonl:1:" not in text


def test_formats_without_a_prompt_are_rejected(tokenizer):
    with pytest.raises(DataValidationError, match="prompt training needs data"):
        prepare([{"text": "just text"}], tokenizer)
