"""Supervised fine-tuning: `posttrain sft` and `posttrain.sft(SFTConfig(...))`.

Reads top to bottom: data → model → batch plan → optimisation loop → save.

Loss (token-mean over the whole optimizer step, so it does not depend on how the step is split
into micro-batches or processes):

    L = -(1 / N_step) * sum_{sequences in step} sum_t m_t * log p(x_t | x_<t)

where m_t is the completion mask and N_step = sum m_t over every micro-batch of the step on every
process.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import SFTConfig, config_to_dict, validate_training_config
from posttrain.engine.batching import BatchPlan, total_steps
from posttrain.engine.checkpoint import (
    load_checkpoint,
    remove_stale_temporaries,
    resolve_resume_path,
    save_checkpoint,
)
from posttrain.engine.console import format_batch_plan, format_config, save_resolved_config
from posttrain.engine.metrics_log import MetricsLog, StepTimer
from posttrain.engine.optim import build_optimizer, build_scheduler, warmup_steps_for
from posttrain.engine.peak_memory import peak_memory_bytes
from posttrain.engine.setup import build_accelerator, describe_device
from posttrain.engine.stop_signals import GracefulStop
from posttrain.errors import NonFiniteLossError


@dataclass
class SFTResult:
    output_dir: Path
    model: Any  # the trained HF (or peft) model
    steps: int
    last_loss: float | None
    stopped_early: bool


def _examples_to_batch(examples, padding_free: bool, pad_token_id: int, device) -> dict[str, torch.Tensor]:
    from posttrain.data.collate import collate_padded, collate_padding_free

    if padding_free:
        batch = collate_padding_free(examples)
        keys = ("input_ids", "position_ids", "completion_mask")
    else:
        batch = collate_padded(examples, pad_token_id=pad_token_id, padding_side="right")
        keys = ("input_ids", "attention_mask", "completion_mask")
    return {k: batch[k].to(device) for k in keys}


def _load_data(config: SFTConfig, tokenizer, dataset, log):
    from posttrain.data.formats import describe_format, detect_format
    from posttrain.data.in_memory import as_loaded_rows
    from posttrain.data.prepare import prepare_sft_examples

    loaded = as_loaded_rows(dataset, config.dataset_name, config.dataset_split, config.dataset_config)
    fmt = detect_format(loaded.rows, loaded.source)
    log(f"data: {loaded.source}: {len(loaded.rows)} rows, format {describe_format(fmt)}")
    completion_only = True if config.completion_only_loss is None else config.completion_only_loss
    examples, report = prepare_sft_examples(
        loaded, fmt, tokenizer, max_length=config.max_length, completion_only_loss=completion_only,
        assistant_only_loss=config.assistant_only_loss, truncation_side=config.truncation_side)
    for line in report.lines():
        log(line)
    if not examples:
        raise ValueError(f"{loaded.source}: no example has a token to train on")
    return examples


def _build_units(examples, config: SFTConfig) -> list[list[int]]:
    if config.packing:
        from posttrain.data.packing import pack_best_fit_decreasing

        return pack_best_fit_decreasing([len(e.input_ids) for e in examples], config.max_length)
    return [[i] for i in range(len(examples))]


def sft(config: SFTConfig, model=None, tokenizer=None, dataset=None) -> SFTResult:
    """Fine-tune `model` (default: config.model_name_or_path) on `dataset` (default:
    config.dataset_name; also a list of dicts or a `datasets.Dataset`). Returns the trained model."""
    from posttrain.losses.sft import sft_nll_loss
    from posttrain.models.loading import enable_gradient_checkpointing, load_causal_lm, load_tokenizer
    from posttrain.models.logprobs import LogProbModel, check_packing_support
    from posttrain.models.lora import apply_lora
    from posttrain.models.saving import save_pretrained_model

    validate_training_config(config)
    if config.packing and not config.max_length:
        raise ValueError("--packing needs --max_length (the length of a packed row)")
    padding_free = config.packing or config.padding_free
    output_dir = Path(config.output_dir)
    accelerator = build_accelerator(bf16=config.bf16, fp16=config.fp16, report_to=config.report_to,
                                    output_dir=str(output_dir), seed=config.seed)
    log = accelerator.print
    log(format_config(config))
    if accelerator.is_main_process:
        save_resolved_config(config, output_dir)
    log(describe_device(accelerator))

    # Data: validated and tokenised before any model is loaded, so bad rows cost no compute.
    if tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path,
                                   revision=config.model_revision, trust_remote_code=config.trust_remote_code)
    examples = _load_data(config, tokenizer, dataset, log)

    # Model.
    if model is None:
        model = load_causal_lm(config.model_name_or_path, dtype=config.dtype,
                               attn_implementation=config.attn_implementation, revision=config.model_revision,
                               trust_remote_code=config.trust_remote_code,
                               gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.use_peft:
        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           target_modules=config.lora_target_modules,
                           gradient_checkpointing=config.gradient_checkpointing)
    if padding_free:
        check_packing_support(model)
    model.train()
    log(f"model: {type(model).__name__}, dtype {next(model.parameters()).dtype}, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")

    # Batch plan: which examples make up each micro-batch of each optimizer step.
    plan = BatchPlan(units=_build_units(examples, config), micro_batch_size=config.per_device_train_batch_size,
                     accumulation=config.gradient_accumulation_steps, world_size=accelerator.num_processes,
                     seed=config.seed)
    if plan.steps_per_epoch == 0:
        raise ValueError(f"{len(plan.units)} training rows cannot fill one optimizer step of "
                         f"{plan.units_per_step}; lower --per_device_train_batch_size or "
                         "--gradient_accumulation_steps")
    steps = total_steps(plan, config.max_steps, config.num_train_epochs)
    mean_tokens = sum(len(e.input_ids) for e in examples) / len(plan.units) * plan.units_per_step
    log(format_batch_plan(micro_batch_size=config.per_device_train_batch_size,
                          accumulation=config.gradient_accumulation_steps, world_size=accelerator.num_processes,
                          packing=config.packing, max_length=config.max_length, steps=steps,
                          steps_per_epoch=plan.steps_per_epoch, unused_units=plan.unused_units_per_epoch,
                          mean_tokens_per_step=mean_tokens, examples=len(examples), units=len(plan.units)))

    scorer = LogProbModel(model, chunk_size=config.logprob_chunk_size)
    optimizer = build_optimizer(scorer, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                                betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    scheduler = build_scheduler(optimizer, name=config.lr_scheduler_type, total_steps=steps,
                                warmup_steps=warmup_steps_for(steps, config.warmup_steps, config.warmup_ratio))
    scorer, optimizer, scheduler = accelerator.prepare(scorer, optimizer, scheduler)

    start_step, num_tokens, elapsed = 0, 0, 0.0
    if accelerator.is_main_process:
        remove_stale_temporaries(output_dir)
    resume_path = resolve_resume_path(config.resume_from_checkpoint, output_dir)
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path)
        start_step, num_tokens, elapsed = state["step"], state["num_tokens"], state["elapsed_seconds"]
        log(f"resumed from {resume_path} at step {start_step}")

    metrics = MetricsLog(accelerator, output_dir, total_steps=steps, start_step=start_step,
                         disable_progress=config.disable_tqdm, tracker_config=config_to_dict(config),
                         run_name=config.run_name)
    timer = StepTimer(elapsed)
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0, "correct": 0.0, "targets": 0.0}
    first_loss = last_loss = None
    last_checkpoint: Path | None = resume_path
    world = accelerator.num_processes
    params = [p for p in scorer.parameters() if p.requires_grad]
    stopped_early = False
    step = start_step

    with GracefulStop() as stop:
        for step in range(start_step, steps):
            timer.start()
            micro_batches = [
                _examples_to_batch([examples[i] for i in mb], padding_free, tokenizer.pad_token_id, accelerator.device)
                for mb in plan.step_micro_batches(step, accelerator.process_index)
            ]
            # The normaliser is the number of target tokens in the whole optimizer step, on every process.
            local_targets = sum(int(b["completion_mask"][:, 1:].sum()) for b in micro_batches)
            step_targets = accelerator.reduce(torch.tensor(local_targets, device=accelerator.device), "sum").item()
            step_loss = torch.zeros((), device=accelerator.device)
            correct = torch.zeros((), device=accelerator.device)
            step_tokens = 0
            for k, batch in enumerate(micro_batches):
                # Gradients are all-reduced once, on the step's last micro-batch.
                sync = accelerator.no_sync(scorer) if k < len(micro_batches) - 1 else nullcontext()
                with sync:
                    target_mask = batch["completion_mask"][:, 1:]
                    out = scorer(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                 position_ids=batch.get("position_ids"), target_mask=target_mask,
                                 with_accuracy=True)
                    mask = target_mask.to(out["logps"].dtype)
                    # DDP averages gradients over processes; × world turns that back into the global sum.
                    loss = sft_nll_loss(out["logps"], mask, normalizer=step_targets) * world
                    accelerator.backward(loss)
                step_loss += loss.detach() / world
                correct += (out["correct"].float() * mask).sum()
                step_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            step_loss = accelerator.reduce(step_loss, "sum")
            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm if config.max_grad_norm > 0 else float("inf"))
            if not (torch.isfinite(step_loss) and torch.isfinite(torch.as_tensor(grad_norm))):
                optimizer.zero_grad(set_to_none=True)
                where = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else ""
                raise NonFiniteLossError(
                    f"step {step + 1}: loss {step_loss.item()} / grad norm {float(grad_norm)} is not finite; "
                    f"the update was not applied and the run stopped{where}")
            step_lr = scheduler.get_last_lr()[0]  # the rate this step trained with
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            took = timer.stop()

            step_tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum"))
            num_tokens += step_tokens
            loss_value = step_loss.item()
            first_loss = loss_value if first_loss is None else first_loss
            last_loss = loss_value
            window["loss"] += loss_value
            window["steps"] += 1
            window["tokens"] += step_tokens
            window["seconds"] += took
            window["correct"] += accelerator.reduce(correct, "sum").item()
            window["targets"] += step_targets
            done = step + 1
            metrics.advance()
            if done % config.logging_steps == 0 or done == steps:
                metrics.log(done, {
                    "loss": window["loss"] / window["steps"],
                    "learning_rate": step_lr,
                    "grad_norm": float(grad_norm),
                    "mean_token_accuracy": window["correct"] / max(window["targets"], 1),
                    "num_tokens": num_tokens,
                    "tokens_per_second": window["tokens"] / max(window["seconds"], 1e-9),
                    "epoch": done / plan.steps_per_epoch,
                    "elapsed_seconds": timer.elapsed,
                })
                window = dict.fromkeys(window, 0.0)
            save_now = config.save_steps > 0 and done % config.save_steps == 0 and done < steps
            if save_now or stop.requested:
                last_checkpoint = save_checkpoint(
                    accelerator, output_dir, done,
                    {"num_tokens": num_tokens, "elapsed_seconds": timer.elapsed},
                    save_total_limit=config.save_total_limit)
            if stop.requested:
                log(f"{stop.signal_name}: stopped after step {done}; checkpoint saved at {last_checkpoint}. "
                    f"Resume with --resume_from_checkpoint latest")
                stopped_early = True
                break
    metrics.close()

    unwrapped = accelerator.unwrap_model(scorer).model
    if not stopped_early:
        if accelerator.is_main_process:
            save_pretrained_model(unwrapped, tokenizer, output_dir)
            if config.use_peft and config.merge_adapter:
                save_pretrained_model(unwrapped, tokenizer, output_dir / "merged", merge_adapter=True)
            summary = {"steps": steps - start_step, "train_seconds": timer.elapsed, "num_tokens": num_tokens,
                       "tokens_per_second": num_tokens / max(timer.elapsed, 1e-9), "first_loss": first_loss,
                       "last_loss": last_loss, "peak_memory_bytes": peak_memory_bytes(),
                       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.wait_for_everyone()
        log(f"done: model in {output_dir}, metrics in {output_dir / 'metrics.jsonl'}")
    return SFTResult(output_dir=output_dir, model=unwrapped, steps=step + 1 if steps else 0,
                     last_loss=last_loss, stopped_early=stopped_early)
