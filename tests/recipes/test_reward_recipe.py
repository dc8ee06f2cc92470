"""The reward recipe end to end on a tiny model: artefacts, CLI, invariances, margin, centring, LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from posttrain.config import RewardConfig
from posttrain.data.formats import detect_format
from posttrain.data.in_memory import as_loaded_rows
from posttrain.data.preference import prepare_preference_examples
from posttrain.data.preference_collate import collate_preference
from posttrain.demo.tasks import generate_preferences
from posttrain.models.reward_model import RewardModelReward, RewardScorer
from posttrain.recipes.reward import reward
from tests.conftest import make_tiny_llama
from tests.numerics import EXACT64_ABS, FLOAT64, assert_exact64, assert_state_dicts_exact64, tiny_llama_fp64

REPO = Path(__file__).resolve().parents[2]
STEP_METRICS = ("loss", "grad_norm", "learning_rate", "accuracy", "margin", "rewards/chosen_mean",
                "rewards/chosen_std", "rewards/rejected_mean", "rewards/rejected_std", "num_tokens")


@pytest.fixture(scope="module")
def pairs():
    train, held_out = generate_preferences(seed=3, n_train=16, n_eval=8)
    return train, held_out


def _config(tmp_path: Path, name: str, **kw) -> RewardConfig:
    base = dict(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, save_steps=0, max_length=128, disable_tqdm=True, seed=3, max_grad_norm=0.0)
    base.update(kw)
    return RewardConfig(**base)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _all_pairs_scores(model, rows, tokenizer):
    """(chosen, rejected) scores of every pair, one padded forward (no grad)."""
    loaded = as_loaded_rows(rows, None)
    examples, _ = prepare_preference_examples(loaded, detect_format(loaded.rows, loaded.source), tokenizer,
                                              max_length=128, max_prompt_length=512)
    batch = collate_preference(examples, pad_token_id=tokenizer.pad_token_id, padding_free=False)
    with torch.no_grad():
        s = RewardScorer(model).eval()(batch["input_ids"], attention_mask=batch["attention_mask"])
    return s[: len(examples)], s[len(examples):]


def test_reward_writes_metrics_eval_results_and_a_reloadable_model(tmp_path, tokenizer, pairs):
    train, held_out = pairs
    result = reward(_config(tmp_path, "run", max_steps=4, eval_steps=2), model=make_tiny_llama(),
                    tokenizer=tokenizer, dataset=train, eval_dataset=held_out)
    out = result.output_dir
    rows = _metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in STEP_METRICS:
        assert all(key in r for r in train_rows), key
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["rewards/chosen_std"] >= 0 for r in train_rows)
    assert [r["step"] for r in eval_rows] == [2, 4]  # every eval_steps, the last one not repeated
    for key in ("eval/loss", "eval/accuracy", "eval/margin", "eval/rewards/chosen_mean", "eval/rewards/rejected_std"):
        assert key in eval_rows[-1], key
    assert eval_rows[-1]["eval/num_pairs"] == len(held_out)
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["eval/accuracy"] == eval_rows[-1]["eval/accuracy"]
    assert result.eval_metrics["eval/margin"] == pytest.approx(saved["eval/margin"])
    # the held-out figures are those of the final model
    c, r = _all_pairs_scores(result.model, held_out, tokenizer)
    assert saved["eval/margin"] == pytest.approx((c - r).mean().item(), abs=1e-5)
    assert json.loads((out / "run_summary.json").read_text())["eval"]["eval/accuracy"] == saved["eval/accuracy"]

    # pitfall 20: the saved model reloads with transformers and gives the live scores
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.num_labels == 1 and reloaded.config.pad_token_id == tokenizer.pad_token_id
    live = _all_pairs_scores(result.model, train, tokenizer)
    again = _all_pairs_scores(reloaded, train, tokenizer)
    torch.testing.assert_close(again, live, atol=1e-5, rtol=0)
    assert not torch.allclose(live[0], _all_pairs_scores(make_tiny_llama_rm(tokenizer), train, tokenizer)[0])


def make_tiny_llama_rm(tokenizer):
    from posttrain.models.reward_model import reward_model_from_causal_lm

    return reward_model_from_causal_lm(make_tiny_llama(seed=5), pad_token_id=tokenizer.pad_token_id)


def test_reward_held_out_split_is_seeded(tmp_path, tokenizer, pairs):
    train, _ = pairs
    a = reward(_config(tmp_path, "a", max_steps=1, eval_split_ratio=0.25), model=make_tiny_llama(),
               tokenizer=tokenizer, dataset=train)
    b = reward(_config(tmp_path, "b", max_steps=1, eval_split_ratio=0.25), model=make_tiny_llama(),
               tokenizer=tokenizer, dataset=train)
    assert a.eval_metrics["eval/num_pairs"] == 4
    assert a.eval_metrics == b.eval_metrics


def _run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "reward", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_reward_cli_from_flags_and_from_config(tmp_path, tiny_model_dir, pairs):
    train, held_out = pairs
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train + held_out))
    out = tmp_path / "flags"
    text = _run_cli("--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--output_dir", out,
                    "--max_steps", 3, "--per_device_train_batch_size", 4, "--learning_rate", 1e-3,
                    "--logging_steps", 1, "--eval_split_ratio", 0.25, "--disable_tqdm")
    assert "format preference" in text and "batch plan:" in text and "held out 6 of 24 pairs" in text
    rows = _metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and "eval/accuracy" in rows[-1]
    assert all(k in rows[0] for k in STEP_METRICS)
    assert (out / "eval_results.json").exists()
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1

    cfg = tmp_path / "run.yaml"
    cfg_out = tmp_path / "cfg"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\noutput_dir: {cfg_out}\n"
                   "max_steps: 2\nlearning_rate: 1e-3\nper_device_train_batch_size: 4\nlogging_steps: 1\n"
                   "center_rewards_coefficient: 0.01\ndisable_tqdm: true\n")
    _run_cli("--config", cfg)
    assert [r["step"] for r in _metrics(cfg_out)] == [1, 2]
    assert "center_rewards_coefficient: 0.01" in (cfg_out / "config.yaml").read_text()


def test_reward_rejects_non_preference_data_before_loading_a_model(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 4
    with pytest.raises(ValueError, match="preference pairs"):
        reward(_config(tmp_path, "bad"), model=object(), tokenizer=tokenizer, dataset=rows)


def test_pitfall_08_reward_accumulation_invariance(tmp_path, tokenizer, pairs):
    """One optimizer step of 8 pairs equals 4 pairs x 2 accumulation: same loss, grad norm, weights."""
    train, _ = pairs
    a = reward(_config(tmp_path, "b8", max_steps=1, per_device_train_batch_size=8, **FLOAT64), model=tiny_llama_fp64(),
               tokenizer=tokenizer, dataset=train)
    b = reward(_config(tmp_path, "b4x2", max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2, **FLOAT64),
               model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=train)
    ma, mb = _metrics(a.output_dir)[0], _metrics(b.output_dir)[0]
    # float64: tolerances in tests/numerics.py
    for key in ("loss", "grad_norm", "accuracy", "margin", "rewards/chosen_std", "num_tokens"):
        assert_exact64(ma[key], mb[key], key, abs_tol=EXACT64_ABS)
    assert_state_dicts_exact64(a.model.state_dict(), b.model.state_dict())


def test_reward_padding_free_equals_padded(tmp_path, tokenizer, pairs):
    train, _ = pairs
    a = reward(_config(tmp_path, "pad", max_steps=1, per_device_train_batch_size=16, **FLOAT64), model=tiny_llama_fp64(),
               tokenizer=tokenizer, dataset=train)
    b = reward(_config(tmp_path, "free", max_steps=1, per_device_train_batch_size=16, padding_free=True, **FLOAT64),
               model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=train)
    ma, mb = _metrics(a.output_dir)[0], _metrics(b.output_dir)[0]
    assert_exact64(ma["loss"], mb["loss"], "loss")  # float64: tolerances in tests/numerics.py
    assert_exact64(ma["grad_norm"], mb["grad_norm"], "grad_norm")
    assert ma["num_tokens"] == mb["num_tokens"]  # no padding counted on either side


def _one_step_at_init(tmp_path, tokenizer, rows, name, **kw):
    """Step 1 over ALL pairs with learning rate 0: the logged loss is the initial model's, and the
    returned model IS the initial model (so the expected loss can be recomputed from it)."""
    result = reward(_config(tmp_path, name, max_steps=1, per_device_train_batch_size=len(rows), learning_rate=0.0,
                            **kw), model=make_tiny_llama(), tokenizer=tokenizer, dataset=rows)
    return _metrics(result.output_dir)[0], _all_pairs_scores(result.model, rows, tokenizer)


def test_reward_margin_column_is_used(tmp_path, tokenizer, pairs):
    """loss = mean(-log sigmoid(r_c - r_r - m)) with the rows' margins."""
    train, _ = pairs
    with_margin = [{**r, "margin": 0.5 + (i % 3)} for i, r in enumerate(train)]
    plain, _ = _one_step_at_init(tmp_path, tokenizer, train, "plain")
    logged, (c, r) = _one_step_at_init(tmp_path, tokenizer, with_margin, "margin")
    m = torch.tensor([row["margin"] for row in with_margin])
    assert logged["loss"] == pytest.approx(-F.logsigmoid(c - r - m).mean().item(), rel=1e-5)
    assert plain["loss"] == pytest.approx(-F.logsigmoid(c - r).mean().item(), rel=1e-5)
    assert logged["loss"] > plain["loss"] + 0.3


