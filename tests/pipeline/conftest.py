"""A tiny model dir and small task data files shared by the pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.demo.tasks import generate, generate_preferences
from tests.conftest import make_tiny_llama


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, _tokenizer_session) -> Path:
    out = tmp_path_factory.mktemp("pipeline-model") / "tiny"
    make_tiny_llama().save_pretrained(out)
    _tokenizer_session.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline-data")
    sft_rows, prompts = generate(seed=7, n_train=16, n_eval=8)
    pairs, _ = generate_preferences(seed=8, n_train=16, n_eval=0)
    return {"sft": write_jsonl(root / "sft.jsonl", sft_rows), "prompts": write_jsonl(root / "prompts.jsonl", prompts),
            "pairs": write_jsonl(root / "pairs.jsonl", pairs)}


def small_pipeline(output_dir: Path, model_dir: Path, data: dict[str, Path]) -> dict:
    """sft → reward (from sft) → grpo (policy sft, rewarded by the reward stage) → dpo (from sft)."""
    common = {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 0,
              "learning_rate": 1e-3}
    return {
        "output_dir": str(output_dir),
        "defaults": {"model_name_or_path": str(model_dir), "seed": 3, "disable_tqdm": True, "max_length": 128},
        "stages": {
            "sft": {"dataset_name": str(data["sft"]), **common},
            "reward": {"model": "sft", "dataset_name": str(data["pairs"]), **common},
            "grpo": {"model": "sft", "reward_model": "reward", "dataset_name": str(data["prompts"]),
                     "num_generations": 2, "max_completion_length": 6, **common},
            "dpo": {"command": "dpo", "model": "sft", "dataset_name": str(data["pairs"]), **common},
        },
    }
