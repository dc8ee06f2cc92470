"""Pitfall 20: a mid-run checkpoint (checkpoints/step-N) loads with plain transformers / peft, in a
fresh process that never imports posttrain, and computes what the live model computed at that step.

Each run is stopped by a stand-in for SIGTERM right after its step-1 checkpoint (the path a killed
run takes), so the returned model IS the model of that step. Both sides run in float64: the loaded
logits equal the live ones up to summation order, EXACT64_REL (tests/numerics.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.demo.tasks import generate, generate_preferences
from tests.conftest import StopAfterCheckpoint
from tests.numerics import EXACT64_ABS, EXACT64_REL, FLOAT64, tiny_llama_fp64

# Run as `python -c`: only transformers, peft and safetensors; it asserts posttrain never loaded.
LOADER = r"""
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

kind, ckpt, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(ckpt)
assert tok.chat_template, "the chat template is saved beside the model"
text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                               add_generation_prompt=True)
ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
if kind == "causal":
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64)
elif kind == "adapter":
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[4], dtype=torch.float64), ckpt)
else:
    model = AutoModelForSequenceClassification.from_pretrained(ckpt, dtype=torch.float64)
model.eval()
with torch.no_grad():
    tensors = {"ids": ids, "logits": model(input_ids=ids).logits.contiguous()}
    if kind != "reward":
        tensors["generated"] = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
assert not any(m == "posttrain" or m.startswith("posttrain.") for m in sys.modules), "posttrain was imported"
save_file(tensors, out)
"""


def _load_in_fresh_process(kind: str, ckpt: Path, tmp_path: Path, base: Path | None = None) -> dict:
    out = tmp_path / f"{kind}-loaded.safetensors"
    args = [sys.executable, "-c", LOADER, kind, str(ckpt), str(out)] + ([str(base)] if base else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)


def _stopped_after_step_1(monkeypatch, out: Path) -> Path:
    import posttrain.engine.session as session

    ckpt = out / "checkpoints" / "step-000001"
    monkeypatch.setattr(session, "GracefulStop", lambda: StopAfterCheckpoint(ckpt))
    return ckpt


def _assert_close64(loaded: torch.Tensor, live: torch.Tensor) -> None:
    torch.testing.assert_close(loaded, live.double(), rtol=EXACT64_REL, atol=EXACT64_ABS)


def _sft_rows():
    train, _ = generate(seed=7, n_train=8, n_eval=0)
    return train


def _sft_config(tmp_path, name, **kw):
    from posttrain.config import SFTConfig

    return SFTConfig(output_dir=str(tmp_path / name), max_steps=3, save_steps=1, per_device_train_batch_size=4,
                     learning_rate=1e-2, logging_steps=1, max_length=128, disable_tqdm=True, seed=3, **FLOAT64, **kw)


def test_pitfall_20_sft_checkpoint_loads_with_transformers_and_generates(tmp_path, tokenizer, monkeypatch):
    from posttrain.recipes.sft import sft

    ckpt = _stopped_after_step_1(monkeypatch, tmp_path / "full")
    result = sft(_sft_config(tmp_path, "full"), model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=_sft_rows())
    assert result.stopped_early and result.steps == 1
    assert (ckpt / "config.json").exists() and (ckpt / "model.safetensors").exists()
    assert (ckpt / "training_state").is_dir() and (ckpt / "trainer_state.json").exists()

    loaded = _load_in_fresh_process("causal", ckpt, tmp_path)
    live = result.model.eval()
    with torch.no_grad():
        _assert_close64(loaded["logits"], live(input_ids=loaded["ids"]).logits)
        generated = live.generate(input_ids=loaded["ids"], max_new_tokens=4, do_sample=False)
    assert torch.equal(loaded["generated"], generated) and generated.shape[1] == loaded["ids"].shape[1] + 4
    # the step-1 model, not the starting one: training moved the logits
    with torch.no_grad():
        start = tiny_llama_fp64().eval()(input_ids=loaded["ids"]).logits
    assert (loaded["logits"] - start).abs().max() > 1e-3


@pytest.mark.slow  # a recipe run plus a fresh interpreter loading transformers
def test_pitfall_20_lora_checkpoint_loads_with_peft(tmp_path, tokenizer, monkeypatch):
    from posttrain.recipes.sft import sft

    base = tmp_path / "base64"
    tiny_llama_fp64().save_pretrained(base)  # the base the adapter is trained on
    ckpt = _stopped_after_step_1(monkeypatch, tmp_path / "lora")
    result = sft(_sft_config(tmp_path, "lora", model_name_or_path=str(base), use_peft=True, lora_r=4, lora_alpha=8),
                 tokenizer=tokenizer, dataset=_sft_rows())
    assert result.stopped_early
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "model.safetensors").exists()
    loaded = _load_in_fresh_process("adapter", ckpt, tmp_path, base=base)
    live = result.model.eval()
    with torch.no_grad():
        _assert_close64(loaded["logits"], live(input_ids=loaded["ids"]).logits)


@pytest.mark.slow  # a recipe run plus a fresh interpreter loading transformers
def test_pitfall_20_reward_checkpoint_loads_as_a_sequence_classifier(tmp_path, tokenizer, monkeypatch):
    from posttrain.config import RewardConfig
    from posttrain.recipes.reward import reward

    train, _ = generate_preferences(seed=3, n_train=8, n_eval=0)
    ckpt = _stopped_after_step_1(monkeypatch, tmp_path / "rm")
    config = RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=3, save_steps=1, per_device_train_batch_size=4,
                          learning_rate=1e-2, logging_steps=1, max_length=128, disable_tqdm=True, seed=3, **FLOAT64)
    result = reward(config, model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=train)
    assert result.stopped_early
    loaded = _load_in_fresh_process("reward", ckpt, tmp_path)
    live = result.model.eval()
    with torch.no_grad():
        _assert_close64(loaded["logits"], live(input_ids=loaded["ids"]).logits)
    assert loaded["logits"].shape == (1, 1)


def test_pitfall_20_checkpoint_layout_is_atomic_and_resume_reads_training_state(tmp_path):
    """The writer runs inside the temporary directory, before the rename: a checkpoint that is
    listed always has its model files; resume loads accelerate's state from training_state/."""
    from accelerate import Accelerator

    from posttrain.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    seen = []

    def write_model(directory: Path) -> None:
        seen.append(directory.name)
        (directory / "config.json").write_text("{}")
        (directory / "value_model").mkdir()

    final = save_checkpoint(accelerator, tmp_path, 3, {"num_tokens": 0, "elapsed_seconds": 0.0}, write_model=write_model)
    assert seen == [".tmp-step-000003"] and list_checkpoints(tmp_path) == [final]
    assert (final / "config.json").exists() and (final / "value_model").is_dir() and (final / "training_state").is_dir()
    assert load_checkpoint(accelerator, final)["step"] == 3
