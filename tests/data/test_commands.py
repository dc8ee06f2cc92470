"""`posttrain validate` / `mask-preview` entry points: exit codes and what they print."""

from __future__ import annotations

from posttrain.data.commands import run_mask_preview, run_validate
from tests.data.helpers import write_jsonl

GOOD = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "Ok."}]},
]


def test_validate_clean(tmp_path, capsys):
    path = write_jsonl(tmp_path / "good.jsonl", GOOD)
    assert run_validate(str(path)) == 0
    out = capsys.readouterr().out
    assert "data format: messages" in out and "2 rows" in out and "no errors" in out


def test_validate_errors(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", GOOD + [{"messages": [{"role": "bot", "content": "x"}]}])
    assert run_validate(str(path)) == 1
    out = capsys.readouterr().out
    assert f"{path}:3: messages[0].role: unknown role 'bot'" in out
    assert f"{path}:3: messages: no assistant message" in out
    assert "2 error(s) in 1 row(s)" in out


def test_validate_with_tokenizer_reports_truncation(tmp_path, capsys, smol_tokenizer_dir):
    path = write_jsonl(tmp_path / "good.jsonl", GOOD)
    assert run_validate(str(path), tokenizer_name_or_path=str(smol_tokenizer_dir), max_length=64) == 0
    assert "2 examples, max_length 64: 2 kept, 1 truncated" in capsys.readouterr().out
    tok = str(smol_tokenizer_dir)
    assert run_validate(str(path), tokenizer_name_or_path=tok, max_length=64, assistant_only_loss=True) == 0
    out = capsys.readouterr().out
    assert "2 examples, max_length 64: 1 kept, 1 truncated" in out
    assert "1 dropped" in out and "rows 2" in out


def test_validate_wrong_kind_and_unknown_columns(tmp_path, capsys):
    path = write_jsonl(tmp_path / "good.jsonl", GOOD)
    assert run_validate(str(path), kind="preference") == 1
    assert "preference training needs" in capsys.readouterr().out
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q"}])
    assert run_validate(str(path)) == 1
    assert "'question'" in capsys.readouterr().out


def test_mask_preview_runs(tmp_path, capsys, smol_tokenizer_dir):
    path = write_jsonl(tmp_path / "good.jsonl", GOOD)
    code = run_mask_preview(
        str(path), rows=1, tokenizer_name_or_path=str(smol_tokenizer_dir), assistant_only_loss=True
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "row 1" in out and "Hello!" in out and "trained" in out
    assert "tokens, 3 trained" in out  # "Hello", "!", "<|im_end|>"


def test_mask_preview_bad_data(tmp_path, capsys, smol_tokenizer_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    assert run_mask_preview(str(path), tokenizer_name_or_path=str(smol_tokenizer_dir)) == 1
    assert "no assistant message" in capsys.readouterr().out