def test_reward_center_rewards_coefficient_adds_eta_times_squared_sum(tmp_path, tokenizer, pairs):
    """loss(eta) = mean(-log sigmoid(r_c - r_r)) + eta * mean((r_c + r_r)^2)."""
    train, _ = pairs
    plain, (c, r) = _one_step_at_init(tmp_path, tokenizer, train, "plain")
    eta = 0.5
    centred, _ = _one_step_at_init(tmp_path, tokenizer, train, "centred", center_rewards_coefficient=eta)
    penalty = eta * ((c + r) ** 2).mean().item()
    assert penalty > 1e-3
    assert centred["loss"] - plain["loss"] == pytest.approx(penalty, rel=1e-4)


def test_reward_model_reward_prefers_chosen_after_training(tmp_path, tokenizer):
    train, held_out = generate_preferences(seed=21, n_train=128, n_eval=16)
    result = reward(_config(tmp_path, "trained", max_steps=24, per_device_train_batch_size=8, learning_rate=3e-3,
                            max_grad_norm=1.0, logging_steps=8), model=make_tiny_llama(), tokenizer=tokenizer,
                    dataset=train)
    rm = RewardModelReward(str(result.output_dir), device="cpu")
    prompts = [r["prompt"] for r in held_out]
    chosen = rm(prompts, [r["chosen"] for r in held_out])
    rejected = rm(prompts, [r["rejected"] for r in held_out])
    wins = sum(c > r for c, r in zip(chosen, rejected))
    assert wins >= 13, (chosen, rejected)  # >= 80 % of held-out pairs
    # the reward function gives what the trained model gives in training's own forward
    live_c, _ = _all_pairs_scores(result.model, held_out, tokenizer)
    assert chosen == pytest.approx(live_c.tolist(), abs=1e-5)


