"""Slow end-to-end (`make test-slow`): DPO and KTO on the embedded SmolLM2-135M-Instruct from JSONL."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.demo.tasks import generate_preferences, generate_unpaired

REPO = Path(__file__).resolve().parents[2]


def _run(command, data_rows, tmp_path, *extra):
    data = tmp_path / f"{command}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in data_rows))
    out = tmp_path / command
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", command, "--dataset_name", data, "--output_dir", out,
                           "--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1",
                           "--max_length", "128", "--max_prompt_length", "64", "--disable_tqdm", *extra],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.slow
def test_dpo_on_embedded_default(tmp_path):
    out, rows = _run("dpo", generate_preferences(n_train=8, n_eval=0)[0], tmp_path)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and len(rows) == 2
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
def test_kto_on_embedded_default_with_lora(tmp_path):
    out, rows = _run("kto", generate_unpaired(n_train=8, n_eval=0)[0], tmp_path, "--use_peft", "--lora_r", "4")
    assert rows[0]["kl"] == 0.0 and len(rows) == 2
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_reward_on_embedded_default(tmp_path):
    from transformers import AutoModelForSequenceClassification

    out, rows = _run("reward", generate_preferences(n_train=8, n_eval=0)[0], tmp_path, "--learning_rate", "1e-5")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert 0.0 <= rows[0]["accuracy"] <= 1.0
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1


@pytest.mark.slow
@pytest.mark.parametrize("command", ["dpo", "kto", "reward"])
def test_preference_commands_on_embedded_default_from_config(tmp_path, command):
    """The same runs driven by `--config run.yaml` (every key from YAML, no flags but --config)."""
    rows = generate_unpaired(n_train=8, n_eval=0)[0] if command == "kto" else generate_preferences(n_train=8, n_eval=0)[0]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"dataset_name: {data}\noutput_dir: {out}\nmax_steps: 2\nper_device_train_batch_size: 2\n"
                   "logging_steps: 1\nmax_length: 128\nmax_prompt_length: 64\ndisable_tqdm: true\n")
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", command, "--config", cfg], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(logged) == 2
    if command == "dpo":
        assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "model.safetensors").exists() and (out / "config.yaml").exists()
