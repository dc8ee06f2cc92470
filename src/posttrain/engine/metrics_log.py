"""metrics.jsonl, trackers and the progress bar: one place every recipe reports a step to."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it visible instead of dropping the key
    return value


class MetricsLog:
    """Appends one JSON object per logging step to output_dir/metrics.jsonl (main process only),
    forwards the same numbers to accelerate's trackers and shows them on the progress bar."""

    def __init__(self, accelerator, output_dir: str | Path, total_steps: int, start_step: int = 0,
                 disable_progress: bool = False, tracker_config: dict[str, Any] | None = None,
                 run_name: str | None = None) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        self.is_main = accelerator.is_main_process
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(start_step)
        if accelerator.log_with:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                    for k, v in (tracker_config or {}).items()}
            accelerator.init_trackers(run_name or "posttrain", config=flat)
        self.bar = None
        if self.is_main and not disable_progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines a killed run wrote after its last checkpoint (they are redone)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
        self.path.write_text("".join(k + "\n" for k in kept))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self.is_main:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.bar is not None:
                shown = {k: record[k] for k in ("loss", "learning_rate", "grad_norm") if k in record}
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()})
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.accelerator.log_with:
            self.accelerator.end_training()


class StepTimer:
    """Wall time of optimizer steps, excluding model loading and data preparation."""

    def __init__(self, already_elapsed: float = 0.0) -> None:
        self.elapsed = already_elapsed
        self._start: float | None = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> float:
        assert self._start is not None
        took = time.perf_counter() - self._start
        self.elapsed += took
        self._start = None
        return took