def test_reward_lora_saves_an_adapter_that_reloads(tmp_path, tokenizer, tiny_model_dir, pairs):
    """use_peft: task SEQ_CLS; the adapter (with the trained score head) reloads with the live scores,
    through posttrain's loader, RewardModelReward and transformers' AutoModelForSequenceClassification."""
    from posttrain.models.reward_model import load_reward_model

    train, _ = pairs
    result = reward(_config(tmp_path, "lora", max_steps=2, use_peft=True, lora_r=4, lora_alpha=8,
                            model_name_or_path=str(tiny_model_dir)), tokenizer=tokenizer, dataset=train)
    out = result.output_dir
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["task_type"] == "SEQ_CLS" and not (out / "config.json").exists()
    live = _all_pairs_scores(result.model, train, tokenizer)
    for reloaded in (load_reward_model(str(out), is_trainable=False),
                     # the base config is a causal LM's: num_labels=1 must be said (documented)
                     AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)):
        torch.testing.assert_close(_all_pairs_scores(reloaded, train, tokenizer), live, atol=1e-5, rtol=0)
    rm = RewardModelReward(str(out), device="cpu")
    got = rm([r["prompt"] for r in train], [r["chosen"] for r in train])
    assert got == pytest.approx(live[0].tolist(), abs=1e-5)
