"""Validation reports every bad row as `file:row: field: problem`, nothing silently dropped."""

from __future__ import annotations

import json

import pytest

from posttrain.data.formats import DataFormat, detect_format
from posttrain.data.loading import from_records, load_rows
from posttrain.data.prepare import prepare_sft_examples
from posttrain.data.validation import DataValidationError, RowError, validate_rows


def _u(c):
    return {"role": "user", "content": c}


def _a(c):
    return {"role": "assistant", "content": c}


def test_broken_jsonl_messages(tmp_path):
    lines = [
        json.dumps({"messages": [_u("hi"), _a("hello")]}),  # 1 ok
        '{"messages": [ {"role": "user", "content": "hi"}',  # 2 invalid JSON
        json.dumps({"conversation": []}),  # 3 missing field
        json.dumps({"messages": "hi"}),  # 4 wrong type
        json.dumps({"messages": [_u("hi"), {"role": "bot", "content": "x"}, _a("y")]}),  # 5 unknown role
        json.dumps({"messages": [_u(""), _a("y")]}),  # 6 empty content
        json.dumps({"messages": [{"role": "system", "content": "s"}, _u("hi")]}),  # 7 no assistant
        json.dumps({"messages": [_u("hi"), _a("y"), _u("more?")]}),  # 8 not ending with assistant
        "",  # 9 blank line: not a record
        json.dumps({"messages": [_u(3), {"content": "y"}, "oops"]}),  # 10 several problems
    ]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_rows(str(path))
    fmt = detect_format(loaded.rows, loaded.source)
    assert fmt == DataFormat.MESSAGES
    got = [str(e) for e in validate_rows(loaded, fmt)]
    p = str(path)
    assert got == [
        f"{p}:2: <json>: invalid JSON (Expecting ',' delimiter at column 49)",
        f"{p}:3: messages: missing field",
        f"{p}:4: messages: expected a list of messages, got string",
        f"{p}:5: messages[1].role: unknown role 'bot' (expected one of: system, user, assistant, tool)",
        f"{p}:6: messages[0].content: empty content",
        f"{p}:7: messages: no assistant message (nothing to train on)",
        f"{p}:8: messages[2]: conversation must end with an assistant message, not 'user'",
        f"{p}:10: messages[0].content: expected a string, got integer",
        f"{p}:10: messages[1].role: missing field",
        f"{p}:10: messages[2]: expected a message object with role and content, got string",
        f"{p}:10: messages: no assistant message (nothing to train on)",
    ]


def test_prepare_raises_with_all_errors(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": ""}, {"text": 5}, {"text": "ok"}]) + "\n")
    loaded = load_rows(str(path))
    with pytest.raises(DataValidationError) as info:
        prepare_sft_examples(loaded, DataFormat.LANGUAGE_MODELING, tokenizer, max_length=None)
    assert [str(e) for e in info.value.errors] == [
        f"{path}:1: text: empty string",
        f"{path}:2: text: expected a string, got integer",
    ]
    assert str(info.value).startswith("2 data errors in 2 rows:")


def test_error_message_shows_first_20():
    errors = [RowError("f.jsonl", i, "text", "empty string") for i in range(1, 31)]
    msg = str(DataValidationError(errors)).splitlines()
    assert msg[0] == "30 data errors in 30 rows:" and len(msg) == 22 and "10 more" in msg[-1]


def test_prompt_completion_errors():
    loaded = from_records(
        [
            {"prompt": "", "completion": "x"},
            {"prompt": "p", "completion": "  "},
            {"prompt": "p"},
            {"prompt": "p", "completion": None},
        ]
    )
    got = [str(e) for e in validate_rows(loaded, DataFormat.PROMPT_COMPLETION)]
    assert got == [
        "<records>:1: prompt: empty string",
        "<records>:2: completion: empty string",
        "<records>:3: completion: missing field",
        "<records>:4: completion: expected a string, got null",
    ]


def test_conversational_prompt_completion_errors():
    loaded = from_records(
        [
            {"prompt": [_u("q")], "completion": [_a("a")]},
            {"prompt": [_u("q")], "completion": [_u("not an answer")]},
            {"prompt": [], "completion": [_a("a")]},
        ]
    )
    got = [str(e) for e in validate_rows(loaded, DataFormat.CONVERSATIONAL_PROMPT_COMPLETION)]
    assert got == [
        "<records>:2: completion: no assistant message (nothing to train on)",
        "<records>:3: prompt: empty conversation (no messages)",
    ]


def test_preference_errors():
    loaded = from_records(
        [
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "", "rejected": "b"},
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"chosen": [_u("q"), _a("x")], "rejected": [_u("q"), _a("x")]},
            {"chosen": [_u("q"), _a("x")], "rejected": [_u("q")]},
            {"prompt": "q", "chosen": "a"},
        ]
    )
    got = [str(e) for e in validate_rows(loaded, DataFormat.PREFERENCE, kind="preference")]
    assert got == [
        "<records>:2: chosen: empty string",
        "<records>:3: rejected: identical to chosen (the pair carries no preference)",
        "<records>:4: rejected: identical to chosen (the pair carries no preference)",
        "<records>:5: rejected: no assistant message (nothing to train on)",
        "<records>:6: rejected: missing field",
    ]


def test_sharegpt_conversations():
    loaded = from_records(
        [
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": ""}]},
        ]
    )
    got = [str(e) for e in validate_rows(loaded, DataFormat.MESSAGES)]
    assert got == [
        "<records>:2: conversations[0].from: unknown role 'robot' (expected one of: system, user, assistant, tool)",
        "<records>:2: conversations[1].value: empty content",
    ]


def test_tool_call_turn_may_have_no_content():
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "f"}}],
    }
    msgs = [_u("weather?"), call, {"role": "tool", "content": "sunny"}, _a("It is sunny.")]
    assert validate_rows(from_records([{"messages": msgs}]), DataFormat.MESSAGES) == []


def test_kind_mismatch_is_an_error():
    with pytest.raises(ValueError, match="preference training needs"):
        validate_rows(from_records([{"text": "x"}]), DataFormat.LANGUAGE_MODELING, kind="preference")


def test_non_object_row():
    got = [str(e) for e in validate_rows(from_records([["a"], {"text": "b"}]), DataFormat.LANGUAGE_MODELING)]
    assert got == ["<records>:1: <row>: expected a JSON object, got list"]
