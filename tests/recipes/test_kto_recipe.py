"""The KTO recipe on a tiny model: step-0 identities in every reference mode, unequal classes,
invariance to how a step is split, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import KTOConfig, kto
from posttrain.demo.tasks import generate_unpaired
from posttrain.recipes.kto import derangement, mismatched_pairs
from tests.conftest import make_tiny_llama
from tests.numerics import EXACT64_ABS, FLOAT64, assert_exact64, tiny_llama_fp64

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows():
    return generate_unpaired(seed=23, n_train=16, n_eval=8)


def _cfg(tmp_path, name, **kw) -> KTOConfig:
    base = {"output_dir": str(tmp_path / name), "max_steps": 1, "per_device_train_batch_size": 4,
            "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 0, "disable_tqdm": True, "seed": 3,
            "max_grad_norm": 0.0}
    base.update(kw)
    return KTOConfig(**base)


def _train_rows(out) -> list[dict]:
    return [m for m in (json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


@pytest.mark.parametrize("mode", ["separate", "adapter_disabled", "cached"])
def test_pitfall_10_kto_step0_policy_equals_reference(tmp_path, tokenizer, rows, mode, monkeypatch):
    """At step 0: r = 0 and z0 = 0 for every example, so each loss is weight x (1 - σ(0)) = w/2."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    kw = {"use_peft": True, "lora_r": 4} if mode == "adapter_disabled" else {}
    if mode == "cached":
        kw["precompute_ref_log_probs"] = True
    train, held = rows
    result = kto(_cfg(tmp_path, mode, desirable_weight=1.0, undesirable_weight=1.5, **kw), model=make_tiny_llama(),
                 tokenizer=tokenizer, dataset=train, eval_dataset=held)
    first = _train_rows(result.output_dir)[0]
    n_good, n_bad = first["count/chosen"], first["count/rejected"]
    assert first["loss"] == pytest.approx((0.5 * n_good + 0.75 * n_bad) / (n_good + n_bad), abs=1e-6)
    assert first["kl"] == 0.0 and first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0


def test_kto_unequal_classes_and_one_class_batches_train(tmp_path, tokenizer, rows):
    train, _ = rows
    only_good = [r for r in train if r["label"]]
    assert len(only_good) != len(train) - len(only_good)
    result = kto(_cfg(tmp_path, "good", max_steps=2), model=make_tiny_llama(), tokenizer=tokenizer, dataset=only_good)
    assert all(r["count/rejected"] == 0 and r["grad_norm"] > 0 for r in _train_rows(result.output_dir))


def test_kto_accumulation_invariance(tmp_path, tokenizer, rows):
    """z0 is estimated over the whole step, so batch 8 == 4 x 2 accumulation exactly."""
    train, _ = rows
    a = kto(_cfg(tmp_path, "b8", max_steps=3, per_device_train_batch_size=8, **FLOAT64), model=tiny_llama_fp64(),
            tokenizer=tokenizer, dataset=train)
    b = kto(_cfg(tmp_path, "b4x2", max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2, **FLOAT64),
            model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=train)
    for x, y in zip(_train_rows(a.output_dir), _train_rows(b.output_dir), strict=True):
        # float64: tolerances in tests/numerics.py; kl is a difference of log-prob sums
        assert_exact64(x["loss"], y["loss"], "loss")
        assert_exact64(x["kl"], y["kl"], "kl", abs_tol=EXACT64_ABS)
        assert_exact64(x["grad_norm"], y["grad_norm"], "grad_norm")


def test_mismatched_pairs_is_a_derangement(tokenizer, rows):
    from posttrain.data.formats import detect_format
    from posttrain.data.in_memory import as_loaded_rows
    from posttrain.data.preference import prepare_unpaired_examples

    for n in (2, 3, 16):
        partner = derangement(n, seed=n)
        assert sorted(partner) == list(range(n)) and all(i != j for i, j in enumerate(partner))
    loaded = as_loaded_rows(rows[0], None)
    examples, _ = prepare_unpaired_examples(loaded, detect_format(loaded.rows, "x"), tokenizer, max_length=64,
                                            max_prompt_length=48)
    pairs = mismatched_pairs(examples, seed=1, max_length=64)
    partner = derangement(len(examples), 1)
    for i, p in enumerate(pairs):
        assert p.prompt_ids == examples[i].prompt_ids and p.label == examples[i].label
        assert p.completion_ids == examples[partner[i]].completion_ids[: len(p.completion_ids)]
        assert len(p.prompt_ids) + len(p.completion_ids) <= 64


def test_kto_cli_from_jsonl(tmp_path, tiny_model_dir, rows):
    train, _ = rows
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    cfg = tmp_path / "kto.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\noutput_dir: {tmp_path / 'out'}\n"
                   "max_steps: 2\nper_device_train_batch_size: 4\ndesirable_weight: 1.2\ndisable_tqdm: true\n")
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "kto", "--config", cfg, "--undesirable_weight", "0.8"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights desirable 1.2, undesirable 0.8" in proc.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()
