"""The SFT recipe end to end on a tiny model: artefacts, invariances, resume, NaN guard, LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain import SFTConfig, sft
from posttrain.demo.tasks import generate
from posttrain.errors import NonFiniteLossError
from tests.conftest import StopAfterCheckpoint, make_tiny_llama
from tests.numerics import FLOAT64, assert_exact64, assert_state_dicts_exact64, tiny_llama_fp64


@pytest.fixture(scope="module")
def chat_rows():
    train, _ = generate(seed=7, n_train=16, n_eval=0)
    # vary lengths so padding and packing matter
    for i, row in enumerate(train):
        row["messages"][1]["content"] += " Checked." * (i % 5)
    return train


def _config(tmp_path: Path, name: str, **kw) -> SFTConfig:
    base = dict(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, save_steps=0, max_length=128, disable_tqdm=True, seed=3, max_grad_norm=0.0)
    base.update(kw)
    return SFTConfig(**base)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sft_writes_model_config_metrics_and_summary(tmp_path, tokenizer, chat_rows):
    result = sft(_config(tmp_path, "run", max_steps=3), model=make_tiny_llama(), tokenizer=tokenizer,
                 dataset=chat_rows)
    out = result.output_dir
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("step", "loss", "learning_rate", "grad_norm", "num_tokens", "tokens_per_second",
                "mean_token_accuracy"):
        assert all(key in r for r in rows), key
    assert (out / "config.yaml").exists() and "max_steps: 3" in (out / "config.yaml").read_text()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 3 and summary["num_tokens"] == rows[-1]["num_tokens"]
    # pitfall 20 at the recipe level: the saved model reloads with the live model's logits
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 520, 9531, 198, 22, 2]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-5)


def test_sft_loss_decreases(tmp_path, tokenizer, chat_rows):
    result = sft(_config(tmp_path, "run", max_steps=12, learning_rate=3e-3), model=make_tiny_llama(),
                 tokenizer=tokenizer, dataset=chat_rows)
    losses = [r["loss"] for r in _metrics(result.output_dir)]
    assert losses[-1] < losses[0] - 0.5, losses


def test_pitfall_08_gradient_accumulation_invariance(tmp_path, tokenizer, chat_rows):
    """One optimizer step of batch 8 equals batch 4 x 2 accumulation: same loss, same gradient
    (its global norm) and the same updated weights."""
    a = sft(_config(tmp_path, "b8", max_steps=1, per_device_train_batch_size=8, **FLOAT64), model=tiny_llama_fp64(),
            tokenizer=tokenizer, dataset=chat_rows)
    b = sft(_config(tmp_path, "b4x2", max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2, **FLOAT64),
            model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=chat_rows)
    ma, mb = _metrics(a.output_dir)[0], _metrics(b.output_dir)[0]
    assert_exact64(ma["loss"], mb["loss"], "loss")  # float64: tolerances in tests/numerics.py
    assert_exact64(ma["grad_norm"], mb["grad_norm"], "grad_norm")
    assert ma["num_tokens"] == mb["num_tokens"]
    assert_state_dicts_exact64(_weights(a.model), _weights(b.model))


def test_pitfall_08_packed_equals_unpacked(tmp_path, tokenizer, chat_rows):
    """The whole data in one step, packed (padding-free rows) or padded: same loss and gradient norm."""
    from posttrain.data.formats import detect_format
    from posttrain.data.in_memory import as_loaded_rows
    from posttrain.data.packing import pack_best_fit_decreasing
    from posttrain.data.prepare import prepare_sft_examples

    loaded = as_loaded_rows(chat_rows, None)
    examples, _ = prepare_sft_examples(loaded, detect_format(loaded.rows, loaded.source), tokenizer, max_length=128)
    bins = pack_best_fit_decreasing([len(e.input_ids) for e in examples], 128)
    padded = sft(_config(tmp_path, "padded", max_steps=1, per_device_train_batch_size=len(chat_rows), **FLOAT64),
                 model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=chat_rows)
    packed = sft(_config(tmp_path, "packed", max_steps=1, per_device_train_batch_size=len(bins), packing=True,
                         **FLOAT64),
                 model=tiny_llama_fp64(), tokenizer=tokenizer, dataset=chat_rows)
    mp, mq = _metrics(padded.output_dir)[0], _metrics(packed.output_dir)[0]
    assert_exact64(mp["loss"], mq["loss"], "loss")  # float64: tolerances in tests/numerics.py
    assert_exact64(mp["grad_norm"], mq["grad_norm"], "grad_norm")
    assert mp["mean_token_accuracy"] == pytest.approx(mq["mean_token_accuracy"])


def test_pitfall_19_resume_is_bit_identical(tmp_path, tokenizer, chat_rows, monkeypatch):
    """4 steps straight == 2 steps + interrupt + resume + 2 steps, bit for bit on CPU."""
    kw = dict(max_steps=4, save_steps=2, per_device_train_batch_size=4, max_grad_norm=1.0, warmup_steps=1)
    straight = sft(_config(tmp_path, "straight", **kw), model=make_tiny_llama(), tokenizer=tokenizer,
                   dataset=chat_rows)

    out = tmp_path / "interrupted"
    import posttrain.engine.session as session

    monkeypatch.setattr(session, "GracefulStop", lambda: StopAfterCheckpoint(out / "checkpoints" / "step-000002"))
    first = sft(_config(tmp_path, "interrupted", **kw), model=make_tiny_llama(), tokenizer=tokenizer,
                dataset=chat_rows)
    assert first.stopped_early and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    resumed = sft(_config(tmp_path, "interrupted", resume_from_checkpoint="latest", **kw),
                  model=make_tiny_llama(seed=99), tokenizer=tokenizer, dataset=chat_rows)
    ws, wr = _weights(straight.model), _weights(resumed.model)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in _metrics(out)] == [r["loss"] for r in _metrics(straight.output_dir)]


def test_nan_loss_stops_naming_step_and_keeps_last_checkpoint(tmp_path, tokenizer, chat_rows, monkeypatch):
    import posttrain.losses.sft as sft_losses

    real = sft_losses.sft_nll_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(sft_losses, "sft_nll_loss", poisoned)
    cfg = _config(tmp_path, "nan", max_steps=4, save_steps=2, per_device_train_batch_size=4)
    with pytest.raises(NonFiniteLossError, match=r"step 3: .*not finite.*last good checkpoint: .*step-000002"):
        sft(cfg, model=make_tiny_llama(), tokenizer=tokenizer, dataset=chat_rows)
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step-000002"
    assert (ckpt / "trainer_state.json").exists()
    assert not list((Path(cfg.output_dir) / "checkpoints").glob(".tmp*"))


def test_pitfall_21_lora_with_gradient_checkpointing_trains_every_adapter(tmp_path, tokenizer, chat_rows):
    model = make_tiny_llama()
    result = sft(_config(tmp_path, "lora", max_steps=1, use_peft=True, gradient_checkpointing=True, lora_r=4),
                 model=model, tokenizer=tokenizer, dataset=chat_rows)
    fresh = make_tiny_llama()
    trained = {n: p for n, p in result.model.named_parameters() if "lora_" in n}
    assert trained, "no LoRA parameters"
    lora_b = [n for n in trained if "lora_B" in n]
    # lora_B starts at zero: after one step every one of them must have moved
    assert all(trained[n].abs().sum() > 0 for n in lora_b), [n for n in lora_b if trained[n].abs().sum() == 0]
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in result.model.named_parameters() if "lora_" not in n}
    fresh_sd = dict(fresh.named_parameters())
    assert all(torch.equal(base[n], fresh_sd[n]) for n in fresh_sd if n in base), "frozen base weights changed"
    assert (result.output_dir / "adapter_model.safetensors").exists()


def test_zero_target_rows_never_reach_the_loss(tmp_path, tokenizer, chat_rows):
    """pitfall 7 at the recipe level: a prompt longer than max_length leaves no target → dropped."""
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    result = sft(_config(tmp_path, "trunc", max_steps=1, max_length=64, per_device_train_batch_size=4,
                         truncation_side="right"),
                 model=make_tiny_llama(), tokenizer=tokenizer, dataset=chat_rows + [long_prompt])
    assert math.isfinite(_metrics(result.output_dir)[0]["loss"])


def test_report_to_tensorboard_writes_events(tmp_path, tokenizer, chat_rows):
    """--report_to goes through accelerate's trackers: tensorboard event files appear."""
    result = sft(_config(tmp_path, "tb", max_steps=2, report_to=["tensorboard"]), model=make_tiny_llama(),
                 tokenizer=tokenizer, dataset=chat_rows)
    events = list(result.output_dir.rglob("events.out.tfevents*"))
    assert events, "no tensorboard event file written"
