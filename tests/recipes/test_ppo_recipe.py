"""The PPO recipe on a tiny policy and a tiny reward model built here: first-update identities,
ids as sampled, metrics from the loss's masks, saved artefacts, resume, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain import PPOConfig, ppo
from posttrain.demo.tasks import generate
from tests.conftest import StopAfterCheckpoint, make_tiny_llama

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prompts():
    _, held = generate(seed=17, n_train=0, n_eval=8)
    return held


@pytest.fixture()
def reward_model_dir(tmp_path, tokenizer):
    """A tiny random reward model (its own seed, so the critic starts unlike the policy)."""
    from posttrain.models.reward_model import reward_model_from_causal_lm

    out = tmp_path / "rm"
    reward_model_from_causal_lm(make_tiny_llama(seed=7), tokenizer.pad_token_id).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _cfg(tmp_path, name, reward_model_dir, **kw) -> PPOConfig:
    base = {"output_dir": str(tmp_path / name), "reward_model_path": str(reward_model_dir), "max_steps": 1,
            "per_device_train_batch_size": 4, "max_completion_length": 8, "learning_rate": 1e-3,
            "logging_steps": 1, "save_steps": 0, "disable_tqdm": True, "seed": 3, "num_ppo_epochs": 1}
    base.update(kw)
    return PPOConfig(**base)


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_pitfall_13_single_update_ratio_one_kl_zero(tmp_path, tokenizer, prompts, reward_model_dir):
    """One update on a fresh rollout (prompts of different lengths, completions cut at different
    points: padding everywhere): ratio exactly 1, KL to the reference exactly 0, nothing clipped."""
    result = ppo(_cfg(tmp_path, "first", reward_model_dir, kl_coef=0.5, kl_estimator="k3"), model=make_tiny_llama(),
                 tokenizer=tokenizer, dataset=prompts)
    row = _rows(result.output_dir)[0]
    assert row["objective/kl"] == 0.0 and row["objective/non_score_reward"] == 0.0
    assert row["objective/rlhf_reward"] == pytest.approx(row["objective/scores"], abs=1e-6)
    assert row["val/ratio"] == 1.0 and row["policy/approxkl"] == 0.0 and row["policy/clipfrac"] == 0.0
    for key in ("objective/scores", "objective/entropy", "loss/policy", "loss/value", "val/clipfrac",
                "val/explained_variance", "rewards/reward_model/mean", "completions/mean_length"):
        assert key in row and math.isfinite(row[key]), key


def test_pitfall_13_first_minibatch_ratio_exactly_one(tmp_path, tokenizer, prompts, reward_model_dir, monkeypatch):
    """Several epochs x mini-batches x accumulation, temperature 0.7: the first mini-batch's ratio
    is exactly 1 on every completion token; later mini-batches (after an update) move."""
    import posttrain.losses.policy_gradient as pg

    real, seen = pg.clipped_policy_loss, []

    def recording(logp, old_logp, advantages, mask, **kw):
        loss, stats = real(logp, old_logp, advantages, mask, **kw)
        seen.append((stats["ratio"][mask.bool()], int(mask.sum())))
        return loss, stats

    monkeypatch.setattr(pg, "clipped_policy_loss", recording)
    ppo(_cfg(tmp_path, "mb", reward_model_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2,
             num_mini_batches=2, num_ppo_epochs=2, num_generations=2, temperature=0.7), model=make_tiny_llama(),
        tokenizer=tokenizer,
        dataset=prompts)
    assert len(seen) == 2 * 2 * 2  # epochs x mini-batches x micro-batches
    for ratio, n in seen[:2]:  # the first mini-batch = its two micro-batches
        assert n > 0 and torch.equal(ratio, torch.ones_like(ratio))
    assert any(not torch.equal(r, torch.ones_like(r)) for r, _ in seen[2:])


def test_pitfall_17_loss_sees_the_sampled_ids(tmp_path, tokenizer, prompts, reward_model_dir, monkeypatch):
    """Every training forward scores exactly the sampled completion ids after exactly the prompt ids."""
    from posttrain.models.value_model import PolicyWithCritic
    from posttrain.rollout.generation import HFGenerationBackend

    real_generate, real_forward = HFGenerationBackend.generate, PolicyWithCritic.forward
    sampled, trained = [], []

    def generate(self, *args, **kw):
        rollout = real_generate(self, *args, **kw)
        sampled.extend(zip(map(tuple, rollout.prompt_ids), map(tuple, rollout.completion_ids)))
        return rollout

    def forward(self, input_ids, attention_mask, **kw):
        if torch.is_grad_enabled():  # the loss's forwards (the rollout's run under no_grad)
            target = kw["target_mask"]
            for ids, att, tm in zip(input_ids.tolist(), attention_mask.tolist(), target.tolist()):
                start = tm.index(True) + 1
                end = sum(att)
                assert all(tm[start - 1:end - 1]) and not any(tm[end - 1:])
                trained.append((tuple(ids[:start]), tuple(ids[start:end])))
        return real_forward(self, input_ids, attention_mask, **kw)

    monkeypatch.setattr(HFGenerationBackend, "generate", generate)
    monkeypatch.setattr(PolicyWithCritic, "forward", forward)
    ppo(_cfg(tmp_path, "ids", reward_model_dir, max_steps=2, num_ppo_epochs=2, per_device_train_batch_size=2,
             gradient_accumulation_steps=2, max_completion_length=6), model=make_tiny_llama(), tokenizer=tokenizer,
        dataset=prompts)
    assert sorted(trained) == sorted(sampled * 2)  # each completion once per PPO epoch


def test_pitfall_18_20_ppo_metrics_sane_and_saved_model_reloads(tmp_path, tokenizer, prompts, reward_model_dir):
    """pitfall 18/20: metrics in range over several updates; the saved policy's logits equal the
    live model's; the critic is saved under value_model/ as a one-output classifier."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    result = ppo(_cfg(tmp_path, "save", reward_model_dir, max_steps=2, num_ppo_epochs=2, num_mini_batches=2,
                      per_device_train_batch_size=2, missing_eos_penalty=1.0), model=make_tiny_llama(),
                 tokenizer=tokenizer, dataset=prompts)
    rows = _rows(result.output_dir)
    assert len(rows) == 2
    for row in rows:
        assert row["objective/entropy"] >= 0 and row["policy/entropy"] >= 0
        assert 0 <= row["policy/clipfrac"] <= 1 and 0 <= row["val/clipfrac"] <= 1
        assert row["policy/approxkl"] >= 0 and row["loss/value"] >= 0
        assert 0 <= row["completions/clipped_ratio"] <= 1
    # a 49k-vocabulary random model never says EOS in 8 tokens: every score is penalised by 1
    assert rows[0]["completions/clipped_ratio"] == 1.0
    assert rows[0]["objective/scores"] == pytest.approx(rows[0]["rewards/reward_model/mean"] - 1.0, abs=1e-5)
    ids = torch.tensor([tokenizer.encode("Compute 2 + 3.")])
    live = result.model.eval()
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    with torch.no_grad():
        assert torch.equal(live(ids).logits, reloaded(ids).logits)
    critic = AutoModelForSequenceClassification.from_pretrained(result.output_dir / "value_model")
    assert critic.config.num_labels == 1
    assert torch.equal(critic.score.weight, result.value_model.model.score.weight.detach().cpu())


