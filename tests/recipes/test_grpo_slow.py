"""Slow end-to-end (`make test-slow`): GRPO raises the mean reward of a tiny model on a verifiable
toy task within 30 steps."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain import GRPOConfig, grpo
from posttrain.demo.tasks import generate
from tests.conftest import make_tiny_llama


def even_ids(prompts, completions, completion_ids, **columns):
    """Verifiable and dense: the share of completion tokens with an even id (about 0.5 at start)."""
    return [sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids]


@pytest.mark.slow
def test_grpo_raises_mean_reward(tmp_path, tokenizer):
    _, prompts = generate(seed=5, n_train=0, n_eval=64)
    model = make_tiny_llama()
    with torch.no_grad():  # a peaked (not uniform) starting policy, as a trained model has
        model.model.embed_tokens.weight.mul_(20)
    config = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=30, per_device_train_batch_size=16,
                        num_generations=8, max_completion_length=8, learning_rate=1e-2, logging_steps=1,
                        save_steps=0, disable_tqdm=True, seed=1)
    result = grpo(config, model=model, tokenizer=tokenizer, dataset=prompts, reward_funcs=[even_ids])
    rewards = [json.loads(x)["reward"] for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"mean reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.2
