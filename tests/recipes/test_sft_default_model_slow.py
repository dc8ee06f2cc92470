"""Slow end-to-end: SFT on the embedded SmolLM2-135M-Instruct (`make test-slow`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.demo.tasks import DATA_DIR

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sft_embedded_default_model_trains_saves_and_generates(tmp_path):
    out = tmp_path / "smol"
    args = [sys.executable, "-m", "posttrain.cli", "sft", "--dataset_name", DATA_DIR / "sft_train.jsonl",
            "--output_dir", out, "--max_steps", 4, "--per_device_train_batch_size", 4, "--learning_rate", 5e-5,
            "--logging_steps", 1, "--packing", "--max_length", 256, "--disable_tqdm"]
    proc = subprocess.run(
        [str(a) for a in args],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(0 < r["loss"] < 5 for r in rows)  # an instruct model, not random
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4? End your reply with '#### <number>'."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=16, do_sample=False)
    assert tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
