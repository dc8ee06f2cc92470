"""Preference pairs (reward / DPO) and unpaired examples (KTO): validation, warnings, prompt
extraction, tokenisation (pitfalls 1 and 3) and truncation (pitfall 7)."""

from __future__ import annotations

import math

import pytest

from posttrain.data.chat_masks import render_ids
from posttrain.data.commands import run_validate
from posttrain.data.formats import DataFormat, detect_format
from posttrain.data.loading import from_records, load_rows
from posttrain.data.preference import (
    PreferenceReport,
    PromptSplitError,
    extract_prompt,
    extract_text_prompt,
    preference_warnings,
    prepare_preference_examples,
    prepare_unpaired_examples,
    validate_preference_rows,
)
from posttrain.data.validation import DataValidationError, validate_rows
from tests.data.helpers import write_jsonl


def _u(c):
    return {"role": "user", "content": c}


def _a(c):
    return {"role": "assistant", "content": c}


def _s(c):
    return {"role": "system", "content": c}


# ---------------------------------------------------------------------------- detection


def test_detects_unpaired_and_kind_aliases():
    rows = [{"prompt": "p", "completion": "c", "label": True}]
    assert detect_format(rows, "f") == DataFormat.UNPAIRED_PREFERENCE
    assert validate_rows(from_records(rows), DataFormat.UNPAIRED_PREFERENCE, kind="kto") == []
    pairs = from_records([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert validate_rows(pairs, DataFormat.PREFERENCE, kind="kto") == []  # pairs can feed KTO
    with pytest.raises(ValueError, match="preference training needs"):
        validate_rows(from_records(rows), DataFormat.UNPAIRED_PREFERENCE, kind="dpo")


# ---------------------------------------------------------------------------- validation


def test_preference_validation_errors_all_reported(tmp_path, tokenizer):
    records = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.5},  # 1 ok
        {"prompt": "q", "chosen": "a", "margin": 1},  # 2 missing rejected
        {"prompt": "q", "chosen": 7, "rejected": "b", "margin": 1},  # 3 wrong type
        {"prompt": "q", "chosen": " ", "rejected": "b", "margin": 1},  # 4 empty chosen
        {"chosen": [_u("q"), _a("x")], "rejected": [], "margin": 1},  # 5 empty rejected
        {"prompt": "q", "chosen": "same", "rejected": "same", "margin": 1},  # 6 identical
        {"chosen": [_u("q"), _a("x")], "rejected": [_u("other"), _a("y")], "margin": 1},  # 7 no shared prompt
        {"chosen": "Paris is nice", "rejected": "Rome is nice", "margin": 1},  # 8 no shared text
        # 9 shared prompt is only the first turn: the rest of chosen is not assistant turns
        {
            "chosen": [_u("q"), _a("x"), _u("r"), _a("y")],
            "rejected": [_u("q"), _a("z"), _u("r"), _a("w")],
            "margin": 1,
        },
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "high"},  # 10 margin not a number
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": True},  # 11 bool is not a margin
        {"prompt": "q", "chosen": "a", "rejected": "b"},  # 12 margin missing while others have one
        {"prompt": "q", "chosen": [_a("x")], "rejected": [_a("y")], "margin": 1},  # 13 prompt not a list
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    loaded = load_rows(str(path))
    assert detect_format(loaded.rows, loaded.source) == DataFormat.PREFERENCE
    p = str(path)
    expected = [
        f"{p}:2: rejected: missing field",
        f"{p}:3: chosen: expected a string, got integer",
        f"{p}:4: chosen: empty string",
        f"{p}:5: rejected: empty conversation (no messages)",
        f"{p}:6: rejected: identical to chosen (the pair carries no preference)",
        f"{p}:7: prompt: chosen and rejected share no leading prompt messages (give a 'prompt' field, "
        "or start both conversations with the same messages)",
        f"{p}:8: prompt: chosen and rejected share no leading prompt text (give a 'prompt' field, "
        "or start both with the same prompt)",
        f"{p}:9: chosen[2]: after the shared prompt only assistant turns may follow, found 'user'",
        f"{p}:10: margin: expected a number, got string",
        f"{p}:11: margin: expected a number, got boolean",
        f"{p}:12: margin: missing field (other rows have a margin)",
        f"{p}:13: prompt: expected a list of messages (like chosen), got string",
    ]
    assert [str(e) for e in validate_preference_rows(loaded, DataFormat.PREFERENCE)] == expected
    # prepare reports them all at once, before tokenising
    with pytest.raises(DataValidationError) as info:
        prepare_preference_examples(
            loaded, DataFormat.PREFERENCE, tokenizer, max_length=None, max_prompt_length=None
        )
    assert [str(e) for e in info.value.errors] == expected
    assert str(info.value).startswith("12 data errors in 12 rows:")


