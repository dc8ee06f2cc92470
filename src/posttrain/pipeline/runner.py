"""Plan and run a pipeline: which stages are cached, which run, which resume; then run them in order.

A stage dir holds `stage.json` = {hash, finished, ...}. It is written with finished=false when the
stage starts and replaced (atomically) with finished=true when it ends, so:

  finished and same hash           → cached (skipped)
  not finished, same hash, has checkpoints → resume from the newest checkpoint
  anything else                    → run from scratch (the old stage dir is cleared first)
  --force STAGE                    → that stage and every later one run from scratch
  a referenced stage runs          → this stage runs too
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.pipeline.fingerprint import describe_change, hash_payload, payload_hash
from posttrain.pipeline.spec import (
    LIST_REFERENCE_KEYS,
    REFERENCE_KEYS,
    Pipeline,
    Stage,
    command_entry,
    load_pipeline,
)

STAGE_FILE = "stage.json"
PIPELINE_FILE = "pipeline.json"
READ_LABELS = {"model_name_or_path": "model", "ref_model_name_or_path": "ref", "reward_model_path": "reward_model",
               "baseline": "baseline", "value_model_path": "value_model", "dataset_name": "data",
               "eval_dataset_name": "eval_data", "reward_funcs": "rewards", "judge": "judge"}


@dataclass
class StagePlan:
    stage: Stage
    hash: str
    payload: dict[str, Any]
    action: str  # cached | run | resume | forced
    reason: str = ""  # why it runs ("new", "key learning_rate changed", "input sft reruns", ...)
    resume_from: Path | None = None
    resume_step: int = 0

    @property
    def status(self) -> str:
        if self.action == "resume":
            return f"resume from step {self.resume_step}"
        if self.action == "run" and self.reason:
            return f"run ({self.reason})"
        return self.action


@dataclass
class PipelineResult:
    output_dir: Path
    plans: list[StagePlan]
    ran: list[str] = field(default_factory=list)
    stopped_at: str | None = None  # the stage a signal stopped (its checkpoint is kept)
    report_path: Path | None = None
    stage_results: dict[str, Any] = field(default_factory=dict)  # small summaries, no models

    @property
    def stage_dirs(self) -> dict[str, Path]:
        return {p.stage.name: p.stage.output_dir for p in self.plans}


def read_stage_record(stage_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((stage_dir / STAGE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)


def _latest_checkpoint(stage: Stage) -> tuple[Path, int] | None:
    from posttrain.engine.checkpoint import STATE_FILE, list_checkpoints

    if not hasattr(stage.config, "resume_from_checkpoint"):
        return None
    found = list_checkpoints(stage.output_dir)
    if not found:
        return None
    step = json.loads((found[-1] / STATE_FILE).read_text()).get("step", 0)
    return found[-1], int(step)


def plan_pipeline(pipeline: Pipeline, force: str | None = None) -> list[StagePlan]:
    """Decide, stage by stage, what happens; nothing is run or written."""
    forced_from = None
    if force is not None:
        forced_from = [s.name for s in pipeline.stages].index(pipeline.stage(force).name)
    hashes: dict[str, str] = {}
    plans: list[StagePlan] = []
    running: set[str] = set()
    for index, stage in enumerate(pipeline.stages):
        payload = hash_payload(stage, hashes)
        digest = payload_hash(payload)
        hashes[stage.name] = digest
        plan = StagePlan(stage=stage, hash=digest, payload=payload, action="run")
        record = read_stage_record(stage.output_dir)
        rerun_inputs = [name for name in stage.upstream if name in running]
        if forced_from is not None and index >= forced_from:
            plan.action = "forced"
        elif record is None:
            plan.reason = "new"
        elif rerun_inputs:
            plan.reason = f"input {', '.join(rerun_inputs)} reruns"
        elif record.get("hash") != digest:
            plan.reason = describe_change(record.get("payload"), payload)
        elif record.get("finished"):
            plan.action = "cached"
        else:
            latest = _latest_checkpoint(stage)
            if latest is not None:
                plan.action, (plan.resume_from, plan.resume_step) = "resume", latest
            else:
                plan.reason = "interrupted before its first checkpoint"
        if plan.action != "cached":
            running.add(stage.name)
        plans.append(plan)
    return plans


def _short(path: Any) -> str:
    """A path relative to the working directory when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def _short_spec(spec: str) -> str:
    """`/abs/path/rewards.py:fn` → `path/rewards.py:fn`; built-ins and module names unchanged."""
    module, sep, attr = spec.rpartition(":")
    return f"{_short(module)}:{attr}" if sep and "/" in module else spec


def stage_reads(stage: Stage) -> str:
    values = dataclasses.asdict(stage.config)
    parts = []
    for key, label in READ_LABELS.items():
        if key not in values:
            continue
        value = values[key]
        if key == "model_name_or_path" and value is None:
            parts.append(f"{label}: embedded default")
        elif key in stage.references:
            parts.append(f"{label}: {stage.references[key]}")
        elif key in stage.start_keys:
            parts.append(f"{label}: start")
        elif key in LIST_REFERENCE_KEYS and value:
            entries = [stage.references.get(f"{key}[{i}]") or _short_spec(str(v)) for i, v in enumerate(value)]
            parts.append(f"{label}: {', '.join(entries)}")
        elif isinstance(value, str) and value:
            parts.append(f"{label}: {_short(value) if key not in REFERENCE_KEYS or '/' in value else value}")
    return "; ".join(parts)


