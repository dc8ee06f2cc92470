"""Dropout in the recipes (pitfall 25), on a tiny Llama with attention dropout 0.1 in its config and
LoRA dropout 0.1 (Llama has no other dropout).

- default --disable_dropout true: every dropout is 0 in the trained model, so the first mini-batch's
  ratio is exactly 1, the old log-probs equal the recomputed ones bit for bit, and the preference
  losses start at their closed forms;
- --disable_dropout false: dropout stays in the policy's training forward, but every quantity that
  stands for the old or reference policy (old log-probs, values, reference log-probs, KL, KTO's z₀)
  is still computed in eval mode: computing it twice gives the same bits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain import DPOConfig, GRPOConfig, KTOConfig, PPOConfig, RLOOConfig, dpo, grpo, kto, ppo, rloo
from posttrain.demo.tasks import generate, generate_preferences, generate_unpaired
from tests.conftest import make_tiny_llama

P = 0.1


def dropout_llama(seed: int = 0):
    """As loaded from a config with attention_dropout 0.1 (LlamaAttention copies it at init)."""
    model = make_tiny_llama(seed=seed)
    model.config.attention_dropout = P
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = P
    return model


@pytest.fixture()
def reward_model_dir(tmp_path, tokenizer):
    """A critic/reward model whose config also has attention dropout 0.1."""
    from posttrain.models.reward_model import reward_model_from_causal_lm

    out = tmp_path / "rm"
    rm = reward_model_from_causal_lm(make_tiny_llama(seed=7), tokenizer.pad_token_id)
    rm.config.attention_dropout = P
    rm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _common(tmp_path, name, **kw) -> dict:
    base = {"output_dir": str(tmp_path / name), "use_peft": True, "lora_r": 4, "lora_dropout": P,
            "dtype": "float32", "bf16": False, "max_steps": 1, "learning_rate": 1e-3, "logging_steps": 1,
            "save_steps": 0, "disable_tqdm": True, "seed": 3}
    base.update(kw)
    return base


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def length_reward(prompts, completions, completion_ids, **columns):
    return [len(ids) / 6.0 for ids in completion_ids]


def _record_policy_loss(monkeypatch) -> list:
    import posttrain.losses.policy_gradient as pg

    real, seen = pg.clipped_policy_loss, []

    def recording(logp, old_logp, advantages, mask, **kw):
        seen.append((logp.detach().clone(), old_logp.detach().clone(), mask.bool().clone()))
        return real(logp, old_logp, advantages, mask, **kw)

    monkeypatch.setattr(pg, "clipped_policy_loss", recording)
    return seen


def _record_value_loss(monkeypatch) -> list:
    import posttrain.losses.policy_gradient as pg

    real, seen = pg.value_loss, []

    def recording(values, old_values, returns, mask, **kw):
        seen.append((values.detach().clone(), old_values.detach().clone(), mask.bool().clone()))
        return real(values, old_values, returns, mask, **kw)

    monkeypatch.setattr(pg, "value_loss", recording)
    return seen


def test_pitfall_25_ppo_first_minibatch_ratio_exactly_one_with_dropout_model(tmp_path, tokenizer,
                                                                            reward_model_dir, monkeypatch):
    """Old log-probs and values (rollout, no grad) equal the first mini-batch's recomputed ones bit
    for bit, and the KL to the reference is exactly 0 — with dropout 0.1 configured everywhere."""
    policy_seen, value_seen = _record_policy_loss(monkeypatch), _record_value_loss(monkeypatch)
    _, prompts = generate(seed=17, n_train=0, n_eval=4)
    cfg = PPOConfig(**_common(tmp_path, "ppo"), reward_model_path=str(reward_model_dir), kl_coef=0.5,
                    per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=1,
                    num_ppo_epochs=2, max_completion_length=6)
    row = _rows(ppo(cfg, model=dropout_llama(), tokenizer=tokenizer, dataset=prompts).output_dir)[0]
    for (logp, old, mask), (values, old_values, vmask) in zip(policy_seen[:2], value_seen[:2], strict=True):
        assert mask.any() and torch.equal(logp[mask], old[mask])
        assert torch.equal(values[vmask], old_values[vmask])
    assert row["objective/kl"] == 0.0


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_pitfall_25_grpo_rloo_old_logps_equal_recomputed_with_dropout_model(tmp_path, tokenizer, method,
                                                                           monkeypatch):
    """--num_iterations 2 (GRPO) and RLOO compute old log-probs at rollout time: the first pass
    recomputes exactly them, and the KL to the reference is exactly 0."""
    seen = _record_policy_loss(monkeypatch)
    _, prompts = generate(seed=31, n_train=0, n_eval=4)
    common = _common(tmp_path, method, beta=0.1, per_device_train_batch_size=8, num_generations=4,
                     max_completion_length=6)
    if method == "grpo":
        result = grpo(GRPOConfig(**common, num_iterations=2), model=dropout_llama(), tokenizer=tokenizer,
                      dataset=prompts, reward_funcs=[length_reward])
    else:
        result = rloo(RLOOConfig(**common), model=dropout_llama(), tokenizer=tokenizer, dataset=prompts,
                      reward_funcs=[length_reward])
    logp, old, mask = seen[0]
    assert mask.any() and torch.equal(logp[mask], old[mask])
    assert _rows(result.output_dir)[0]["kl"] == 0.0


def test_pitfall_25_dpo_and_kto_start_at_their_closed_forms_with_dropout_model(tmp_path, tokenizer):
    """The policy's training forward and the reference agree at step 0 despite configured dropout."""
    train, _ = generate_preferences(seed=17, n_train=8, n_eval=0)
    row = _rows(dpo(DPOConfig(**_common(tmp_path, "dpo", per_device_train_batch_size=4)), model=dropout_llama(),
                    tokenizer=tokenizer, dataset=train).output_dir)[0]
    # fp32: ln 2 rounded (≤ 3e-8) plus a mean of 8 equal terms (≤ 8 · 2^-24 · ln 2 ≈ 3.3e-7)
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6) and row["rewards/margins"] == 0.0
    unpaired, _ = generate_unpaired(seed=23, n_train=8, n_eval=0)
    row = _rows(kto(KTOConfig(**_common(tmp_path, "kto", per_device_train_batch_size=4)), model=dropout_llama(),
                    tokenizer=tokenizer, dataset=unpaired).output_dir)[0]
    assert row["loss"] == pytest.approx(0.5, abs=1e-6) and row["kl"] == 0.0 and row["rewards/chosen"] == 0.0