def test_margin_must_be_finite():
    loaded = from_records([{"prompt": "q", "chosen": "a", "rejected": "b", "margin": math.inf}])
    assert [str(e) for e in validate_rows(loaded, DataFormat.PREFERENCE, "preference")] == [
        "<records>:1: margin: expected a finite number, got inf"
    ]


def test_unpaired_validation_errors(tmp_path):
    records = [
        {"prompt": "q", "completion": "a", "label": True},  # 1 ok
        {"prompt": "q", "completion": "a", "label": "yes"},  # 2
        {"prompt": "q", "completion": "a", "label": 1},  # 3
        {"prompt": "q", "completion": "a"},  # 4
        {"prompt": "q", "completion": "", "label": False},  # 5
        {"prompt": [_u("q")], "completion": [_u("not an answer")], "label": False},  # 6
        {"completion": "a", "label": None},  # 7
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", records)
    loaded = load_rows(str(path))
    fmt = detect_format(loaded.rows, loaded.source)
    assert fmt == DataFormat.UNPAIRED_PREFERENCE
    p = str(path)
    assert [str(e) for e in validate_preference_rows(loaded, fmt, "unpaired")] == [
        f"{p}:2: label: expected true or false, got string",
        f"{p}:3: label: expected true or false, got integer",
        f"{p}:4: label: missing field",
        f"{p}:5: completion: empty string",
        f"{p}:6: completion: no assistant message (nothing to train on)",
        f"{p}:7: prompt: missing field",
        f"{p}:7: label: expected true or false, got null",
    ]


# ---------------------------------------------------------------------------- warnings


def test_warnings_duplicates_and_near_duplicates(tmp_path):
    row = {"prompt": "q", "chosen": "Yes.", "rejected": "No."}
    records = [
        row,  # 1
        {"prompt": "q", "chosen": "Hello  World", "rejected": "hello world"},  # 2 near-duplicate
        row,  # 3 duplicate of 1
        {"chosen": [_u("q"), _a("OK")], "rejected": [_u("q"), _a("ok ")]},  # 4 near-duplicate
        row,  # 5 duplicate of 1
    ]
    path = write_jsonl(tmp_path / "w.jsonl", records)
    loaded = load_rows(str(path))
    p = str(path)
    warnings = preference_warnings(loaded, DataFormat.PREFERENCE)
    assert warnings == [
        f"{p}: 2 duplicate rows (exact repeats of an earlier row; they weigh double): rows 3, 5",
        f"{p}: 2 near-duplicate pairs (chosen and rejected differ only in whitespace or case; "
        "little preference signal): rows 2, 4",
    ]
    assert validate_preference_rows(loaded, DataFormat.PREFERENCE) == []  # warnings are not errors


def test_warning_single_label():
    loaded = from_records([{"prompt": "q", "completion": c, "label": True} for c in ("a", "b")])
    assert preference_warnings(loaded, DataFormat.UNPAIRED_PREFERENCE) == [
        "<records>: all 2 labels are true; KTO learns from both desirable (true) and undesirable "
        "(false) examples"
    ]


def test_validate_command_preference(tmp_path, capsys, smol_tokenizer_dir):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "word " * 50, "chosen": "yes", "rejected": "no"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert run_validate(str(path), kind="preference") == 0
    out = capsys.readouterr().out
    assert "data format: preference" in out and "no errors in 3 rows" in out
    assert (
        f"warning: {path}: 1 duplicate row (exact repeats of an earlier row; they weigh double): rows 2"
        in out
    )
    code = run_validate(
        str(path),
        kind="reward",
        tokenizer_name_or_path=str(smol_tokenizer_dir),
        max_length=20,
        max_prompt_length=30,
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "3 pairs, max_prompt_length 30 (keep_end), max_length 20: 2 kept, 1 truncated" in out
    assert (
        "1 dropped: a chosen or rejected completion was empty after truncation (rows 3); "
        "raise max_length or lower max_prompt_length"
    ) in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "a", "label": "no"}])
    assert run_validate(str(bad), kind="kto") == 1
    out = capsys.readouterr().out
    assert f"{bad}:1: label: expected true or false, got string" in out and "1 error(s) in 1 row(s)" in out


