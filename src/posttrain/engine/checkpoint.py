"""Checkpoints a user can load, and that resume exactly, written atomically.

`checkpoints/step-N/` is laid out like HF Trainer's `checkpoint-N`:

- the model as the final save writes it (models/saving.py): `config.json` + `model.safetensors`
  (or the LoRA adapter), the tokenizer and chat template — loadable with
  `AutoModelForCausalLM.from_pretrained(dir)` / `PeftModel.from_pretrained(base, dir)` /
  `AutoModelForSequenceClassification` for a reward model; PPO adds its critic in `value_model/`;
- `training_state/`: accelerate's saved state of the prepared training module (its weights
  again, optimizer, scheduler, every process's RNG states) — what resume loads;
- `trainer_state.json` (the step — which fixes the data position, see batching.py — token count,
  elapsed time) and, when a recipe keeps some, per-process tensors (`extra_tensors_<rank>.pt`,
  e.g. a GRPO rollout reused by later --num_iterations passes).

Everything is written into a temporary directory and renamed into place, so a crash mid-write
never leaves a checkpoint that looks complete; a failed run keeps its last good one. The model
files are written by the main process only. A full fine-tune's weights are on disk twice (HF
files + training_state, ~2x model size besides the optimizer's 2x); an adapter's only once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import CheckpointError

STATE_FILE = "trainer_state.json"
TRAINING_STATE = "training_state"  # accelerate's save_state, beside the loadable model files
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary dirs are never listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).exists():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """`latest`/`true` → newest checkpoint in output_dir (None if there is none); a path → that path."""
    if resume_from_checkpoint is None or resume_from_checkpoint.lower() in ("", "false", "no"):
        return None
    if resume_from_checkpoint.lower() in ("latest", "true", "yes"):
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{path}: not a complete posttrain checkpoint (no {STATE_FILE})")
    return path


def _tensors_file(path: Path, process_index: int) -> Path:
    return path / f"extra_tensors_{process_index}.pt"


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    save_total_limit: int | None = None, tensors: dict[str, Any] | None = None,
                    write_model: Callable[[Path], None] | None = None) -> Path:
    """Save the full training state for `step` atomically; returns the checkpoint dir.

    `tensors`: this process's recipe tensors that must survive a resume (nested dicts/lists of
    tensors and numbers), one file per process, inside the same atomic rename. `write_model(dir)`
    writes the loadable model files into the checkpoint dir before the rename; it is called on every
    process (a sharded model is gathered collectively) and must write on the main one only."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / TRAINING_STATE))
    if tensors:
        torch.save(tensors, _tensors_file(tmp, accelerator.process_index))
    accelerator.wait_for_everyone()
    if write_model is not None:
        write_model(tmp)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states; returns trainer_state.json's content."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read {STATE_FILE}: {exc}") from None
    # checkpoints written before the model files sat beside it hold the state at the top level
    accelerator.load_state(str(path / TRAINING_STATE if (path / TRAINING_STATE).is_dir() else path))
    return state


def load_checkpoint_tensors(accelerator, path: Path) -> dict[str, Any]:
    """This process's `tensors` saved with the checkpoint at `path` (on CPU), or {} when none were."""
    file = _tensors_file(path, accelerator.process_index)
    if not file.exists():
        return {}
    return torch.load(file, map_location="cpu", weights_only=True)


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Half-written checkpoints from a run that died while saving."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for path in root.glob(".tmp-step-*"):
            shutil.rmtree(path, ignore_errors=True)
