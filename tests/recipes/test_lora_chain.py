"""Chained LoRA stages (pitfall 24): `sft --use_peft` then any recipe with --model_name_or_path the
adapter dir. The reference must be the policy the stage starts from (base + the SFT adapter), not
the bare base, in both --adapter_start modes:

- continue: the SFT adapter is trained further; the reference is a frozen copy of it on the same base;
- merge: the SFT adapter is merged into the base and a new LoRA is trained; the reference is the
  merged model (the new adapter disabled).

Every check is an identity at the first step, so it holds exactly (policy and reference log-probs
are the same bits): rewards and KL exactly 0, ratio exactly 1. The SFT adapter is trained at a high
learning rate so that the bare base differs from the start policy (the old behaviour gave DPO a
step-0 loss far from ln 2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain import (
    DPOConfig,
    EvalConfig,
    GRPOConfig,
    KTOConfig,
    OnlineDPOConfig,
    PPOConfig,
    RLOOConfig,
    SFTConfig,
    dpo,
    evaluate,
    grpo,
    kto,
    online_dpo,
    ppo,
    rloo,
    sft,
)
from posttrain.demo.tasks import generate, generate_preferences, generate_unpaired
from tests.conftest import make_tiny_llama

MODES = ["continue", "merge"]
# merge mode of the recipes after DPO in make test-slow (CI runs both): the same reference path
# (a fresh LoRA, adapter disabled) that DPO's merge case and the recipes' own pitfall-10/13 tests cover
MODES_SLOW_MERGE = ["continue", pytest.param("merge", marks=pytest.mark.slow)]
# fp32 loss: ln 2 rounded to fp32 (≤ 3e-8) plus a mean of ≤ 8 equal fp32 terms (≤ 8 · 2^-24 · ln 2 ≈ 3.3e-7)
LN2_TOL = 1e-6


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, _tokenizer_session):
    """A tiny base dir and the adapter `sft --use_peft` trained on it (3 steps at lr 1e-2)."""
    root = tmp_path_factory.mktemp("chain")
    base_dir = root / "base"
    make_tiny_llama().save_pretrained(base_dir)
    _tokenizer_session.save_pretrained(base_dir)
    rows, _ = generate(seed=7, n_train=16, n_eval=0)
    out = sft(SFTConfig(output_dir=str(root / "sft"), model_name_or_path=str(base_dir), use_peft=True, lora_r=4,
                        max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                        save_steps=0, max_length=128, disable_tqdm=True, seed=3, max_grad_norm=0.0),
              tokenizer=_tokenizer_session, dataset=rows).output_dir
    assert (out / "adapter_config.json").exists() and not (out / "config.json").exists()
    return base_dir, out


def _non_trivial(adapter_dir) -> float:
    """How far the SFT policy is from its bare base: max |Δ log-prob| on a probe sequence."""
    from posttrain.models.loading import load_causal_lm

    model = load_causal_lm(str(adapter_dir), dtype="float32").eval()
    ids = torch.tensor([[1, 520, 9531, 198, 22, 2, 17, 40]])
    with torch.no_grad():
        on = model(ids).logits.log_softmax(-1)
        with model.disable_adapter():
            off = model(ids).logits.log_softmax(-1)
    return float((on - off).abs().max())


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _train_rows(out) -> list[dict]:
    return [r for r in _rows(out) if "loss" in r]


def _common(tmp_path, name, adapter_dir, mode) -> dict:
    return {"output_dir": str(tmp_path / name), "model_name_or_path": str(adapter_dir), "adapter_start": mode,
            "use_peft": True, "lora_r": 8, "dtype": "float32", "bf16": False, "max_steps": 1, "learning_rate": 1e-3,
            "logging_steps": 1, "save_steps": 0, "disable_tqdm": True, "seed": 3, "max_grad_norm": 0.0}


def even_ids(prompts, completions, completion_ids, **columns):
    return [sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids]


def id_sum(prompts, completions, completion_ids, **columns):
    return [sum(ids) / 1000 for ids in completion_ids]  # pairs practically never tie


def test_the_sft_adapter_is_far_from_its_base(sft_adapter):
    """The premise of every test here: 'adapter disabled' is a different model from the start."""
    assert _non_trivial(sft_adapter[1]) > 1e-2


@pytest.mark.parametrize("mode", MODES)
def test_pitfall_24_dpo_and_ipo_from_an_sft_adapter(tmp_path, tokenizer, sft_adapter, mode):
    """Step 0: h = 0, so sigmoid = ln 2 and IPO = (0 − 1/(2β))² = 25 at β = 0.1; rewards exactly 0."""
    train, held = generate_preferences(seed=17, n_train=8, n_eval=4)
    cfg = DPOConfig(**_common(tmp_path, "dpo", sft_adapter[1], mode), loss_type=["sigmoid", "ipo"], beta=0.1,
                    per_device_train_batch_size=4)
    result = dpo(cfg, tokenizer=tokenizer, dataset=train, eval_dataset=held)
    first = _train_rows(result.output_dir)[0]
    assert first["loss/sigmoid"] == pytest.approx(math.log(2), abs=LN2_TOL)
    assert first["loss/ipo"] == pytest.approx(25.0, rel=1e-6)  # (1/(2β))² in fp32: a few ulps of 25
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    assert _rows(result.output_dir)[0]["eval/rewards/accuracies"] == 0.5  # the step-0 evaluation too


@pytest.mark.parametrize("mode", MODES_SLOW_MERGE)
def test_pitfall_24_kto_from_an_sft_adapter(tmp_path, tokenizer, sft_adapter, mode):
    """Step 0: r = 0 and z₀ = 0, so each loss is weight × (1 − σ(0)) = w/2."""
    train, _ = generate_unpaired(seed=23, n_train=8, n_eval=0)
    cfg = KTOConfig(**_common(tmp_path, "kto", sft_adapter[1], mode), undesirable_weight=1.5,
                    per_device_train_batch_size=4)
    first = _train_rows(kto(cfg, tokenizer=tokenizer, dataset=train).output_dir)[0]
    n_good, n_bad = first["count/chosen"], first["count/rejected"]
    assert first["loss"] == pytest.approx((0.5 * n_good + 0.75 * n_bad) / (n_good + n_bad), abs=LN2_TOL)
    assert first["kl"] == 0.0 and first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0


@pytest.mark.parametrize("mode", MODES_SLOW_MERGE)
def test_pitfall_24_grpo_from_an_sft_adapter(tmp_path, tokenizer, sft_adapter, mode):
    """Two passes over the rollout (old log-probs computed, not copied): the first pass has ratio
    exactly 1 (no token clipped at ε = 1e-6) and KL to the reference exactly 0."""
    _, prompts = generate(seed=31, n_train=0, n_eval=4)
    cfg = GRPOConfig(**{**_common(tmp_path, "grpo", sft_adapter[1], mode), "max_steps": 2}, beta=0.1,
                     epsilon=1e-6, num_iterations=2, per_device_train_batch_size=8, num_generations=4,
                     max_completion_length=6)
    first = _rows(grpo(cfg, tokenizer=tokenizer, dataset=prompts, reward_funcs=[even_ids]).output_dir)[0]
    assert first["kl"] == 0.0
    assert first["clip_ratio/low"] == 0.0 and first["clip_ratio/high"] == 0.0


@pytest.mark.parametrize("mode", MODES_SLOW_MERGE)
def test_pitfall_24_rloo_from_an_sft_adapter(tmp_path, tokenizer, sft_adapter, mode):
    _, prompts = generate(seed=2, n_train=0, n_eval=4)
    cfg = RLOOConfig(**_common(tmp_path, "rloo", sft_adapter[1], mode), beta=0.5, per_device_train_batch_size=8,
                     num_generations=4, max_completion_length=6)
    first = _rows(rloo(cfg, tokenizer=tokenizer, dataset=prompts, reward_funcs=[even_ids]).output_dir)[0]
    assert first["kl"] == 0.0
    assert first["rlhf_reward"] == first["reward"]  # reward − β · 0
    assert first["clip_ratio/low"] == 0.0 and first["clip_ratio/high"] == 0.0


@pytest.mark.parametrize("mode", MODES_SLOW_MERGE)
def test_pitfall_24_ppo_from_an_sft_adapter(tmp_path, tokenizer, sft_adapter, mode):
    """continue: critic from a reward model; merge: no reward model, so the critic starts from the
    SFT adapter merged into its base (a CAUSAL_LM adapter dir, not a reward-model one)."""
    from posttrain.models.reward_model import reward_model_from_causal_lm

    scoring: dict = {"reward_funcs": []}
    if mode == "continue":
        rm = tmp_path / "rm"
        reward_model_from_causal_lm(make_tiny_llama(seed=7), tokenizer.pad_token_id).save_pretrained(rm)
        tokenizer.save_pretrained(rm)
        scoring = {"reward_model_path": str(rm)}
    _, prompts = generate(seed=17, n_train=0, n_eval=4)
    cfg = PPOConfig(**_common(tmp_path, "ppo", sft_adapter[1], mode), **scoring, kl_coef=0.5, kl_estimator="k3",
                    per_device_train_batch_size=4, max_completion_length=6, num_ppo_epochs=1)
    row = _rows(ppo(cfg, tokenizer=tokenizer, dataset=prompts,
                    reward_funcs=None if mode == "continue" else [even_ids]).output_dir)[0]
    assert row["objective/kl"] == 0.0 and row["objective/non_score_reward"] == 0.0
    assert row["val/ratio"] == 1.0 and row["policy/approxkl"] == 0.0 and row["policy/clipfrac"] == 0.0


@pytest.mark.parametrize("mode", MODES_SLOW_MERGE)
def test_pitfall_24_online_dpo_from_an_sft_adapter(tmp_path, tokenizer, sft_adapter, mode):
    _, prompts = generate(seed=41, n_train=0, n_eval=4)
    cfg = OnlineDPOConfig(**_common(tmp_path, "odpo", sft_adapter[1], mode), beta=0.1, per_device_train_batch_size=4,
                          max_completion_length=6)
    row = _rows(online_dpo(cfg, tokenizer=tokenizer, dataset=prompts, reward_funcs=[id_sum]).output_dir)[0]
    assert row["loss"] == pytest.approx(math.log(2), abs=LN2_TOL)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "objective/kl"):
        assert row[key] == 0.0, key


def test_pitfall_24_eval_kl_to_the_same_adapter_is_zero(tmp_path, tokenizer, sft_adapter):
    """eval --model ADAPTER --baseline ADAPTER: both load as base + adapter, so KL is exactly 0;
    against the bare base it is not."""
    _, rows = generate(seed=31, n_train=0, n_eval=4)
    held = [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]
    base_dir, adapter = sft_adapter
    same = evaluate(EvalConfig(output_dir=str(tmp_path / "same"), model_name_or_path=str(adapter),
                               baseline=str(adapter), dtype="float32", max_completion_length=6, num_samples=2,
                               seed=7), tokenizer=tokenizer, dataset=held)
    assert same.comparison["sampled/kl_k1"] == 0.0 and same.comparison["sampled/kl_k3"] == 0.0
    other = evaluate(EvalConfig(output_dir=str(tmp_path / "base"), model_name_or_path=str(adapter),
                                baseline=str(base_dir), dtype="float32", max_completion_length=6, num_samples=2,
                                seed=7), tokenizer=tokenizer, dataset=held)
    assert other.comparison["sampled/kl_k3"] > 0


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_pitfall_24_continue_saves_the_trained_adapter_only_and_chains_again(tmp_path, tokenizer, sft_adapter):
    """--use_peft with an adapter dir continues that adapter (its own r, not --lora_r; no LoRA inside
    a LoRA). The saved dir holds that one adapter (never the frozen reference), loads with plain
    peft onto the original base, and starts the next stage at the identity again."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter = sft_adapter
    train, _ = generate_preferences(seed=17, n_train=8, n_eval=0)
    first = dpo(DPOConfig(**{**_common(tmp_path, "dpo1", adapter, "continue"), "learning_rate": 1e-2},
                          per_device_train_batch_size=4), tokenizer=tokenizer, dataset=train)
    out = first.output_dir
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["base_model_name_or_path"] == str(base_dir)
    assert not (out / "reference").exists() and list(first.model.peft_config) == ["default", "reference"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out))
    ids = torch.tensor([[1, 520, 9531, 198, 22, 2]])
    assert torch.equal(_logits(reloaded, ids), _logits(first.model, ids))
    assert not torch.equal(_logits(reloaded, ids), _logits(PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)), ids))  # the DPO step moved it
    second = dpo(DPOConfig(**_common(tmp_path, "dpo2", out, "continue"), per_device_train_batch_size=4),
                 tokenizer=tokenizer, dataset=train)
    row = _train_rows(second.output_dir)[0]
    assert row["loss"] == pytest.approx(math.log(2), abs=LN2_TOL) and row["rewards/margins"] == 0.0