# ---------------------------------------------------------------------------- prompt extraction


def test_extract_prompt_multi_turn():
    chosen = [_s("Be brief."), _u("2+2?"), _a("4"), _u("times 3?"), _a("12")]
    rejected = [_s("Be brief."), _u("2+2?"), _a("4"), _u("times 3?"), _a("13, I think")]
    prompt, c, r = extract_prompt(chosen, rejected)
    assert prompt == chosen[:4] and c == [_a("12")] and r == [_a("13, I think")]


def test_extract_prompt_gives_shared_assistant_turns_back_and_normalises_sharegpt():
    chosen = [
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
        {"from": "gpt", "value": "!"},
    ]
    rejected = [_u("hi"), _a("hello"), _a("?")]
    prompt, c, r = extract_prompt(chosen, rejected)
    assert prompt == [_u("hi")] and c == [_a("hello"), _a("!")] and r == [_a("hello"), _a("?")]
    # chosen is a prefix of rejected: the shared assistant turn belongs to both completions
    prompt, c, r = extract_prompt([_u("q"), _a("x")], [_u("q"), _a("x"), _a("more")])
    assert prompt == [_u("q")] and c == [_a("x")] and r == [_a("x"), _a("more")]


def test_extract_prompt_tool_turns_inside_completion():
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "f"}}],
    }
    chosen = [_u("weather?"), call, {"role": "tool", "content": "sunny"}, _a("Sunny.")]
    rejected = [_u("weather?"), _a("No idea.")]
    prompt, c, r = extract_prompt(chosen, rejected)
    assert prompt == [_u("weather?")] and c == chosen[1:] and r == [_a("No idea.")]


def test_extract_prompt_errors():
    with pytest.raises(ValueError, match="share no leading prompt messages"):
        extract_prompt([_u("a"), _a("x")], [_u("b"), _a("y")])
    with pytest.raises(PromptSplitError) as info:
        extract_prompt([_u("a"), _a("x")], [_u("a"), _u("b"), _a("y")])
    assert (
        str(info.value)
        == "rejected[1]: after the shared prompt only assistant turns may follow, found 'user'"
    )


def test_extract_text_prompt():
    assert extract_text_prompt("Q: 2+2? A: 4", "Q: 2+2? A: 5") == ("Q: 2+2? A:", " 4", " 5")
    hh = "\n\nHuman: hi\n\nAssistant: "
    assert extract_text_prompt(hh + "Hello!", hh + "Go away.") == (hh.rstrip(), " Hello!", " Go away.")
    assert extract_text_prompt("The cat sat", "The car sat") == ("The", " cat sat", " car sat")
    with pytest.raises(ValueError, match="share no leading prompt text"):
        extract_text_prompt("abc", "abd")


# ---------------------------------------------------------------------------- tokenisation


