"""What the user sees before compute starts: resolved config, data format, batch plan, device."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml


def save_resolved_config(config: Any, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    return path


def format_config(config: Any) -> str:
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else
                         f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                for f in dataclasses.fields(config)}
    lines = [f"{type(config).__name__}:"]
    for key, value in dataclasses.asdict(config).items():
        mark = "" if value == defaults.get(key) else "   (set)"
        lines.append(f"  {key}: {value!r}{mark}")
    return "\n".join(lines)


def format_batch_plan(*, micro_batch_size: int, accumulation: int, world_size: int, packing: bool,
                      max_length: int | None, steps: int, steps_per_epoch: int, unused_units: int,
                      mean_tokens_per_step: float, examples: int, units: int) -> str:
    unit = f"packed rows of <= {max_length} tokens" if packing else "sequences"
    per_step = micro_batch_size * accumulation * world_size
    epochs = steps / steps_per_epoch if steps_per_epoch else float("nan")
    lines = [
        "batch plan:",
        f"  {micro_batch_size} {unit} per micro-batch x {accumulation} accumulation x {world_size} process(es)"
        f" = {per_step} per optimizer step (effective batch)",
        f"  about {mean_tokens_per_step:,.0f} tokens per optimizer step; loss normalised over each whole step",
        f"  {examples} examples" + (f" in {units} packed rows" if packing else "")
        + f"; {steps_per_epoch} steps per epoch; {steps} steps ({epochs:.2f} epochs)",
    ]
    if unused_units:
        lines.append(f"  {unused_units} {unit} per epoch do not fill a step and wait for the next epoch's shuffle")
    return "\n".join(lines)