def test_pitfall_24_merge_saves_an_adapter_on_the_merged_start_that_loads_and_chains(tmp_path, tokenizer,
                                                                                     sft_adapter):
    """--adapter_start merge: the new adapter's config names the SFT adapter dir as its base, which
    posttrain loads as base + SFT adapter merged, so the saved stage reloads bit for bit and the next
    stage starts at the identity."""
    from posttrain.models.loading import load_causal_lm

    _, adapter = sft_adapter
    train, _ = generate_preferences(seed=17, n_train=8, n_eval=0)
    first = dpo(DPOConfig(**{**_common(tmp_path, "m1", adapter, "merge"), "learning_rate": 1e-2},
                          per_device_train_batch_size=4), tokenizer=tokenizer, dataset=train)
    out = first.output_dir
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["base_model_name_or_path"] == str(Path(adapter).resolve())
    assert list(first.model.peft_config) == ["default"]  # fresh LoRA: reference = adapter disabled
    ids = torch.tensor([[1, 520, 9531, 198, 22, 2]])
    assert torch.equal(_logits(load_causal_lm(str(out), dtype="float32"), ids), _logits(first.model, ids))
    second = dpo(DPOConfig(**_common(tmp_path, "m2", out, "merge"), per_device_train_batch_size=4),
                 tokenizer=tokenizer, dataset=train)
    row = _train_rows(second.output_dir)[0]
    assert row["loss"] == pytest.approx(math.log(2), abs=LN2_TOL) and row["rewards/margins"] == 0.0
