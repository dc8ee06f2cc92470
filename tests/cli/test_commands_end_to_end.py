"""The commands a user types, run as subprocesses on a tiny model: sft (flags and --config), validate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.demo.tasks import generate

REPO = Path(__file__).resolve().parents[2]


def _run(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture()
def data_file(tmp_path):
    train, _ = generate(seed=5, n_train=24, n_eval=0)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    return path


def test_sft_from_flags_with_packing_writes_metrics_and_a_loadable_model(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "out"
    proc = _run("sft", "--model_name_or_path", tiny_model_dir, "--dataset_name", data_file, "--output_dir", out,
                "--max_steps", 20, "--packing", "--max_length", 128, "--per_device_train_batch_size", 2,
                "--logging_steps", 5, "--learning_rate", 1e-3, "--disable_tqdm")
    text = proc.stdout
    assert "batch plan:" in text and "packed rows of <= 128 tokens" in text
    assert "format messages" in text and "device: cpu" in text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 5 or gen[0, -1].item() == tok.eos_token_id


def test_sft_from_config_file(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "cfg-out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data_file}\noutput_dir: {out}\n"
                   "max_steps: 3\nlearning_rate: 1e-3\nper_device_train_batch_size: 4\nlogging_steps: 1\n"
                   "assistant_only_loss: true\ndisable_tqdm: true\n")
    _run("sft", "--config", cfg)
    saved = (out / "config.yaml").read_text()
    assert "assistant_only_loss: true" in saved and "max_steps: 3" in saved
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    # the saved config is itself a valid --config
    _run("sft", "--config", out / "config.yaml", "--output_dir", tmp_path / "again", "--max_steps", 1)


def test_validate_broken_file_lists_row_numbered_errors_and_exits_nonzero(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "yo"}]}) + "\n"
        + "{not json\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    proc = _run("validate", bad, check=False)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert f"{bad}:2: messages[1].role" in out
    assert f"{bad}:3: <json>" in out
    assert f"{bad}:4: messages" in out
    good = tmp_path / "good.jsonl"
    good.write_text(bad.read_text().splitlines()[0] + "\n")
    assert _run("validate", good).returncode == 0


def test_sft_refuses_invalid_data_before_loading_a_model(tmp_path, data_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data_file.read_text() + json.dumps({"messages": [{"role": "user", "content": ""}]}) + "\n")
    proc = _run("sft", "--model_name_or_path", tmp_path / "does-not-exist", "--dataset_name", bad,
                "--output_dir", tmp_path / "o", "--tokenizer_name_or_path", REPO / "nonexistent", check=False)
    assert proc.returncode != 0


def test_bf16_mixed_precision_runs_on_cpu(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "bf16"
    proc = _run("sft", "--model_name_or_path", tiny_model_dir, "--dataset_name", data_file, "--output_dir", out,
                "--max_steps", 2, "--bf16", "--logging_steps", 1, "--disable_tqdm", "--per_device_train_batch_size", 4)
    assert "mixed precision: bf16" in proc.stdout
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(10.0 < v < 11.5 for v in losses), losses  # ≈ ln(49152) for a random tiny model
