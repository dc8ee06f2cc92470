"""Online DPO on a tiny model: pair ranking, ln 2 at step 0, accumulation invariance, fresh sampler
weights, ties, the missing-EOS penalty, saved artefacts, config errors and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain import OnlineDPOConfig, online_dpo
from posttrain.config import ConfigError
from posttrain.demo.tasks import generate
from posttrain.recipes.online_dpo import rank_pairs
from tests.conftest import StopAfterCheckpoint, make_tiny_llama
from tests.numerics import (
    EXACT64_ABS,
    EXACT64_REL,
    FLOAT64,
    assert_exact64,
    assert_state_dicts_exact64,
    tiny_llama_fp64,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prompts():
    _, held = generate(seed=41, n_train=0, n_eval=8)
    return held


def id_sum(prompts, completions, completion_ids, **columns):
    """Distinct for almost any two different completions, so pairs practically never tie."""
    return [sum(ids) / 1000 for ids in completion_ids]


def constant(prompts, completions, **columns):
    return [1.0] * len(completions)


def _cfg(tmp_path, name, **kw) -> OnlineDPOConfig:
    base = {"output_dir": str(tmp_path / name), "max_steps": 1, "per_device_train_batch_size": 4,
            "max_completion_length": 6, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 0,
            "disable_tqdm": True, "seed": 3, "max_grad_norm": 0.0, "lr_scheduler_type": "constant"}
    base.update(kw)
    return OnlineDPOConfig(**base)


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_rank_pairs_by_hand():
    """Rows (0,1), (2,3), (4,5) are the pairs. Scores [1, 3 | 5, 2 | 4, 4]: pair 0 -> row 1 beats
    row 0; pair 1 -> row 2 beats row 3; pair 2 ties -> row 4 labelled chosen, marked tied."""
    chosen, rejected, tied = rank_pairs(torch.tensor([1.0, 3.0, 5.0, 2.0, 4.0, 4.0]))
    assert chosen.tolist() == [1, 2, 4]
    assert rejected.tolist() == [0, 3, 5]
    assert tied.tolist() == [False, False, True]
    with pytest.raises(ValueError, match=r"\(2P,\)"):
        rank_pairs(torch.zeros(3))


@pytest.mark.parametrize("loss_type, expected", [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_pitfall_10_first_step_policy_equals_reference(tmp_path, tokenizer, prompts, loss_type, expected):
    """At step 0 policy == reference: h = 0, so sigmoid loss = -log σ(0) = ln 2 and IPO loss =
    (0 - 1/(2·0.1))² = 25; every implicit reward, the KL and the non-score reward are 0."""
    result = online_dpo(_cfg(tmp_path, loss_type, loss_type=loss_type, beta=0.1), model=make_tiny_llama(),
                        tokenizer=tokenizer, dataset=prompts, reward_funcs=[id_sum])
    row = _rows(result.output_dir)[0]
    assert row["loss"] == pytest.approx(expected, rel=1e-6)
    assert row["objective/frac_tied_pairs"] == 0.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "objective/kl", "objective/non_score_reward"):
        assert row[key] == 0.0, key
    assert row["rewards/accuracies"] == 0.5  # equal implicit rewards count half
    assert row["objective/scores_margin"] > 0  # the higher-scored completion is the chosen one
    assert row["objective/entropy"] > 0 and row["logps/chosen"] < 0 and row["logps/rejected"] < 0
    assert row["objective/rlhf_reward"] == pytest.approx(row["objective/scores"])
    assert row["rewards/id_sum/mean"] == pytest.approx(row["objective/scores"])
    for key in ("val/contain_eos_token", "completions/mean_length", "beta", "grad_norm"):
        assert key in row


def test_pitfall_10_lora_reference_is_the_adapter_disabled_policy(tmp_path, tokenizer, prompts):
    """With --use_peft the reference is the policy with its adapter off (no copy): still ln 2 at
    step 0, and after a step the adapter has moved the policy away from it (KL != 0)."""
    result = online_dpo(_cfg(tmp_path, "lora", max_steps=2, use_peft=True, lora_r=4, learning_rate=1e-2),
                        model=make_tiny_llama(), tokenizer=tokenizer, dataset=prompts, reward_funcs=[id_sum])
    first, second = _rows(result.output_dir)
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6) and first["objective/kl"] == 0.0
    assert second["objective/kl"] != 0.0
    assert (result.output_dir / "adapter_model.safetensors").exists()


def test_pitfall_19_resume_is_bit_identical(tmp_path, tokenizer, prompts, monkeypatch):
    """4 steps straight == 2 steps + interrupt + resume + 2 steps: the samples of a step depend on
    the step number only, so the resumed run sees the same pairs and ends with the same weights."""
    import posttrain.engine.session as session

    kw = dict(max_steps=4, save_steps=2, max_grad_norm=1.0)
    straight = online_dpo(_cfg(tmp_path, "straight", **kw), model=make_tiny_llama(), tokenizer=tokenizer,
                          dataset=prompts, reward_funcs=[id_sum])
    out = tmp_path / "interrupted"
    monkeypatch.setattr(session, "GracefulStop", lambda: StopAfterCheckpoint(out / "checkpoints" / "step-000002"))
    first = online_dpo(_cfg(tmp_path, "interrupted", **kw), model=make_tiny_llama(), tokenizer=tokenizer,
                       dataset=prompts, reward_funcs=[id_sum])
    assert first.stopped_early
    monkeypatch.undo()
    resumed = online_dpo(_cfg(tmp_path, "interrupted", resume_from_checkpoint="latest", **kw),
                         model=make_tiny_llama(), tokenizer=tokenizer, dataset=prompts, reward_funcs=[id_sum])
    ws, wr = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    assert [r["loss"] for r in _rows(out)] == [r["loss"] for r in _rows(straight.output_dir)]


def test_online_dpo_accumulation_invariance(tmp_path, tokenizer, prompts):
    """A step's prompts are sampled at once and the loss is a mean over the step's pairs, so
    8 pairs per micro-batch == 4 x 2 accumulation (same samples, loss and gradients). Exact in real
    arithmetic, so checked in float64 (tolerances: tests/numerics.py)."""
    a = online_dpo(_cfg(tmp_path, "b8", max_steps=2, per_device_train_batch_size=8, **FLOAT64),
                   model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=prompts, reward_funcs=[id_sum])
    b = online_dpo(_cfg(tmp_path, "b4x2", max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                        **FLOAT64), model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=prompts,
                   reward_funcs=[id_sum])
    for x, y in zip(_rows(a.output_dir), _rows(b.output_dir), strict=True):
        assert x["objective/scores"] == y["objective/scores"]
        for key in ("loss", "grad_norm"):
            assert_exact64(x[key], y[key], key)
        assert_exact64(x["rewards/margins"], y["rewards/margins"], "rewards/margins", abs_tol=EXACT64_ABS)
    assert _rows(a.output_dir)[1]["rewards/margins"] != 0.0  # step 2 trains a changed policy
    assert_state_dicts_exact64(a.model.state_dict(), b.model.state_dict())


def test_pitfall_15_sampler_uses_the_weights_after_each_step(tmp_path, tokenizer, prompts, monkeypatch):
    """The completions of step 2 are sampled from the weights after step 1: their sampler
    log-probs equal the trainer's log-probs under a 1-step model (and differ from the start's)."""
    import posttrain.rollout.generation as generation
    from posttrain.models.logprobs import LogProbModel

    rollouts = []
    real_make_backend = generation.make_backend

    def recording_backend(*args, **kwargs):
        backend = real_make_backend(*args, **kwargs)
        real_generate = backend.generate
        backend.generate = lambda *a, **k: rollouts.append(real_generate(*a, **k)) or rollouts[-1]
        return backend

    monkeypatch.setattr(generation, "make_backend", recording_backend)
    online_dpo(_cfg(tmp_path, "two", max_steps=2, temperature=1.0, **FLOAT64), model=tiny_llama_fp64(), tokenizer=tokenizer,
               dataset=prompts, reward_funcs=[id_sum])
    second = rollouts[1]
    one_step = online_dpo(_cfg(tmp_path, "one", max_steps=1, temperature=1.0, **FLOAT64), model=tiny_llama_fp64(),
                          tokenizer=tokenizer, dataset=prompts, reward_funcs=[id_sum]).model

    def trainer_logps(model, p, c):
        with torch.no_grad():
            return LogProbModel(model.eval())(torch.tensor([p + c]))["logps"][0, len(p) - 1:]

    fresh = tiny_llama_fp64()
    for p, c, sampled in zip(second.prompt_ids, second.completion_ids, second.sampler_logps):
        # the same weights: equal in real arithmetic, so float64 (tests/numerics.py)
        torch.testing.assert_close(torch.tensor(sampled, dtype=torch.float64), trainer_logps(one_step, p, c),
                                   rtol=EXACT64_REL, atol=EXACT64_ABS)
    drift = max((torch.tensor(s, dtype=torch.float64) - trainer_logps(fresh, p, c)).abs().max().item()
                for p, c, s in zip(second.prompt_ids, second.completion_ids, second.sampler_logps))
    assert drift > 1e-3


def test_tied_pairs_give_no_signal(tmp_path, tokenizer, prompts):
    """A constant reward ties every pair: nothing is trained (loss and gradient exactly 0)."""
    result = online_dpo(_cfg(tmp_path, "ties"), model=make_tiny_llama(), tokenizer=tokenizer, dataset=prompts,
                        reward_funcs=[constant])
    row = _rows(result.output_dir)[0]
    assert row["objective/frac_tied_pairs"] == 1.0 and row["objective/scores_margin"] == 0.0
    assert row["loss"] == 0.0 and row["grad_norm"] == 0.0


def test_missing_eos_penalty_lowers_truncated_scores(tmp_path, tokenizer, prompts):
    """Every completion is cut at 2 tokens (a random model never says EOS that soon): with the
    penalty each score drops by exactly 3."""
    plain = online_dpo(_cfg(tmp_path, "plain", max_completion_length=2), model=make_tiny_llama(),
                       tokenizer=tokenizer, dataset=prompts, reward_funcs=[id_sum])
    penalised = online_dpo(_cfg(tmp_path, "pen", max_completion_length=2, missing_eos_penalty=3.0),
                           model=make_tiny_llama(), tokenizer=tokenizer, dataset=prompts, reward_funcs=[id_sum])
    a, b = _rows(plain.output_dir)[0], _rows(penalised.output_dir)[0]
    assert a["val/contain_eos_token"] == 0.0
    assert b["objective/scores"] == pytest.approx(a["objective/scores"] - 3.0, abs=1e-5)
    assert b["objective/scores_margin"] == pytest.approx(a["objective/scores_margin"], abs=1e-5)
    assert b["rewards/id_sum/mean"] == pytest.approx(a["rewards/id_sum/mean"])  # functions are unpenalised


def test_pitfall_20_saved_model_loads_and_matches(tmp_path, tokenizer, prompts):
    from transformers import AutoModelForCausalLM

    result = online_dpo(_cfg(tmp_path, "saved", max_steps=2), model=make_tiny_llama(), tokenizer=tokenizer,
                        dataset=prompts, reward_funcs=[id_sum])
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    ids = torch.tensor([tokenizer.encode("What is 2 + 3?")])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model.eval()(ids).logits, atol=1e-5)
    assert not torch.allclose(make_tiny_llama()(ids).logits, loaded(ids).logits, atol=1e-5)  # it trained


@pytest.mark.parametrize("override, message", [
    ({"num_generations": 4}, "exactly 2"),
    ({"loss_type": "hinge"}, "sigmoid, ipo"),
    ({"beta": 0.0}, "beta"),
    ({"temperature": 0.0}, "greedy"),
    ({"precompute_ref_log_probs": True}, "in advance"),
])
def test_config_errors_name_the_field(tmp_path, tokenizer, prompts, override, message):
    with pytest.raises(ConfigError, match=message):
        online_dpo(_cfg(tmp_path, "bad", **override), model=make_tiny_llama(), tokenizer=tokenizer,
                   dataset=prompts, reward_funcs=[id_sum])


def test_online_dpo_cli_with_config_and_module_reward(tmp_path, tiny_model_dir, prompts):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (tmp_path / "myrewards.py").write_text(
        "def brevity(prompts, completions, **kw):\n    return [-len(c[0]['content']) for c in completions]\n")
    cfg = tmp_path / "online_dpo.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\noutput_dir: {tmp_path / 'out'}\n"
                   "max_steps: 2\nper_device_train_batch_size: 2\nmax_new_tokens: 6\nloss_type: ipo\n"
                   "reward_funcs: [myrewards:brevity]\nmissing_eos_penalty: 1.0\ndisable_tqdm: true\n"
                   "logging_steps: 1\n")
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "online-dpo", "--config", cfg, "--beta", "0.2"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{tmp_path}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "out")
    assert len(rows) == 2 and "rewards/brevity/mean" in rows[0] and rows[0]["beta"] == 0.2
    assert "2 prompts x 2 completions" in proc.stdout
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "config.yaml").exists()


def test_online_dpo_cli_bad_flag_is_one_line(tmp_path, tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "online-dpo", "--model_name_or_path",
                           str(tiny_model_dir), "--loss_type", "hinge"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: loss_type")