def test_ppo_value_head_on_policy_with_lora(tmp_path, tokenizer, prompts, reward_model_dir):
    """LoRA + value head: one base for policy, reference (adapter disabled) and critic; KL starts at 0."""
    result = ppo(_cfg(tmp_path, "head", reward_model_dir, value_head_on_policy=True, use_peft=True, lora_r=4,
                      max_steps=2), model=make_tiny_llama(), tokenizer=tokenizer, dataset=prompts)
    rows = _rows(result.output_dir)
    assert rows[0]["objective/kl"] == 0.0 and rows[0]["val/ratio"] == 1.0
    assert rows[1]["objective/kl"] != 0.0  # the adapter moved the policy away from its base
    assert (result.output_dir / "adapter_model.safetensors").exists()
    assert (result.output_dir / "value_model" / "value_head.safetensors").exists()


def test_pitfall_19_ppo_resume_is_bit_identical(tmp_path, tokenizer, prompts, reward_model_dir, monkeypatch):
    """2 iterations straight == 1 + interrupt + resume + 1: policy and critic bit for bit."""
    kw = dict(max_steps=2, save_steps=1, num_ppo_epochs=2, per_device_train_batch_size=2)
    straight = ppo(_cfg(tmp_path, "straight", reward_model_dir, **kw), model=make_tiny_llama(), tokenizer=tokenizer,
                   dataset=prompts)
    out = tmp_path / "interrupted"
    import posttrain.engine.session as session

    monkeypatch.setattr(session, "GracefulStop", lambda: StopAfterCheckpoint(out / "checkpoints" / "step-000001"))
    first = ppo(_cfg(tmp_path, "interrupted", reward_model_dir, **kw), model=make_tiny_llama(), tokenizer=tokenizer,
                dataset=prompts)
    assert first.stopped_early and not (out / "model.safetensors").exists()
    ckpt = out / "checkpoints" / "step-000001"  # loadable (pitfall 20): the policy, its critic in value_model/
    assert (ckpt / "model.safetensors").exists() and (ckpt / "value_model" / "model.safetensors").exists()
    monkeypatch.undo()
    resumed = ppo(_cfg(tmp_path, "interrupted", reward_model_dir, resume_from_checkpoint="latest", **kw),
                  model=make_tiny_llama(), tokenizer=tokenizer, dataset=prompts)
    for a, b in ((straight.model, resumed.model), (straight.value_model, resumed.value_model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert [r["loss"] for r in _rows(out)] == [r["loss"] for r in _rows(straight.output_dir)]


def test_ppo_rejects_batch_not_whole_groups_and_no_reward(tmp_path, tokenizer, prompts, reward_model_dir):
    with pytest.raises(ValueError, match="multiple of --num_generations"):
        ppo(_cfg(tmp_path, "g", reward_model_dir, per_device_train_batch_size=3, num_generations=2),
            model=make_tiny_llama(), tokenizer=tokenizer, dataset=prompts)
    with pytest.raises(ValueError, match="no reward"):
        ppo(_cfg(tmp_path, "r", None, reward_model_path=None), model=make_tiny_llama(), tokenizer=tokenizer,
            dataset=prompts)


def test_ppo_cli_from_config(tmp_path, tiny_model_dir, prompts, reward_model_dir):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompts))
    cfg = tmp_path / "ppo.yaml"
    out = tmp_path / "out"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\noutput_dir: {out}\n"
                   f"reward_model_path: {reward_model_dir}\nmax_steps: 2\nper_device_train_batch_size: 4\n"
                   "num_ppo_epochs: 2\nmax_completion_length: 6\nkl_coef: 0.1\nmissing_eos_penalty: 0.5\n"
                   "disable_tqdm: true\nlogging_steps: 1\n")
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "ppo", "--config", cfg, "--gamma", "0.99"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 2 and rows[0]["objective/kl"] == 0.0
    assert "one step = one PPO iteration" in proc.stdout and "2 optimizer updates per iteration" in proc.stdout
    assert (out / "model.safetensors").exists() and (out / "value_model" / "model.safetensors").exists()
    assert "gamma: 0.99" in (out / "config.yaml").read_text()
