"""Real processes: a 2-process gloo run matches 1 process; SIGTERM checkpoints and exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from posttrain.demo.tasks import generate
from tests.numerics import assert_exact64, assert_state_dicts_exact64

FLOAT64 = {"dtype": "float64", "bf16": "false"}

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def chat_file(tmp_path):
    train, _ = generate(seed=11, n_train=32, n_eval=0)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    return path


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _sft_args(model_dir, data, out, **kw):
    args = {"model_name_or_path": model_dir, "dataset_name": data, "output_dir": out, "max_steps": 2,
            "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 0, "max_length": 96, "seed": 5,
            "disable_tqdm": True, "max_grad_norm": 0.0}
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def test_two_process_gloo_matches_one_process(tmp_path, tiny_model_dir, chat_file):
    """2 processes x batch 4 == 1 process x batch 4 x 2 accumulation: same loss, grad norm, weights
    (in float64: an identity). Every recipe: tests/distributed (slow)."""
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "posttrain.cli", "sft",
                    *_sft_args(tiny_model_dir, chat_file, one, per_device_train_batch_size=4,
                               gradient_accumulation_steps=2, **FLOAT64)],
                   check=True, env=_env(), cwd=REPO, capture_output=True)
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "posttrain.cli", "sft",
              *_sft_args(tiny_model_dir, chat_file, two, per_device_train_batch_size=4,
                         gradient_accumulation_steps=1, **FLOAT64)]
    # torchrun under accelerate; ACCELERATE_USE_CPU makes each rank a CPU process joined over gloo.
    proc = subprocess.run(launch, env={**_env(), "ACCELERATE_USE_CPU": "true"}, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes: 2" in proc.stdout + proc.stderr
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2, strict=True):  # float64: tolerances in tests/numerics.py
        assert_exact64(a["loss"], b["loss"], "loss")
        assert_exact64(a["grad_norm"], b["grad_norm"], "grad_norm")
        assert a["num_tokens"] == b["num_tokens"]
    assert_state_dicts_exact64(load_file(one / "model.safetensors"), load_file(two / "model.safetensors"))


def test_sigterm_saves_checkpoint_then_resume_completes(tmp_path, tiny_model_dir, chat_file):
    out = tmp_path / "run"
    args = _sft_args(tiny_model_dir, chat_file, out, max_steps=60, per_device_train_batch_size=2)
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "sft", *args], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    assert "SIGTERM: stopped after step" in output
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 2 <= stopped_at < 60
    resume = subprocess.run([sys.executable, "-m", "posttrain.cli", "sft", *args,
                             "--resume_from_checkpoint", "latest"], env=_env(), cwd=REPO,
                            capture_output=True, text=True)
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert f"resumed from {ckpts[0]} at step {stopped_at}" in resume.stdout
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 61))
    assert (out / "model.safetensors").exists()