PAIRS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Lyon.", "margin": 2.0},
    {
        "prompt": [_u("Capital of France?")],
        "chosen": [_a("Paris.")],
        "rejected": [_a("Lyon, I think.")],
        "margin": 0.5,
    },
    {
        "chosen": [_u("2+2?"), _a("4"), _u("times 3?"), _a("12")],
        "rejected": [_u("2+2?"), _a("4"), _u("times 3?"), _a("13")],
        "margin": -1,
    },
    {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 22", "margin": 0},
]


def _full_conversation(row):
    if "prompt" in row:
        return list(row["prompt"]) + list(row["chosen"]), list(row["prompt"]) + list(row["rejected"])
    return row["chosen"], row["rejected"]


def test_pitfall_01_03_prompt_shared_prefix_and_eos(tokenizer):
    examples, report = prepare_preference_examples(
        from_records(PAIRS), DataFormat.PREFERENCE, tokenizer, max_length=None, max_prompt_length=None
    )
    assert len(examples) == 4 and report.lines() == ["4 pairs, no max_length: 4 kept, 0 truncated"]
    eos = tokenizer.eos_token_id
    for ex, row in zip(examples, PAIRS):
        # EOS (ChatML end-of-turn <|im_end|> == eos == pad) is the last supervised token (pitfall 1)
        assert ex.chosen_ids[-1] == eos and ex.rejected_ids[-1] == eos
        assert eos not in ex.chosen_ids[:-1] and eos not in ex.rejected_ids[:-1]
        assert ex.margin == float(row["margin"])
        if isinstance(row["chosen"], list):
            # prompt ids are exactly the template's generation prompt and a prefix of the full
            # rendering; prompt + completion is the full rendering up to the end-of-turn (pitfall 3)
            for conv, comp in zip(_full_conversation(row), (ex.chosen_ids, ex.rejected_ids)):
                full = render_ids(tokenizer, conv)
                assert full[: len(ex.prompt_ids)] == ex.prompt_ids
                assert full[: len(ex.prompt_ids) + len(comp)] == ex.prompt_ids + comp
        else:
            prompt = row.get("prompt", "Q: 2+2? A:")
            assert ex.prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(examples[0].chosen_ids) == " Paris.<|im_end|>"
    assert tokenizer.decode(examples[1].rejected_ids) == "Lyon, I think.<|im_end|>"
    assert tokenizer.decode(examples[2].prompt_ids).endswith(
        "<|im_start|>user\ntimes 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(examples[2].chosen_ids) == "12<|im_end|>"
    assert tokenizer.decode(examples[3].prompt_ids) == "Q: 2+2? A:"
    assert tokenizer.decode(examples[3].rejected_ids) == " 22<|im_end|>"


def _long_pair():
    prompt = " ".join(f"w{i}" for i in range(40))
    return {"prompt": prompt, "chosen": " " + " ".join(f"c{i}" for i in range(20)), "rejected": " no"}


def test_truncation_keep_end_and_keep_start(tokenizer):
    loaded = from_records([_long_pair()])
    (full,), _ = prepare_preference_examples(
        loaded, DataFormat.PREFERENCE, tokenizer, max_length=None, max_prompt_length=None
    )
    P, C, R = len(full.prompt_ids), len(full.chosen_ids), len(full.rejected_ids)
    assert P > 20 and C > 10 and R <= 5
    for mode, expect in (("keep_end", full.prompt_ids[-10:]), ("keep_start", full.prompt_ids[:10])):
        (ex,), report = prepare_preference_examples(
            loaded,
            DataFormat.PREFERENCE,
            tokenizer,
            max_length=16,
            max_prompt_length=10,
            truncation_mode=mode,
        )
        assert ex.prompt_ids == expect
        assert ex.chosen_ids == full.chosen_ids[:6]  # prompt + completion <= max_length, start kept
        assert ex.rejected_ids == full.rejected_ids  # short enough: untouched, still ends with EOS
        assert report.truncated == 1 and report.dropped_no_completion == 0
        assert report.lines() == [
            f"1 pairs, max_prompt_length 10 ({mode}), max_length 16: 1 kept, 1 truncated"
        ]
    with pytest.raises(ValueError, match="truncation_mode must be one of keep_end, keep_start"):
        prepare_preference_examples(
            loaded,
            DataFormat.PREFERENCE,
            tokenizer,
            max_length=16,
            max_prompt_length=10,
            truncation_mode="left",
        )


def test_pitfall_07_truncation_drops_pairs_without_completion(tokenizer):
    ok = {"prompt": "q", "chosen": " a", "rejected": " b"}
    rows = [ok, _long_pair(), dict(ok, chosen=" c")]
    examples, report = prepare_preference_examples(
        from_records(rows), DataFormat.PREFERENCE, tokenizer, max_length=12, max_prompt_length=None
    )
    # row 2's prompt alone exceeds max_length: nothing of chosen or rejected would be scored
    assert [ex.row for ex in examples] == [1, 3]
    assert all(ex.chosen_ids and ex.rejected_ids for ex in examples)
    assert (report.total, report.truncated, report.dropped_no_completion, report.dropped_rows) == (
        3,
        1,
        1,
        [2],
    )
    assert report.lines() == [
        "3 pairs, max_length 12: 2 kept, 1 truncated",
        "1 dropped: a chosen or rejected completion was empty after truncation (rows 2); "
        "raise max_length or lower max_prompt_length",
    ]


def test_report_lists_warnings():
    report = PreferenceReport(total=2, warnings=["f: 1 duplicate row"], max_length=8)
    assert report.lines() == ["2 pairs, max_length 8: 2 kept, 0 truncated", "warning: f: 1 duplicate row"]


def test_unpaired_examples(tokenizer):
    rows = [
        {"prompt": "2 + 2 =", "completion": " 4", "label": True},
        {"prompt": [_u("2+2?")], "completion": [_a("5")], "label": False},
        {"prompt": "word " * 60, "completion": " x", "label": False},
    ]
    loaded = from_records(rows)
    fmt = detect_format(loaded.rows, loaded.source)
    # (the conversational prompt carries SmolLM2's default system prompt: ~30 tokens)
    examples, report = prepare_unpaired_examples(
        loaded, fmt, tokenizer, max_length=48, max_prompt_length=None
    )
    assert [(ex.row, ex.label) for ex in examples] == [(1, True), (2, False)]
    assert all(ex.completion_ids[-1] == tokenizer.eos_token_id for ex in examples)
    assert tokenizer.decode(examples[1].completion_ids) == "5<|im_end|>"
    assert report.lines() == [
        "3 examples, max_length 48: 2 kept, 1 truncated",
        "1 desirable (label true), 1 undesirable (label false)",
        "1 dropped: the completion was empty after truncation (rows 3); raise max_length or lower max_prompt_length",
    ]


def test_unpaired_from_pairs(tokenizer):
    loaded = from_records(PAIRS[:2])
    pairs, _ = prepare_preference_examples(
        loaded, DataFormat.PREFERENCE, tokenizer, max_length=None, max_prompt_length=None
    )
    examples, report = prepare_unpaired_examples(
        loaded, DataFormat.PREFERENCE, tokenizer, max_length=None, max_prompt_length=None
    )
    assert [(ex.row, ex.label) for ex in examples] == [(1, True), (1, False), (2, True), (2, False)]
    assert (
        examples[0].completion_ids == pairs[0].chosen_ids
        and examples[3].completion_ids == pairs[1].rejected_ids
    )
    assert all(ex.prompt_ids == pairs[i // 2].prompt_ids for i, ex in enumerate(examples))
    assert (report.total, report.desirable, report.undesirable) == (4, 2, 2)


def test_csv_like_strings_rejected_for_label(tmp_path):
    # CSV cells are strings: a "true" label is reported, not silently read as truthy
    path = tmp_path / "k.csv"
    path.write_text("prompt,completion,label\nq,a,true\n")
    loaded = load_rows(str(path))
    got = [str(e) for e in validate_preference_rows(loaded, detect_format(loaded.rows, loaded.source), "kto")]
    assert got == [f"{path}:1: label: expected true or false, got string"]
