"""LoRA stages chained by the pipeline (pitfall 24): sft --use_peft → dpo (continues the SFT adapter)
→ dpo (merges the DPO adapter, trains a new one). Each DPO stage starts from the policy its
upstream stage produced: step-0 loss ln 2 and implicit rewards exactly 0."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.pipeline import run_pipeline


def test_pitfall_24_pipeline_passes_adapter_dirs_and_each_stage_starts_at_the_identity(tmp_path, tiny_dir,
                                                                                        task_data):
    common = {"max_steps": 1, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 0}
    spec = {
        "output_dir": str(tmp_path / "run"),
        "defaults": {"model_name_or_path": str(tiny_dir), "seed": 3, "disable_tqdm": True, "max_length": 128,
                     "use_peft": True, "lora_r": 4, "dtype": "float32", "bf16": False, "max_grad_norm": 0.0},
        "stages": {
            "sft": {"dataset_name": str(task_data["sft"]), **common, "max_steps": 3, "learning_rate": 1e-2},
            "dpo": {"command": "dpo", "model": "sft", "dataset_name": str(task_data["pairs"]), **common,
                    "learning_rate": 1e-2},
            "dpo_merged": {"command": "dpo", "model": "dpo", "adapter_start": "merge",
                           "dataset_name": str(task_data["pairs"]), **common},
        },
    }
    result = run_pipeline(spec)
    assert result.ran == ["sft", "dpo", "dpo_merged"]
    out = tmp_path / "run"
    for stage in ("sft", "dpo", "dpo_merged"):
        assert (out / stage / "adapter_config.json").exists()
    for stage in ("dpo", "dpo_merged"):
        first = next(r for r in map(json.loads, (out / stage / "metrics.jsonl").read_text().splitlines())
                     if "loss" in r)
        # fp32: ln 2 rounded (≤ 3e-8) plus a mean of 4 equal terms (≤ 4 · 2^-24 · ln 2 ≈ 1.7e-7)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6), stage
        assert first["rewards/chosen"] == 0.0 and first["rewards/margins"] == 0.0, stage
