"""Slow end-to-end PPO (`make test-slow`): a reward model trained by `posttrain.reward` on
preference pairs generated from the policy's own samples, then PPO raises its score with the KL
reported and bounded; and `posttrain ppo --reward_model_path` on the embedded default."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain import PPOConfig, RewardConfig, ppo, reward
from posttrain.demo.tasks import generate
from tests.conftest import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]


def _peaked_policy():
    model = make_tiny_llama()
    with torch.no_grad():  # a peaked (not uniform) starting policy, as a trained model has
        model.model.embed_tokens.weight.mul_(20)
    return model


def even_share(ids: list[int]) -> float:
    return sum(t % 2 == 0 for t in ids) / len(ids)


def preference_pairs_from_samples(model, tokenizer, prompts, *, generations: int, seed: int) -> list[dict]:
    """The toy preference: of a prompt's sampled completions, the one with the larger share of
    even token ids is chosen. Pairs (best, worst) and (2nd best, 2nd worst) of each group."""
    from posttrain.rollout.generation import HFGenerationBackend
    from posttrain.rollout.prompts import tokenize_prompt

    backend = HFGenerationBackend(model, tokenizer)
    rollout = backend.generate([tokenize_prompt(p["prompt"], tokenizer) for p in prompts],
                               num_generations=generations, max_completion_length=8, seed=seed)
    texts = rollout.texts(tokenizer)
    rows = []
    for k, p in enumerate(prompts):
        group = sorted(range(k * generations, (k + 1) * generations),
                       key=lambda i: even_share(rollout.completion_ids[i]))
        for best, worst in ((group[-1], group[0]), (group[-2], group[1])):
            if even_share(rollout.completion_ids[best]) > even_share(rollout.completion_ids[worst]):
                rows.append({"prompt": p["prompt"],
                             "chosen": [{"role": "assistant", "content": texts[best]}],
                             "rejected": [{"role": "assistant", "content": texts[worst]}]})
    return rows


@pytest.mark.slow
def test_ppo_raises_trained_reward_model_score(tmp_path, tokenizer):
    _, prompts = generate(seed=5, n_train=0, n_eval=64)
    pairs = preference_pairs_from_samples(_peaked_policy(), tokenizer, prompts, generations=8, seed=11)
    rm = reward(RewardConfig(output_dir=str(tmp_path / "rm"), num_train_epochs=4, per_device_train_batch_size=16,
                             learning_rate=3e-3, logging_steps=1, save_steps=0, disable_tqdm=True,
                             eval_split_ratio=0.2, seed=1),
                model=make_tiny_llama(seed=5), tokenizer=tokenizer, dataset=pairs)
    print(f"reward model: {len(pairs)} pairs, held-out accuracy {rm.eval_metrics['eval/accuracy']:.2f}")
    assert rm.eval_metrics["eval/accuracy"] > 0.6

    config = PPOConfig(output_dir=str(tmp_path / "ppo"), reward_model_path=str(rm.output_dir), max_steps=20,
                       per_device_train_batch_size=16, num_ppo_epochs=4, max_completion_length=8,
                       learning_rate=3e-3, kl_coef=0.05, logging_steps=1, save_steps=0, disable_tqdm=True, seed=1)
    result = ppo(config, model=_peaked_policy(), tokenizer=tokenizer, dataset=prompts)
    rows = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()
            if '"objective/scores"' in x]
    scores = [r["objective/scores"] for r in rows]
    kls = [r["objective/kl"] for r in rows]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    print(f"reward-model score: first 5 iterations {first:.3f}, last 5 {last:.3f}; "
          f"KL per completion: max {max(kls):.3f}, last {kls[-1]:.3f}")
    assert last > first + 0.5
    assert kls[0] == 0.0 and all(math.isfinite(k) and k < 10.0 for k in kls)


def _embedded_default_reward_model(tmp_path) -> Path:
    """A reward model dir from the embedded default (backbone + fresh score head)."""
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.models.reward_model import reward_model_from_causal_lm

    tok = load_tokenizer(None)
    out = tmp_path / "rm"
    reward_model_from_causal_lm(load_causal_lm(None, dtype="float32"), tok.pad_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_ppo_on_embedded_default_from_jsonl_and_config(tmp_path):
    from transformers import AutoModelForCausalLM

    _, prompts = generate(seed=9, n_train=0, n_eval=8)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompts))
    rm = _embedded_default_reward_model(tmp_path)
    common = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--num_ppo_epochs", "1",
              "--max_completion_length", "8", "--max_prompt_length", "64", "--logging_steps", "1", "--disable_tqdm"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "flags"
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "ppo", "--dataset_name", data, "--output_dir", out,
                           "--reward_model_path", rm, *common], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 2 and rows[0]["objective/kl"] == 0.0 and rows[0]["val/ratio"] == 1.0
    assert all(math.isfinite(r["objective/scores"]) for r in rows)
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"

    cfg = tmp_path / "ppo.yaml"
    out = tmp_path / "yaml"
    cfg.write_text(f"dataset_name: {data}\noutput_dir: {out}\nreward_model_path: {rm}\nmax_steps: 2\n"
                   "per_device_train_batch_size: 2\nnum_ppo_epochs: 1\nmax_completion_length: 8\n"
                   "max_prompt_length: 64\nlogging_steps: 1\ndisable_tqdm: true\n")
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "ppo", "--config", cfg], capture_output=True,
                          text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 2 and (out / "model.safetensors").exists() and (out / "value_model").is_dir()
