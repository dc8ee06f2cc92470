"""Load records from JSONL / JSON / CSV / Parquet files, a directory of them, or the hub.

Every record keeps the number that error messages cite (JSONL: line number; JSON array,
CSV, Parquet, hub: index + 1), so a bad row is reported as ``file:ROW: field: problem``.
A JSONL line that is not valid JSON does not stop loading: it is recorded in
``LoadedRows.errors`` and reported together with every other problem by validation.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.data.errors import DataValidationError, RowError

LOCAL_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class LoadedRows:
    """Records plus what errors cite about them.

    rows[i] is cited as ``source_of(i):row_numbers[i]``. ``row_sources`` is only set when the
    rows come from several files (a directory); ``errors`` holds rows that could not be parsed.
    """

    rows: list[dict]
    source: str
    row_numbers: list[int]
    errors: list[RowError] = field(default_factory=list)
    row_sources: list[str] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def source_of(self, i: int) -> str:
        return self.row_sources[i] if self.row_sources is not None else self.source

    def subset(self, indices: list[int]) -> LoadedRows:
        """The rows at ``indices`` (keeping their citations); parse errors are not carried."""
        return LoadedRows(
            rows=[self.rows[i] for i in indices],
            source=self.source,
            row_numbers=[self.row_numbers[i] for i in indices],
            row_sources=None if self.row_sources is None else [self.row_sources[i] for i in indices],
        )


def from_records(records: list[dict], source: str = "<records>") -> LoadedRows:
    """Wrap in-memory records (e.g. a ``datasets.Dataset.to_list()``), numbered from 1."""
    records = list(records)
    return LoadedRows(rows=records, source=source, row_numbers=list(range(1, len(records) + 1)))


def _load_jsonl(path: Path, source: str) -> LoadedRows:
    rows, numbers, errors = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():  # blank lines (e.g. a trailing newline) are not records
                continue
            try:
                rows.append(json.loads(line.rstrip("\r\n")))
            except json.JSONDecodeError as e:
                errors.append(
                    RowError(source, lineno, "<json>", f"invalid JSON ({e.msg} at column {e.colno})")
                )
                continue
            numbers.append(lineno)
    return LoadedRows(rows=rows, source=source, row_numbers=numbers, errors=errors)


def _load_json(path: Path, source: str) -> LoadedRows:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # many ".json" files are really JSON Lines
            return _load_jsonl(path, source)
        raise DataValidationError(
            [RowError(source, e.lineno, "<json>", f"invalid JSON ({e.msg} at column {e.colno})")]
        ) from None
    if isinstance(data, dict):
        # Columnar {"col": [..], ...} or a wrapper {"data": [...]}.
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(lists) == 1 and all(isinstance(r, dict) for r in next(iter(lists.values()))):
            data = next(iter(lists.values()))
        elif lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))
            data = [{k: v[i] for k, v in lists.items()} for i in range(n)]
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataValidationError(
            [RowError(source, 1, "<json>", f"expected an array of records, got {type(data).__name__}")]
        )
    return LoadedRows(rows=data, source=source, row_numbers=list(range(1, len(data) + 1)))


def _load_csv(path: Path, source: str) -> LoadedRows:
    # Plain csv: every cell is a string, which is what text columns need; no type guessing.
    with open(path, encoding="utf-8", newline="") as f:
        rows = [dict(r) for r in csv.DictReader(f)]
    return LoadedRows(rows=rows, source=source, row_numbers=list(range(1, len(rows) + 1)))


def _load_parquet(path: Path, source: str) -> LoadedRows:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return LoadedRows(rows=rows, source=source, row_numbers=list(range(1, len(rows) + 1)))


_LOADERS = {".jsonl": _load_jsonl, ".json": _load_json, ".csv": _load_csv, ".parquet": _load_parquet}


def _load_file(path: Path, source: str) -> LoadedRows:
    return _LOADERS[path.suffix.lower()](path, source)


def _load_dir(path: Path, source: str, split: str) -> LoadedRows:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in LOCAL_EXTENSIONS)
    # A directory with train.jsonl / test.jsonl: take the files named after the split.
    named = [p for p in files if p.stem.lower().startswith(split.lower())]
    files = named or files
    if not files:
        raise DataValidationError(
            message=f"{source}: no {'/'.join(LOCAL_EXTENSIONS)} files in this directory"
        )
    rows, numbers, sources, errors = [], [], [], []
    for p in files:
        part = _load_file(p, str(p))
        rows += part.rows
        numbers += part.row_numbers
        sources += [str(p)] * len(part.rows)
        errors += part.errors
    return LoadedRows(rows=rows, source=source, row_numbers=numbers, errors=errors, row_sources=sources)


def load_rows(name_or_path: str, split: str = "train", config_name: str | None = None) -> LoadedRows:
    """Load records from a local file/directory (by extension) or a hub dataset.

    Local: .jsonl/.json/.csv/.parquet, or a directory of them (files whose name starts with
    ``split`` if any, else all). Anything else is ``datasets.load_dataset(name, config_name,
    split=split)``, cited as ``hub:NAME[split]``.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return _load_dir(path, name_or_path, split)
    if path.suffix.lower() in LOCAL_EXTENSIONS:
        if not path.exists():
            raise DataValidationError(message=f"{name_or_path}: no such file")
        return _load_file(path, name_or_path)
    import datasets

    ds = datasets.load_dataset(name_or_path, config_name, split=split)
    return from_records(ds.to_list(), source=f"hub:{name_or_path}[{split}]")
