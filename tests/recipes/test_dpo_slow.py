"""Slow end-to-end (`make test-slow`): DPO on generated preference data lifts held-out preference
accuracy (implicit reward of chosen > rejected, ties = half) from chance to above 90 %."""

from __future__ import annotations

import json

import pytest

from posttrain import DPOConfig, dpo
from posttrain.demo.tasks import generate_preferences
from tests.conftest import make_tiny_llama


@pytest.mark.slow
def test_dpo_lifts_held_out_preference_accuracy(tmp_path, tokenizer):
    train, held_out = generate_preferences(seed=99, n_train=256, n_eval=64)
    config = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=40, per_device_train_batch_size=8,
                       learning_rate=2e-3, beta=0.1, logging_steps=10, save_steps=0, disable_tqdm=True,
                       warmup_ratio=0.1)
    result = dpo(config, model=make_tiny_llama(hidden_size=64), tokenizer=tokenizer, dataset=train,
                 eval_dataset=held_out)
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    before = lines[0]["eval/rewards/accuracies"]
    after = result.eval_metrics["eval/rewards/accuracies"]
    print(f"held-out preference accuracy: before {before:.3f}, after {after:.3f}")
    assert before == pytest.approx(0.5)
    assert after > 0.9