def format_plan(pipeline: Pipeline, plans: list[StagePlan]) -> str:
    rows = [("stage", "command", "reads", "writes", "status")]
    rows += [(p.stage.name, p.stage.command, stage_reads(p.stage), _short(p.stage.output_dir), p.status)
             for p in plans]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"pipeline {pipeline.source}: {len(plans)} stages -> {_short(pipeline.output_dir)}"]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    cached = sum(p.action == "cached" for p in plans)
    lines.append(f"  {cached} cached, {len(plans) - cached} to run")
    return "\n".join(lines)


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _summary(result: Any) -> dict[str, Any]:
    """The plain numbers of a recipe's result (its model is not kept)."""
    if not dataclasses.is_dataclass(result):
        return {}
    out = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, (int, float, str, bool, dict, type(None), Path)):
            out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def run_stage(plan: StagePlan, log: Callable[[str], None]) -> tuple[bool, dict[str, Any]]:
    """Run one stage's recipe in this process; returns (finished, summary)."""
    stage = plan.stage
    module_name, _, fn_name = command_entry(stage.command, f"stage {stage.name!r}")
    config = stage.config
    if plan.action == "resume":
        config = dataclasses.replace(config, resume_from_checkpoint=str(plan.resume_from))
        log(f"== stage {stage.name} ({stage.command}): resuming from {_short(plan.resume_from)}")
    else:
        if stage.output_dir.exists():
            shutil.rmtree(stage.output_dir)  # a stale or forced stage starts clean
        log(f"== stage {stage.name} ({stage.command}) -> {_short(stage.output_dir)}")
    started = time.time()
    record = {"stage": stage.name, "command": stage.command, "hash": plan.hash, "finished": False,
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "payload": plan.payload}
    write_json_atomic(stage.output_dir / STAGE_FILE, record)
    fn = getattr(importlib.import_module(module_name), fn_name)
    result = fn(config)
    summary = _summary(result)
    del result
    _free_memory()
    if summary.get("stopped_early"):
        return False, summary
    seconds = time.time() - started
    write_json_atomic(stage.output_dir / STAGE_FILE, {
        **record, "finished": True, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 1),
        "resumed_from_step": plan.resume_step if plan.action == "resume" else None})
    log(f"== stage {stage.name} finished in {seconds:.0f} s")
    return True, summary


def build_report(pipeline: Pipeline, result: PipelineResult, log: Callable[[str], None]) -> Path | None:
    """The pipeline report (posttrain.report), when that module provides it."""
    try:
        from posttrain.report import build_pipeline_report
    except ImportError:
        log("report: posttrain.report.build_pipeline_report is not available; stage outputs are in "
            f"{_short(pipeline.output_dir)}")
        return None
    try:
        path = build_pipeline_report(pipeline.output_dir, result.stage_dirs)
    except Exception as exc:  # noqa: BLE001 — a report failure must not hide finished training
        log(f"report: could not be built ({type(exc).__name__}: {exc})")
        return None
    return Path(path) if path is not None else None


def run_pipeline(source: str | Path | dict[str, Any], *, force: str | None = None, dry_run: bool = False,
                 base_dir: str | Path | None = None, output_dir: str | Path | None = None,
                 log: Callable[[str], None] = print) -> PipelineResult:
    """Plan, print the plan, then run every stage that is not cached, in order.

    Stops (without marking the stage finished) when a stage is stopped by SIGINT/SIGTERM: its
    checkpoint is kept and the next run resumes there."""
    pipeline = load_pipeline(source, base_dir=base_dir, output_dir=output_dir)
    plans = plan_pipeline(pipeline, force=force)
    log(format_plan(pipeline, plans))
    result = PipelineResult(output_dir=pipeline.output_dir, plans=plans)
    if dry_run:
        return result
    pipeline.output_dir.mkdir(parents=True, exist_ok=True)
    _write_pipeline_record(pipeline, plans, result)
    for plan in plans:
        if plan.action == "cached":
            log(f"== stage {plan.stage.name}: cached ({_short(plan.stage.output_dir)})")
            continue
        finished, summary = run_stage(plan, log)
        result.stage_results[plan.stage.name] = summary
        if not finished:
            result.stopped_at = plan.stage.name
            log(f"pipeline stopped in stage {plan.stage.name}; run the same command again to resume it "
                "from its checkpoint")
            _write_pipeline_record(pipeline, plans, result)
            return result
        result.ran.append(plan.stage.name)
    _write_pipeline_record(pipeline, plans, result)
    result.report_path = build_report(pipeline, result, log)
    log(f"pipeline done: {len(result.ran)} stage(s) run, {len(plans) - len(result.ran)} cached; outputs in "
        f"{_short(pipeline.output_dir)}" + (f"; report: {_short(result.report_path)}" if result.report_path else ""))
    return result


def _write_pipeline_record(pipeline: Pipeline, plans: list[StagePlan], result: PipelineResult) -> None:
    stages = []
    for plan in plans:
        record = read_stage_record(plan.stage.output_dir) or {}
        stages.append({"name": plan.stage.name, "command": plan.stage.command, "dir": str(plan.stage.output_dir),
                       "status": plan.status, "hash": plan.hash, "finished": bool(record.get("finished")),
                       "references": plan.stage.references})
    write_json_atomic(pipeline.output_dir / PIPELINE_FILE, {
        "source": pipeline.source, "stages": stages, "stopped_at": result.stopped_at,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S")})

