"""The GRPO recipe on a tiny model: first-step identities, invariance, reward errors, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain import GRPOConfig, grpo
from posttrain.demo.tasks import generate
from posttrain.errors import PosttrainError
from tests.conftest import StopAfterCheckpoint, make_tiny_llama
from tests.numerics import EXACT64_ABS, FLOAT64, assert_exact64, tiny_llama_fp64

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prompts():
    _, held = generate(seed=31, n_train=0, n_eval=8)
    return held


def shorter_is_better(prompts, completions, **columns):
    return [-len(c[0]["content"]) / 10 for c in completions]


def _cfg(tmp_path, name, **kw) -> GRPOConfig:
    base = {"output_dir": str(tmp_path / name), "max_steps": 1, "per_device_train_batch_size": 8,
            "num_generations": 4, "max_completion_length": 8, "learning_rate": 1e-3, "logging_steps": 1,
            "save_steps": 0, "disable_tqdm": True, "seed": 3, "max_grad_norm": 0.0}
    base.update(kw)
    return GRPOConfig(**base)


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_pitfall_13_first_step_ratio_is_one_and_kl_zero(tmp_path, tokenizer, prompts):
    """One pass over a fresh rollout: the importance ratio is exactly 1 (no token clipped on either
    side) and the KL to the reference (a copy of the starting policy) is exactly 0."""
    result = grpo(_cfg(tmp_path, "first", beta=0.1, epsilon=1e-6), model=make_tiny_llama(), tokenizer=tokenizer,
                  dataset=prompts, reward_funcs=[shorter_is_better])
    row = _rows(result.output_dir)[0]
    assert row["kl"] == 0.0
    assert row["clip_ratio/low"] == 0.0 and row["clip_ratio/high"] == 0.0
    assert row["entropy"] > 0
    for key in ("reward", "reward_std", "rewards/shorter_is_better/mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio"):
        assert key in row


def test_grpo_accumulation_invariance(tmp_path, tokenizer, prompts):
    """The whole step's completions are sampled at once, and dapo's normaliser is global, so
    8 completions per micro-batch == 4 x 2 accumulation."""
    a = grpo(_cfg(tmp_path, "b8", max_steps=2, **FLOAT64), model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=prompts,
             reward_funcs=[shorter_is_better])
    b = grpo(_cfg(tmp_path, "b4x2", max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, **FLOAT64),
             model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=prompts, reward_funcs=[shorter_is_better])
    for x, y in zip(_rows(a.output_dir), _rows(b.output_dir), strict=True):
        assert x["reward"] == y["reward"]
        # float64 (tests/numerics.py); the first-pass loss is -mean(A) = 0 up to rounding: absolute bound
        assert_exact64(x["loss"], y["loss"], "loss", abs_tol=EXACT64_ABS)
        assert_exact64(x["grad_norm"], y["grad_norm"], "grad_norm")


def test_pitfall_19_resume_between_iterations_is_bit_identical(tmp_path, tokenizer, prompts, monkeypatch):
    """--num_iterations 2: stopped after step 1 (the rollout's first pass), resumed, the second pass
    reuses the SAME rollout from the checkpoint (not a fresh one sampled by the updated weights):
    3 steps straight == 1 + interrupt + resume + 2, weights and logged rows bit for bit."""
    import posttrain.engine.session as session

    kw = dict(max_steps=3, save_steps=1, num_iterations=2, beta=0.1)
    straight = grpo(_cfg(tmp_path, "straight", **kw), model=make_tiny_llama(), tokenizer=tokenizer,
                    dataset=prompts, reward_funcs=[shorter_is_better])
    out = tmp_path / "interrupted"
    monkeypatch.setattr(session, "GracefulStop", lambda: StopAfterCheckpoint(out / "checkpoints" / "step-000001"))
    first = grpo(_cfg(tmp_path, "interrupted", **kw), model=make_tiny_llama(), tokenizer=tokenizer,
                 dataset=prompts, reward_funcs=[shorter_is_better])
    assert first.stopped_early and (out / "checkpoints" / "step-000001" / "extra_tensors_0.pt").exists()
    monkeypatch.undo()
    resumed = grpo(_cfg(tmp_path, "interrupted", resume_from_checkpoint="latest", **kw), model=make_tiny_llama(),
                   tokenizer=tokenizer, dataset=prompts, reward_funcs=[shorter_is_better])
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    drop = ("elapsed_seconds", "tokens_per_second")
    rows = [{k: v for k, v in r.items() if k not in drop} for r in _rows(out)]
    assert rows == [{k: v for k, v in r.items() if k not in drop} for r in _rows(straight.output_dir)]


def test_pitfall_16_masked_truncated_completions_leave_the_loss(tmp_path, tokenizer, prompts):
    """Every completion is cut at 2 tokens; masked, none of them may produce a gradient."""
    result = grpo(_cfg(tmp_path, "trunc", max_completion_length=2, mask_truncated_completions=True),
                  model=make_tiny_llama(), tokenizer=tokenizer, dataset=prompts, reward_funcs=[shorter_is_better])
    row = _rows(result.output_dir)[0]
    assert row["completions/clipped_ratio"] == 1.0  # a random 49k-vocabulary model never says EOS this soon
    assert row["grad_norm"] == 0.0 and row["loss"] == 0.0


def test_reward_function_error_names_function_and_sample(tmp_path, tokenizer, prompts):
    def broken(prompts, completions, **columns):
        return [float("nan")] * len(completions)

    with pytest.raises(PosttrainError, match="broken"):
        grpo(_cfg(tmp_path, "bad"), model=make_tiny_llama(), tokenizer=tokenizer, dataset=prompts,
             reward_funcs=[broken])


def test_batch_must_hold_whole_groups(tmp_path, tokenizer, prompts):
    with pytest.raises(ValueError, match="multiple of --num_generations"):
        grpo(_cfg(tmp_path, "groups", per_device_train_batch_size=6, num_generations=4), model=make_tiny_llama(),
             tokenizer=tokenizer, dataset=prompts, reward_funcs=[shorter_is_better])


def test_grpo_cli_with_module_reward(tmp_path, tiny_model_dir, prompts):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (tmp_path / "myrewards.py").write_text(
        "def brevity(prompts, completions, **kw):\n    return [-len(c[0]['content']) for c in completions]\n")
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\noutput_dir: {tmp_path / 'out'}\n"
                   "max_steps: 2\nper_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 6\n"
                   "reward_funcs: [myrewards:brevity, format]\nreward_weights: [1.0, 2.0]\ndisable_tqdm: true\n"
                   "logging_steps: 1\n")
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "grpo", "--config", cfg],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{tmp_path}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "out")
    assert len(rows) == 2 and "rewards/brevity/mean" in rows[0] and "rewards/format/mean" in rows[0]
    assert "prompts x 4 generations" in proc.stdout


def test_pitfall_26_k1_as_a_loss_term_is_refused(tmp_path, tokenizer, prompts):
    """k1's expected gradient is 0 (tests/losses/test_rl_kl.py): as a loss term the KL penalty
    would silently do nothing, so the config is refused before any model work."""
    from posttrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"k1.*loss term.*zero.*--kl_in reward"):
        grpo(_cfg(tmp_path, "k1", beta=0.1, kl_estimator="k1"), model=make_tiny_llama(), tokenizer=tokenizer,
             dataset=prompts, reward_funcs=[shorter_is_better])
    with pytest.raises(ConfigError, match="kl_in"):
        grpo(_cfg(tmp_path, "where", beta=0.1, kl_in="advantage"), model=make_tiny_llama(), tokenizer=tokenizer,
             dataset=prompts, reward_funcs=[shorter_is_better])


def test_pitfall_26_k1_in_the_reward_and_missing_eos_penalty(tmp_path, tokenizer, prompts):
    """--kl_in reward with k1 runs (the KL's value shapes the reward; policy == reference at step 0
    so kl == 0). Every completion is cut at 2 tokens (a random model never says EOS that soon), so
    with --missing_eos_penalty 1 and a reward of 0 each reward is 0 - 1 - beta*0 = -1 exactly."""

    def zero(prompts, completions, **columns):
        return [0.0] * len(completions)

    result = grpo(_cfg(tmp_path, "kin", beta=0.1, kl_estimator="k1", kl_in="reward", max_completion_length=2,
                       missing_eos_penalty=1.0), model=make_tiny_llama(), tokenizer=tokenizer, dataset=prompts,
                  reward_funcs=[zero])
    row = _rows(result.output_dir)[0]
    assert row["completions/clipped_ratio"] == 1.0
    assert row["kl"] == 0.0 and row["rlhf_reward"] == -1.0 and row["reward"] == 0.0


def test_pitfall_31_rewardless_completions_get_no_advantage(tmp_path, tokenizer, prompts):
    """The first completion of every group gets None (no reward), the others 1.0. Left out of the
    baseline, each group is [1, 1, 1]: every advantage is 0, so with one pass (ratio 1) and no KL
    the gradient is exactly 0. Today's code scored None as 0: groups [0, 1, 1, 1], nonzero
    advantages, a nonzero gradient."""

    def first_not_applicable(prompts, completions, **columns):
        return [None if i % 4 == 0 else 1.0 for i in range(len(completions))]

    with pytest.warns(UserWarning, match="None from every reward function"):
        result = grpo(_cfg(tmp_path, "none"), model=make_tiny_llama(), tokenizer=tokenizer, dataset=prompts,
                      reward_funcs=[first_not_applicable])
    row = _rows(result.output_dir)[0]
    assert row["grad_norm"] == 0.0 and row["reward"] == 1.0  # the mean over the samples with a reward
