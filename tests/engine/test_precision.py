"""The precision policy (engine/precision.py, docs/precision.md): auto detection, fp32 master
weights (pitfall 23), step-0 identities under bf16 autocast, fp16 overflow skipping, and every
separately loaded model sharing the policy's load settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain import DPOConfig, GRPOConfig, PPOConfig, SFTConfig, dpo, grpo, sft
from posttrain.config import ConfigError, TrainingConfig
from posttrain.demo.tasks import generate, generate_preferences
from posttrain.engine import precision
from posttrain.engine.precision import resolve_precision
from posttrain.models.loading import load_causal_lm, weights_dtype
from tests.conftest import make_tiny_llama


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- auto detection


@pytest.mark.parametrize(("flags", "fast"), [({"fpu", "avx2", "avx512f"}, False), ({"avx2", "amx_bf16"}, True),
                                             ({"avx512f", "avx512_bf16"}, True), (set(), False)])
def test_cpu_fast_bf16_read_from_cpu_flags(monkeypatch, flags, fast):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    assert precision.cpu_has_fast_bf16() is fast


def test_cpu_fast_bf16_without_proc_cpuinfo_asks_torch(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: None)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert precision.cpu_has_fast_bf16() is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert precision.cpu_has_fast_bf16() is False


@pytest.mark.parametrize("fast", [True, False])
def test_auto_is_bf16_autocast_only_on_fast_bf16_cpu(monkeypatch, fast):
    monkeypatch.delenv(precision.AUTO_ENV)  # the suite pins auto to fp32 (conftest); this test is about auto
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    p = resolve_precision(DPOConfig(), device_type="cpu")
    assert p.autocast == ("bf16" if fast else "no") and not p.low_precision_master_weights
    assert weights_dtype(DPOConfig()) == "float32"  # master weights fp32 whatever the hardware


def test_suite_pins_auto_to_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)  # an AMX machine
    assert resolve_precision(DPOConfig(), device_type="cpu").autocast == "no"
    monkeypatch.setenv(precision.AUTO_ENV, "bf16")
    assert resolve_precision(DPOConfig(), device_type="cpu").autocast == "bf16"
    assert resolve_precision(DPOConfig(bf16=False), device_type="cpu").autocast == "no"  # explicit wins


def test_dtype_bfloat16_alone_means_fp32_master_weights_and_bf16_autocast():
    p = resolve_precision(DPOConfig(dtype="bfloat16"), device_type="cpu")
    assert p.autocast == "bf16" and not p.low_precision_master_weights
    assert "weights load in fp32" in p.notes[0]
    assert weights_dtype(DPOConfig(dtype="bfloat16")) == "float32"
    assert weights_dtype(DPOConfig(dtype="bfloat16", use_peft=True)) == "bfloat16"  # the frozen base only
    assert weights_dtype(DPOConfig(dtype="bfloat16", low_precision_master_weights=True)) == "bfloat16"
    assert resolve_precision(DPOConfig(dtype="float32"), device_type="cpu").autocast == "no"


@pytest.mark.parametrize("kw", [dict(bf16=True, fp16=True), dict(dtype="bfloat16", fp16=True),
                                dict(dtype="bfloat16", bf16=False), dict(low_precision_master_weights=True),
                                dict(dtype="float16", low_precision_master_weights=True), dict(fp16=True)])
def test_contradictions_and_cpu_fp16_are_config_errors(kw):
    with pytest.raises(ConfigError):
        resolve_precision(DPOConfig(**kw), device_type="cpu")


# ---------------------------------------------------------------------------- pitfall 23


@pytest.mark.slow  # three SFT runs, ~40 s on 2 cores
def test_pitfall_23_small_lr_updates_kept_with_fp32_master_weights(tmp_path, tokenizer, tiny_model_dir, capsys):
    """lr 1e-6, one AdamW step. Adam's first step moves every weight by lr * g / (|g| + eps), i.e.
    by lr * sign(g) wherever |g| >> eps = 1e-8, whatever the gradient's precision. On fp32 master
    weights that change is kept (for |w| < 4 the fp32 spacing is <= 4.8e-7 < lr / 2), so an fp32 run
    and a `--dtype bfloat16` run (now: fp32 master weights + bf16 autocast) move the same weights by
    the same amounts; the update vectors differ only where bf16 flips the sign of a gradient within
    its rounding (~2^-8 relative) of zero. Pure bf16 weights (the opt-in) keep a change only where
    lr >= half the bf16 spacing of w, 2^(e-8): |w| < ~2.6e-4, about 1% of these N(0, 0.02) weights."""
    rows, _ = generate(seed=7, n_train=8, n_eval=0)
    lr = 1e-6
    start = {k: v.double() for k, v in load_causal_lm(str(tiny_model_dir), dtype="float32").state_dict().items()}

    def update(name, **kw):
        cfg = SFTConfig(output_dir=str(tmp_path / name), model_name_or_path=str(tiny_model_dir), max_steps=1,
                        per_device_train_batch_size=4, learning_rate=lr, logging_steps=1, save_steps=0,
                        max_length=128, disable_tqdm=True, seed=3, max_grad_norm=0.0, **kw)
        sd = sft(cfg, tokenizer=tokenizer, dataset=rows).model.state_dict()
        # from the weights the run started from (pure bf16 starts from the bf16-rounded ones)
        return torch.cat([(sd[k].double() - start[k].to(sd[k].dtype).double()).flatten() for k in start])

    fp32 = update("fp32", bf16=False)
    autocast = update("dtype-bf16", dtype="bfloat16")
    assert "weights load in fp32 (master weights)" in capsys.readouterr().out
    pure = update("pure", dtype="bfloat16", low_precision_master_weights=True)
    assert "smaller than ~2^-8" in capsys.readouterr().out  # the warning

    def moved(d):
        return (d.abs() >= lr / 2).double().mean().item()

    assert moved(fp32) > 0.9  # |g| >= eps for nearly every weight: each moved by ~lr
    # same weights moved: a weight's move flips between runs only if its |g| crosses eps (bf16 moves
    # g by ~0.4%, so only |g| within 0.4% of 1e-8): far below 1% of the weights
    assert abs(moved(autocast) - moved(fp32)) < 0.01
    # same sizes: |delta| = lr * |g|/(|g|+eps) on the same fp32 grid; differs only for |g| ~ eps
    assert fp32.abs().mean().item() == pytest.approx(autocast.abs().mean().item(), rel=0.01)
    # same directions: each sign flip costs 2 lr of L1; flips need |g| within bf16 rounding of 0
    # (~2^-8 of the gradient scale: a fraction of a percent of the weights) -> allow 1% flips
    assert (autocast - fp32).abs().sum().item() / fp32.abs().sum().item() < 0.02
    # pure bf16 loses most updates (predicted ~1% kept); old `--dtype bfloat16` trained like this
    assert moved(pure) < 0.1 and pure.abs().mean().item() < 0.1 * lr


# ---------------------------------------------------------------------------- step-0 identities in bf16


def test_bf16_autocast_dpo_step0_ln2_with_separately_loaded_reference(tmp_path, tokenizer, tiny_model_dir,
                                                                      monkeypatch):
    """Policy and reference loaded from the same dir with the same settings (dtype, attention) and
    both run under bf16 autocast: identical log-probs, so loss = ln 2 and rewards are exactly 0."""
    import posttrain.models.loading as loading
    import posttrain.models.setup as setup

    loads = []
    real = loading.load_causal_lm

    def spy(path, **kw):
        model = real(path, **kw)
        loads.append((kw, model))
        return model

    monkeypatch.setattr(loading, "load_causal_lm", spy)  # the reference's loader (recipes import it late)
    monkeypatch.setattr(setup, "load_causal_lm", spy)  # the policy's
    train, _ = generate_preferences(seed=17, n_train=8, n_eval=0)
    cfg = DPOConfig(output_dir=str(tmp_path / "dpo"), model_name_or_path=str(tiny_model_dir),
                    ref_model_name_or_path=str(tiny_model_dir), attn_implementation="eager", bf16=True, max_steps=1,
                    per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_steps=0,
                    disable_tqdm=True, seed=3, max_grad_norm=0.0)
    result = dpo(cfg, tokenizer=tokenizer, dataset=train)
    first = [r for r in _rows(result.output_dir) if "loss" in r][0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # ln 2 printed through fp32 logs
    (policy_kw, policy), (ref_kw, ref) = loads
    policy_kw.pop("gradient_checkpointing")  # a training setting, not a load setting
    assert policy_kw == ref_kw and policy_kw["dtype"] == "float32"
    assert next(ref.parameters()).dtype == next(policy.parameters()).dtype == torch.float32
    assert ref.config._attn_implementation == policy.config._attn_implementation == "eager"


def shorter_is_better(prompts, completions, **columns):
    return [-len(c[0]["content"]) / 10 for c in completions]


def test_bf16_autocast_grpo_first_step_kl_zero_and_ratio_one(tmp_path, tokenizer):
    _, held = generate(seed=31, n_train=0, n_eval=8)
    cfg = GRPOConfig(output_dir=str(tmp_path / "grpo"), bf16=True, beta=0.1, epsilon=1e-6, max_steps=1,
                     per_device_train_batch_size=8, num_generations=4, max_completion_length=8, learning_rate=1e-3,
                     logging_steps=1, save_steps=0, disable_tqdm=True, seed=3, max_grad_norm=0.0)
    result = grpo(cfg, model=make_tiny_llama(), tokenizer=tokenizer, dataset=held, reward_funcs=[shorter_is_better])
    row = _rows(result.output_dir)[0]
    assert row["kl"] == 0.0  # reference (a frozen copy) under the policy's autocast: bit-identical
    assert row["clip_ratio/low"] == 0.0 and row["clip_ratio/high"] == 0.0  # ratio 1 within 1e-6


# ---------------------------------------------------------------------------- fp16 overflow


def test_fp16_overflow_step_is_skipped_not_fatal(tmp_path):
    """accelerate runs fp16 only on a GPU (on a CPU it silently stays fp32, so posttrain refuses
    --fp16 there); here the accelerator gets the CPU gradient scaler accelerate would build on a GPU
    (torch.amp.GradScaler("cpu") works in torch 2.13), and step 2's gradient is made to overflow."""
    from posttrain.engine.session import TrainingSession
    from posttrain.engine.setup import build_accelerator

    acc = build_accelerator(mixed_precision="fp16", report_to=["none"], output_dir=str(tmp_path), seed=0)
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8), True
    module = torch.nn.Linear(4, 1)  # its fp16 weight gradient is 2 rows x scale/2 = scale: finite at 2^8
    cfg = TrainingConfig(output_dir=str(tmp_path / "run"), learning_rate=0.1, logging_steps=1, save_steps=0,
                         disable_tqdm=True, max_steps=3)
    lrs, moved = [], []
    try:
        with TrainingSession(acc, cfg, module, total_steps=3, steps_per_epoch=3) as run:
            for step in run.steps():
                loss = run.module(torch.ones(2, 4)).float().mean()
                run.backward(loss)
                if step == 1:
                    module.weight.grad[0, 0] = float("inf")  # the overflow
                before = module.weight.detach().clone()
                lrs.append(run.scheduler.get_last_lr()[0])
                run.finish_step(step, loss=loss, tokens=2, metrics={})
                moved.append(not torch.equal(before, module.weight.detach()))
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # the next test's Accelerator starts clean
    assert moved == [True, False, True]  # skipped, then training goes on
    rows = _rows(tmp_path / "run")
    assert [r["fp16/skipped_steps"] for r in rows] == [0, 1, 1]
    assert [r["fp16/loss_scale"] for r in rows] == [2.0 ** 8, 2.0 ** 7, 2.0 ** 7]  # halved on overflow
    assert lrs[1] == lrs[2]  # the skipped step did not advance the schedule


