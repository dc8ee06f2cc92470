"""Slow end-to-end (`make test-slow`): online DPO raises the mean score of a tiny model on a verifiable
toy task within 30 steps, and runs on the embedded SmolLM2-135M-Instruct from JSONL and from --config."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain import OnlineDPOConfig, online_dpo
from posttrain.demo.tasks import generate
from tests.conftest import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]


def even_ids(prompts, completions, completion_ids, **columns):
    """Verifiable and dense: the share of completion tokens with an even id (about 0.5 at start)."""
    return [sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids]


@pytest.mark.slow
def test_online_dpo_raises_mean_score(tmp_path, tokenizer):
    _, prompts = generate(seed=5, n_train=0, n_eval=64)
    model = make_tiny_llama()
    with torch.no_grad():  # a peaked (not uniform) starting policy, as a trained model has
        model.model.embed_tokens.weight.mul_(20)
    config = OnlineDPOConfig(output_dir=str(tmp_path / "online-dpo"), max_steps=30, per_device_train_batch_size=16,
                             max_completion_length=8, temperature=1.0, learning_rate=1e-2, beta=0.1,
                             logging_steps=1, save_steps=0, disable_tqdm=True, seed=1)
    result = online_dpo(config, model=model, tokenizer=tokenizer, dataset=prompts, reward_funcs=[even_ids])
    rows = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    scores = [r["objective/scores"] for r in rows]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    print(f"mean score: first 5 steps {first:.3f}, last 5 steps {last:.3f}; "
          f"KL at the end {rows[-1]['objective/kl']:.2f}")
    assert last > first + 0.2
    assert rows[-1]["objective/kl"] > 0  # it moved away from the reference
    # late pairs often tie (both all-even): they train nothing, so judge the margins over the run
    assert max(r["rewards/margins"] for r in rows) > 0.1


def _prompt_rows(n: int) -> list[dict]:
    return generate(seed=7, n_train=0, n_eval=n)[1]


def _run(tmp_path, argv) -> tuple[Path, list[dict]]:
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "online-dpo", *argv], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    return out, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _check_output(out: Path, rows: list[dict]) -> None:
    from transformers import AutoModelForCausalLM

    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-3)  # policy == reference before the update
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 49152


@pytest.mark.slow
def test_online_dpo_on_embedded_default_from_jsonl(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _prompt_rows(4)))
    out, rows = _run(tmp_path, ["--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                                "--per_device_train_batch_size", "2", "--max_new_tokens", "16",
                                "--reward_funcs", "accuracy", "format", "--missing_eos_penalty", "1.0",
                                "--learning_rate", "1e-6", "--logging_steps", "1", "--disable_tqdm"])
    _check_output(out, rows)
    assert "rewards/accuracy/mean" in rows[0] and "rewards/format/mean" in rows[0]


@pytest.mark.slow
def test_online_dpo_on_embedded_default_from_config(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _prompt_rows(4)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"dataset_name: {data}\noutput_dir: {tmp_path / 'out'}\nmax_steps: 2\n"
                   "per_device_train_batch_size: 2\nmax_completion_length: 16\nloss_type: ipo\n"
                   "reward_funcs: [length_penalty=0.01]\nlogging_steps: 1\ndisable_tqdm: true\n")
    out, rows = _run(tmp_path, ["--config", str(cfg)])
    _check_output(out, rows)
    assert (out / "config.yaml").exists()
