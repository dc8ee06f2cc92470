"""The HTML report of a run or pipeline: `build_report(run_dir)`, `build_pipeline_report(dir, stages)`,
`posttrain report DIR`. Imported lazily: matplotlib loads only when a report is built."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_report": "html_report",
    "build_pipeline_report": "html_report",
    "write_report_safely": "html_report",
    "rebuild": "html_report",
    "ReportError": "html_report",
    "read_run": "run_files",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