# ---------------------------------------------------------------------------- every model, same settings


@pytest.fixture()
def reward_dir(tmp_path, tokenizer):
    from posttrain.models.reward_model import reward_model_from_causal_lm

    out = tmp_path / "rm"
    reward_model_from_causal_lm(make_tiny_llama(), tokenizer.pad_token_id).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_reward_and_value_models_get_the_policys_dtype_attention_and_autocast(reward_dir, tokenizer):
    from posttrain.models.value_model import load_value_model
    from posttrain.rollout.rewards import reward_functions_for

    common = dict(dtype="bfloat16", use_peft=True, attn_implementation="eager", bf16=True)
    (rm,) = reward_functions_for(GRPOConfig(reward_model_path=reward_dir, **common), None)
    assert next(rm.scorer.model.parameters()).dtype == torch.bfloat16  # the policy's (frozen) base dtype
    assert rm.scorer.model.config._attn_implementation == "eager" and rm.autocast_dtype == torch.bfloat16

    critic = load_value_model(PPOConfig(value_model_path=reward_dir, **common), policy_model=None,
                              tokenizer=tokenizer, log=lambda *_: None)
    params = dict(critic.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values() if p.requires_grad)  # LoRA + score: fp32
    assert any(p.dtype == torch.bfloat16 for p in params.values() if not p.requires_grad)  # frozen base
    inner = critic.model.get_base_model() if hasattr(critic.model, "get_base_model") else critic.model
    assert inner.config._attn_implementation == "eager"

    full = load_value_model(PPOConfig(value_model_path=reward_dir, dtype="bfloat16", attn_implementation="eager"),
                            policy_model=None, tokenizer=tokenizer, log=lambda *_: None)
    assert all(p.dtype == torch.float32 for p in full.model.parameters())  # trained in full: fp32 master
