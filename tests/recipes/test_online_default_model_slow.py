"""Slow end-to-end (`make test-slow`): GRPO with a user's reward module and RLOO on the embedded
SmolLM2-135M-Instruct, from a JSONL file and from `--config` YAML; each writes metrics.jsonl and a
model that transformers loads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.demo.tasks import generate

REPO = Path(__file__).resolve().parents[2]
REWARD_MODULE = """
def said_a_number(prompts, completions, answer, **kwargs):
    # 1 when the completion contains the answer, else 0 (a user's own reward function)
    return [float(str(a) in c[-1]["content"]) for c, a in zip(completions, answer)]
"""
SETTINGS = {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 8,
            "logging_steps": 1, "save_steps": 0, "disable_tqdm": True}


def _prompts(tmp_path: Path) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate(seed=3, n_train=0, n_eval=8)[1]))
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    return data


def _run(tmp_path: Path, args: list) -> None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(tmp_path)])}  # the reward module's home
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _check_output(out: Path, reward_key: str) -> list[dict]:
    from transformers import AutoModelForCausalLM

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and 0.0 <= r[reward_key] <= 1.0
        assert 1 <= r["completions/mean_length"] <= SETTINGS["max_completion_length"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000
    return rows


def _flags(settings: dict) -> list[str]:
    return [x for k, v in settings.items() for x in ([f"--{k}"] if v is True else [f"--{k}", str(v)])]


@pytest.mark.slow
def test_grpo_with_reward_module_on_embedded_default_from_jsonl(tmp_path):
    data = _prompts(tmp_path)
    out = tmp_path / "grpo"
    _run(tmp_path, ["grpo", "--dataset_name", data, "--output_dir", out, "--reward_funcs", "my_rewards:said_a_number",
                    *_flags(SETTINGS)])
    rows = _check_output(out, "rewards/said_a_number/mean")
    assert "kl" not in rows[0]  # beta 0 (GRPO's default): no reference model


@pytest.mark.slow
def test_rloo_on_embedded_default_from_jsonl(tmp_path):
    data = _prompts(tmp_path)
    out = tmp_path / "rloo"
    _run(tmp_path, ["rloo", "--dataset_name", data, "--output_dir", out, "--reward_funcs", "accuracy",
                    *_flags(SETTINGS)])
    rows = _check_output(out, "rewards/accuracy/mean")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is still the reference


@pytest.mark.slow
@pytest.mark.parametrize("command,reward", [("grpo", "my_rewards:said_a_number"), ("rloo", "my_rewards:said_a_number")])
def test_online_commands_on_embedded_default_from_config(tmp_path, command, reward):
    """The same runs driven by `--config run.yaml` (every key from YAML, no flag but --config)."""
    data = _prompts(tmp_path)
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    lines = [f"dataset_name: {data}", f"output_dir: {out}", f"reward_funcs: [{reward}]"]
    lines += [f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in SETTINGS.items()]
    cfg.write_text("\n".join(lines) + "\n")
    _run(tmp_path, [command, "--config", cfg])
    _check_output(out, "rewards/said_a_number/mean")
    assert (out / "config.yaml").exists()