def test_pitfall_25_disable_dropout_false_keeps_training_dropout_but_old_quantities_are_dropout_free(
        tmp_path, tokenizer, reward_model_dir, monkeypatch):
    """--disable_dropout false: the policy's training forwards run with dropout (the first
    mini-batch's ratio is no longer 1), but every no-grad forward of the policy or critic — old
    log-probs, values, reference log-probs — runs in eval mode: computed twice, the same bits."""
    from posttrain.models.logprobs import LogProbModel
    from posttrain.models.value_model import ValueModel

    real_forward, no_grad_calls, grad_calls = LogProbModel.forward, [], []

    def forward(self, *args, **kw):
        out = real_forward(self, *args, **kw)
        if torch.is_grad_enabled():
            grad_calls.append(self.training)
        else:
            again = real_forward(self, *args, **kw)
            no_grad_calls.append((self.training, torch.equal(out["logps"], again["logps"])))
        return out

    monkeypatch.setattr(LogProbModel, "forward", forward)
    real_values = ValueModel.forward

    def values(self, *args, **kw):
        out = real_values(self, *args, **kw)
        if not torch.is_grad_enabled():
            no_grad_calls.append((self.training, torch.equal(out, real_values(self, *args, **kw))))
        return out

    monkeypatch.setattr(ValueModel, "forward", values)
    seen = _record_policy_loss(monkeypatch)
    _, prompts = generate(seed=17, n_train=0, n_eval=4)
    cfg = PPOConfig(**_common(tmp_path, "keep", disable_dropout=False), reward_model_path=str(reward_model_dir),
                    kl_coef=0.5, per_device_train_batch_size=4, num_ppo_epochs=1, max_completion_length=6)
    result = ppo(cfg, model=dropout_llama(), tokenizer=tokenizer, dataset=prompts)
    model = result.model
    assert any(isinstance(m, torch.nn.Dropout) and m.p == P for m in model.modules())  # LoRA dropout kept
    assert all(layer.self_attn.attention_dropout == P for layer in model.base_model.model.model.layers)
    assert grad_calls and all(grad_calls)  # training forwards: train mode, dropout active
    assert no_grad_calls and all(not training and same for training, same in no_grad_calls)
    logp, old, mask = seen[0]
    assert not torch.equal(logp[mask], old[mask])  # dropout in the training forward only
