"""The DPO recipe on a tiny model: reference modes (pitfall 10), every loss type, invariances, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import DPOConfig, dpo
from posttrain.demo.tasks import generate_preferences
from posttrain.losses.preference import PREFERENCE_LOSSES, REFERENCE_FREE_LOSSES
from tests.conftest import make_tiny_llama
from tests.numerics import EXACT64_ABS, FLOAT64, assert_exact64, tiny_llama_fp64

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pairs():
    return generate_preferences(seed=17, n_train=16, n_eval=8)


def _cfg(tmp_path, name, **kw) -> DPOConfig:
    base = {"output_dir": str(tmp_path / name), "max_steps": 1, "per_device_train_batch_size": 4,
            "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 0, "disable_tqdm": True, "seed": 3,
            "max_grad_norm": 0.0}
    base.update(kw)
    return DPOConfig(**base)


def _metrics(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _train_rows(out) -> list[dict]:
    return [m for m in _metrics(out) if "loss" in m]


@pytest.mark.parametrize("mode", ["separate", "adapter_disabled", "cached"])
def test_pitfall_10_step0_policy_equals_reference(tmp_path, tokenizer, pairs, mode, monkeypatch):
    """At step 0 the policy equals the reference in every mode: sigmoid loss == ln 2, rewards == 0."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    kw = {"use_peft": True, "lora_r": 4} if mode == "adapter_disabled" else {}
    if mode == "cached":
        kw["precompute_ref_log_probs"] = True
    train, held = pairs
    result = dpo(_cfg(tmp_path, mode, **kw), model=make_tiny_llama(), tokenizer=tokenizer, dataset=train,
                 eval_dataset=held)
    first = _train_rows(result.output_dir)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    baseline = _metrics(result.output_dir)[0]
    assert baseline["step"] == 0 and baseline["eval/rewards/accuracies"] == 0.5  # chance before training
    if mode == "cached":
        assert list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))


def test_cached_reference_is_reused_across_runs(tmp_path, tokenizer, pairs, monkeypatch, capsys):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    train, _ = pairs
    dpo(_cfg(tmp_path, "a", precompute_ref_log_probs=True), model=make_tiny_llama(), tokenizer=tokenizer, dataset=train)
    assert "computed for 16 pairs and cached" in capsys.readouterr().out
    b = dpo(_cfg(tmp_path, "b", precompute_ref_log_probs=True), model=make_tiny_llama(), tokenizer=tokenizer,
            dataset=train)
    assert "loaded from cache" in capsys.readouterr().out
    assert _train_rows(b.output_dir)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # different reference weights → a different cache entry, never a stale hit
    dpo(_cfg(tmp_path, "c", precompute_ref_log_probs=True), model=make_tiny_llama(seed=5), tokenizer=tokenizer,
        dataset=train)
    assert "computed for 16 pairs and cached" in capsys.readouterr().out


@pytest.mark.parametrize("loss_type", sorted(PREFERENCE_LOSSES))
def test_every_loss_type_trains_a_step(tmp_path, tokenizer, pairs, loss_type, capsys):
    train, _ = pairs
    kw = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    result = dpo(_cfg(tmp_path, loss_type, loss_type=[loss_type], max_steps=2, **kw), model=make_tiny_llama(),
                 tokenizer=tokenizer, dataset=train)
    rows = _train_rows(result.output_dir)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert ("reference: none" in capsys.readouterr().out) == (loss_type in REFERENCE_FREE_LOSSES)


def test_combined_losses_log_each_type(tmp_path, tokenizer, pairs):
    train, _ = pairs
    result = dpo(_cfg(tmp_path, "mix", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
                 model=make_tiny_llama(), tokenizer=tokenizer, dataset=train)
    row = _train_rows(result.output_dir)[0]
    assert row["loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-6)
    assert row["loss"] == pytest.approx(row["loss/sigmoid"] + 0.5 * row["loss/sft"], rel=1e-5)


def test_training_raises_chosen_over_rejected(tmp_path, tokenizer, pairs):
    """Direction: a few steps make held-out implicit rewards prefer chosen (margins > 0)."""
    train, held = pairs
    result = dpo(_cfg(tmp_path, "dir", max_steps=6, learning_rate=2e-3), model=make_tiny_llama(),
                 tokenizer=tokenizer, dataset=train, eval_dataset=held)
    assert result.eval_metrics["eval/rewards/margins"] > 0
    assert result.eval_metrics["eval/rewards/chosen"] > result.eval_metrics["eval/rewards/rejected"]


def test_padding_free_equals_padded(tmp_path, tokenizer, pairs):
    train, _ = pairs
    a = dpo(_cfg(tmp_path, "padded", max_steps=2, **FLOAT64), model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=train)
    b = dpo(_cfg(tmp_path, "free", max_steps=2, padding_free=True, **FLOAT64), model=tiny_llama_fp64(), tokenizer=tokenizer,
            dataset=train)
    for x, y in zip(_train_rows(a.output_dir), _train_rows(b.output_dir), strict=True):
        assert_exact64(x["loss"], y["loss"], "loss")  # float64: tolerances in tests/numerics.py
        assert_exact64(x["grad_norm"], y["grad_norm"], "grad_norm")
        assert_exact64(x["rewards/margins"], y["rewards/margins"], "rewards/margins", abs_tol=EXACT64_ABS)


def test_accumulation_invariance(tmp_path, tokenizer, pairs):
    train, _ = pairs
    a = dpo(_cfg(tmp_path, "b8", max_steps=2, per_device_train_batch_size=8, **FLOAT64), model=tiny_llama_fp64(),
            tokenizer=tokenizer, dataset=train)
    b = dpo(_cfg(tmp_path, "b4x2", max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, **FLOAT64),
            model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=train)
    for x, y in zip(_train_rows(a.output_dir), _train_rows(b.output_dir), strict=True):
        assert_exact64(x["loss"], y["loss"], "loss")  # float64: tolerances in tests/numerics.py
        assert_exact64(x["grad_norm"], y["grad_norm"], "grad_norm")
        assert_exact64(x["rewards/margins"], y["rewards/margins"], "rewards/margins", abs_tol=EXACT64_ABS)


def test_dpo_cli_from_jsonl_and_config(tmp_path, tiny_model_dir, pairs):
    train, held = pairs
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train + held))
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\noutput_dir: {tmp_path / 'out'}\n"
                   "max_steps: 2\nlearning_rate: 1e-3\nper_device_train_batch_size: 4\nlogging_steps: 1\n"
                   "loss_type: [ipo]\nbeta: 0.2\neval_split_ratio: 0.25\ndisable_tqdm: true\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "dpo", "--config", cfg, "--max_steps", "3"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert len(_train_rows(out)) == 3
    assert "eval/rewards/accuracies" in json.loads((out / "eval_results.json").read_text())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    bad = subprocess.run([sys.executable, "-m", "posttrain.cli", "dpo", "--config", cfg, "--loss_typ", "ipo"],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert bad.returncode == 2 and "did you mean --loss_type" in bad.stderr


def test_unknown_loss_type_is_refused_before_work(tmp_path, tokenizer, pairs):
    with pytest.raises(ValueError, match="sigmiod"):
        dpo(_cfg(tmp_path, "bad", loss_type=["sigmiod"]), model=make_tiny_llama(), tokenizer=tokenizer,
            dataset=pairs[0])
