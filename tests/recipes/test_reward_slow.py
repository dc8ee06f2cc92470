"""Slow end-to-end: a tiny reward model learns the arithmetic task's preferences (`make test-slow`)."""

from __future__ import annotations

import json

import pytest

from posttrain.config import RewardConfig
from posttrain.demo.tasks import generate_preferences
from posttrain.models.reward_model import RewardModelReward
from posttrain.recipes.reward import reward
from tests.conftest import make_tiny_llama


@pytest.mark.slow
def test_tiny_reward_model_reaches_90_percent_held_out_accuracy(tmp_path, tokenizer):
    """1024 generated pairs, 300 steps of 16 pairs (~4.7 epochs) on a 2-layer, 32-wide Llama with
    SmolLM2's tokenizer: > 90 % of 256 held-out pairs (on problems never seen in training) ranked
    right. About 10 % of the rejected replies are well formatted with a wrong number, so this needs
    more than format detection. Measured: 0.973 held-out accuracy in 20 s on 2 quiet CPU cores
    (~90 s while other jobs share them)."""
    train, held_out = generate_preferences(seed=4321, n_train=1024, n_eval=256)
    config = RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=300, per_device_train_batch_size=16,
                          learning_rate=2e-3, warmup_ratio=0.05, logging_steps=50, eval_steps=100, save_steps=0,
                          max_length=256, seed=0, disable_tqdm=True)
    result = reward(config, model=make_tiny_llama(), tokenizer=tokenizer, dataset=train, eval_dataset=held_out)
    saved = json.loads((result.output_dir / "eval_results.json").read_text())
    print(f"held-out accuracy {saved['eval/accuracy']:.4f}, margin {saved['eval/margin']:.3f}")
    assert saved["eval/num_pairs"] == 256
    assert saved["eval/accuracy"] > 0.90
    # the saved model, used as a reward function, agrees
    rm = RewardModelReward(str(result.output_dir), device="cpu", batch_size=32)
    prompts = [r["prompt"] for r in held_out]
    chosen = rm(prompts, [r["chosen"] for r in held_out])
    rejected = rm(prompts, [r["rejected"] for r in held_out])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(held_out) > 0.90
