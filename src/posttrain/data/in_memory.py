"""Data handed to the Python API (a list of dicts, a `datasets.Dataset`, or a path) as LoadedRows."""

from __future__ import annotations

from typing import Any

from posttrain.data.loading import LoadedRows, from_records, load_rows


def as_loaded_rows(dataset: Any, dataset_name: str | None, split: str = "train",
                   config_name: str | None = None) -> LoadedRows:
    """`dataset` wins over `dataset_name`; rows given in memory are cited as `<python>:N`."""
    if dataset is None:
        if not dataset_name:
            raise ValueError("no training data: pass --dataset_name FILE_OR_HUB_ID (or dataset= in Python)")
        return load_rows(dataset_name, split=split, config_name=config_name)
    if isinstance(dataset, LoadedRows):
        return dataset
    if isinstance(dataset, (str,)):
        return load_rows(dataset, split=split, config_name=config_name)
    rows = dataset.to_list() if hasattr(dataset, "to_list") else [dict(r) for r in dataset]  # datasets.Dataset
    return from_records(rows, source="<python>")
