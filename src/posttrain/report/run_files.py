"""What a run directory holds, read for the report: metrics.jsonl, config.yaml, run_summary.json,
eval.json (posttrain eval) and eval_results.json (the recipes' held-out evaluation).

Every file is optional: a report of a run that crashed early, or of an eval-only directory,
shows what exists. Lines of metrics.jsonl cut short by a kill are skipped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"  # engine/metrics_log.py writes it
CONFIG_FILE = "config.yaml"  # engine/console.py writes it
SUMMARY_FILE = "run_summary.json"  # engine/session.py writes it
EVAL_FILE = "eval.json"  # eval/generation_eval.py writes it
EVAL_CONFIG_FILE = "eval_config.yaml"  # ... and its resolved EvalConfig
EVAL_RESULTS_FILE = "eval_results.json"  # engine/session.py's final_evaluation writes it
REPORT_FILE = "report.html"
RUN_FILES = (METRICS_FILE, EVAL_FILE, EVAL_RESULTS_FILE, SUMMARY_FILE)


@dataclass
class RunFiles:
    """One run directory's files, parsed.

    series: metric name -> [(step, value)] in logging order; a value logged as "nan"/"inf"
    (metrics_log writes non-finite numbers as strings) becomes a float NaN/inf.
    """

    run_dir: Path
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    config_text: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    eval_config_text: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    eval_record: dict[str, Any] | None = None
    eval_results: dict[str, Any] | None = None

    @property
    def has_anything(self) -> bool:
        return bool(self.series or self.summary or self.eval_record or self.eval_results)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            continue
        step = int(record["step"])
        for key, value in record.items():
            number = _number(value)
            if key != "step" and number is not None:
                series.setdefault(key, []).append((step, number))
    return series


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_run(run_dir: str | Path) -> RunFiles:
    import yaml

    run_dir = Path(run_dir)
    run = RunFiles(run_dir=run_dir)
    if (run_dir / METRICS_FILE).is_file():
        run.series = read_metrics(run_dir / METRICS_FILE)
    if (run_dir / CONFIG_FILE).is_file():
        run.config_text = (run_dir / CONFIG_FILE).read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(run.config_text)
            run.config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            run.config = {}
    if (run_dir / EVAL_CONFIG_FILE).is_file():
        run.eval_config_text = (run_dir / EVAL_CONFIG_FILE).read_text(encoding="utf-8")
    summary = _read_json(run_dir / SUMMARY_FILE)
    run.summary = summary if isinstance(summary, dict) else {}
    record = _read_json(run_dir / EVAL_FILE)
    run.eval_record = record if isinstance(record, dict) else None
    results = _read_json(run_dir / EVAL_RESULTS_FILE)
    run.eval_results = results if isinstance(results, dict) else None
    return run


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
