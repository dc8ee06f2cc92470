"""RLOO on a tiny model: KL folded into the reward is 0 at the start, leave-one-out needs groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain import RLOOConfig, rloo
from posttrain.demo.tasks import generate
from tests.conftest import make_tiny_llama


def even_ids(prompts, completions, completion_ids, **columns):
    return [sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids]


def _cfg(tmp_path, name, **kw) -> RLOOConfig:
    base = {"output_dir": str(tmp_path / name), "max_steps": 1, "per_device_train_batch_size": 8,
            "num_generations": 4, "max_completion_length": 8, "learning_rate": 1e-3, "logging_steps": 1,
            "save_steps": 0, "disable_tqdm": True, "seed": 3}
    base.update(kw)
    return RLOOConfig(**base)


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_rloo_first_step_kl_zero_and_reward_unchanged(tmp_path, tokenizer):
    _, prompts = generate(seed=2, n_train=0, n_eval=8)
    result = rloo(_cfg(tmp_path, "first", beta=0.5), model=make_tiny_llama(), tokenizer=tokenizer, dataset=prompts,
                  reward_funcs=[even_ids])
    row = _rows(result.output_dir)[0]
    assert row["kl"] == 0.0
    assert row["rlhf_reward"] == pytest.approx(row["reward"], abs=1e-6)
    assert row["clip_ratio/low"] == 0.0 and row["clip_ratio/high"] == 0.0


def test_rloo_needs_two_generations(tmp_path, tokenizer):
    _, prompts = generate(seed=2, n_train=0, n_eval=8)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        rloo(_cfg(tmp_path, "one", num_generations=1), model=make_tiny_llama(), tokenizer=tokenizer,
             dataset=prompts, reward_funcs=[even_ids])


@pytest.mark.slow
def test_rloo_raises_mean_reward(tmp_path, tokenizer):
    _, prompts = generate(seed=5, n_train=0, n_eval=64)
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    result = rloo(_cfg(tmp_path, "slow", max_steps=60, per_device_train_batch_size=16, num_generations=8,
                       learning_rate=2e-2, seed=1, beta=0.001), model=model, tokenizer=tokenizer, dataset=prompts,
                  reward_funcs=[even_ids])
    rewards = [r["reward"] for r in _rows(result.output_dir)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"mean reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.2
