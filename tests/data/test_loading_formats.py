"""Loading JSONL/JSON/CSV/Parquet/directories with citable row numbers; format detection."""

from __future__ import annotations

import csv
import json

import pytest

from posttrain.data.formats import DataFormat, describe_format, detect_format, row_messages
from posttrain.data.loading import load_rows
from posttrain.data.validation import DataValidationError
from tests.data.helpers import write_jsonl

RECORDS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def test_jsonl_line_numbers_skip_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    loaded = load_rows(str(path))
    assert loaded.rows == [{"text": "a"}, {"text": "b"}]
    assert loaded.row_numbers == [1, 3] and loaded.source == str(path) and loaded.errors == []


def test_jsonl_invalid_line_recorded_not_raised(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    loaded = load_rows(str(path))
    assert loaded.rows == [{"text": "a"}]
    assert [str(e) for e in loaded.errors] == [
        f"{path}:2: <json>: invalid JSON (Expecting value at column 10)"
    ]


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS))
    loaded = load_rows(str(path))
    assert loaded.rows == RECORDS and loaded.row_numbers == [1, 2]


def test_json_file_holding_json_lines(tmp_path):
    loaded = load_rows(str(write_jsonl(tmp_path / "d.json", RECORDS)))
    assert loaded.rows == RECORDS


def test_json_columnar(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"prompt": ["a", "c"], "completion": ["b", "d"]}))
    assert load_rows(str(path)).rows == RECORDS


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(RECORDS)
    loaded = load_rows(str(path))
    assert loaded.rows == RECORDS and loaded.row_numbers == [1, 2]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    loaded = load_rows(str(path))
    assert loaded.rows == rows and loaded.row_numbers == [1]


def test_directory_prefers_split_files_and_cites_each_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", RECORDS)
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "x", "completion": "y"}])
    loaded = load_rows(str(tmp_path), split="train")
    assert loaded.rows == RECORDS
    assert loaded.source_of(1) == str(tmp_path / "train.jsonl")
    assert load_rows(str(tmp_path), split="test").rows == [{"prompt": "x", "completion": "y"}]


def test_missing_local_file(tmp_path):
    with pytest.raises(DataValidationError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))


_U, _A = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"text": "x"}], DataFormat.LANGUAGE_MODELING),
        ([{"prompt": "p", "completion": "c"}], DataFormat.PROMPT_COMPLETION),
        ([{"prompt": [_U], "completion": [_A]}], DataFormat.CONVERSATIONAL_PROMPT_COMPLETION),
        ([{"messages": [_U, _A]}], DataFormat.MESSAGES),
        ([{"conversations": [{"from": "human", "value": "q"}]}], DataFormat.MESSAGES),
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}], DataFormat.PREFERENCE),
        ([{"chosen": [_U, _A], "rejected": [_U, _A]}], DataFormat.PREFERENCE),
        ([{"prompt": "p"}], DataFormat.PROMPT_ONLY),
        ([{"prompt": [_U], "id": 3}], DataFormat.PROMPT_ONLY),
        ([{"text": "x", "meta": 1}, {"text": "y"}], DataFormat.LANGUAGE_MODELING),
    ],
)
def test_detect_format(rows, expected):
    fmt = detect_format(rows, "f.jsonl")
    assert fmt == expected
    assert describe_format(fmt).startswith(f"{expected.value} (")


def test_detect_format_names_columns_found():
    with pytest.raises(
        DataValidationError,
        match=r"f\.jsonl: cannot tell the data format from the columns found \('question', 'answer'\)",
    ):
        detect_format([{"question": "q", "answer": "a"}], "f.jsonl")
    with pytest.raises(ValueError, match="no records"):
        detect_format([], "f.jsonl")


def test_sharegpt_normalised():
    row = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    assert row_messages(row) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
