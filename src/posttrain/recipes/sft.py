"""Supervised fine-tuning: `posttrain sft` and `posttrain.sft(SFTConfig(...))`.

Reads top to bottom: data → model → batch plan → optimisation loop → save.

Loss (token-mean over the whole optimizer step, so it does not depend on how the step is split
into micro-batches or processes):

    L = -(1 / N_step) * sum_{sequences in step} sum_t m_t * log p(x_t | x_<t)

where m_t is the completion mask and N_step = sum m_t over every micro-batch of the step on every
process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import SFTConfig
from posttrain.engine.batching import BatchPlan, total_steps
from posttrain.engine.console import format_batch_plan
from posttrain.engine.session import TrainingSession
from posttrain.engine.setup import start_run


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
    from posttrain.models.logprobs import LogProbModel, check_packing_support
    from posttrain.models.setup import prepare_model_for_training, resolve_tokenizer

    if config.packing and not config.max_length:
        raise ValueError("--packing needs --max_length (the length of a packed row)")
    padding_free = config.packing or config.padding_free
    accelerator = start_run(config)
    log = accelerator.print

    # Data: validated and tokenised before any model is loaded, so bad rows cost no compute.
    tokenizer = resolve_tokenizer(config, tokenizer)
    examples = _load_data(config, tokenizer, dataset, log)

    model = prepare_model_for_training(config, model, log)
    if padding_free:
        check_packing_support(model)

    # Batch plan: which examples make up each micro-batch of each optimizer step.
    plan = BatchPlan(units=_build_units(examples, config), micro_batch_size=config.per_device_train_batch_size,
                     accumulation=config.gradient_accumulation_steps, world_size=accelerator.num_processes,
                     seed=config.seed)
    plan.require_one_step()
    steps = total_steps(plan, config.max_steps, config.num_train_epochs)
    mean_tokens = sum(len(e.input_ids) for e in examples) / len(plan.units) * plan.units_per_step
    log(format_batch_plan(micro_batch_size=config.per_device_train_batch_size,
                          accumulation=config.gradient_accumulation_steps, world_size=accelerator.num_processes,
                          packing=config.packing, max_length=config.max_length, steps=steps,
                          steps_per_epoch=plan.steps_per_epoch, unused_units=plan.unused_units_per_epoch,
                          mean_tokens_per_step=mean_tokens, examples=len(examples), units=len(plan.units)))

    scorer = LogProbModel(model, chunk_size=config.logprob_chunk_size)
    with TrainingSession(accelerator, config, scorer, total_steps=steps,
                         steps_per_epoch=plan.steps_per_epoch) as run:
        run.set_model_for_checkpoints(run.unwrapped().model, tokenizer)  # checkpoints load with from_pretrained
        for step in run.steps():
            micro_batches = [
                _examples_to_batch([examples[i] for i in mb], padding_free, tokenizer.pad_token_id, accelerator.device)
                for mb in plan.step_micro_batches(step, accelerator.process_index)
            ]
            # The normaliser is the number of target tokens in the whole optimizer step, on every process.
            step_targets = run.global_sum(sum(int(b["completion_mask"][:, 1:].sum()) for b in micro_batches))
            step_loss = torch.zeros((), device=accelerator.device)
            correct = torch.zeros((), device=accelerator.device)
            step_tokens = 0
            for k, batch in enumerate(micro_batches):
                with run.sync(k, len(micro_batches)):
                    target_mask = batch["completion_mask"][:, 1:]
                    out = run.module(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                     position_ids=batch.get("position_ids"), target_mask=target_mask,
                                     with_accuracy=True)
                    mask = target_mask.to(out["logps"].dtype)
                    # DDP averages gradients over processes; x world turns that back into the global sum.
                    loss = sft_nll_loss(out["logps"], mask, normalizer=step_targets) * run.world_size
                    run.backward(loss)
                step_loss = step_loss + loss.detach() / run.world_size  # not +=: keeps a float64 run in float64
                correct += (out["correct"].float() * mask).sum()
                step_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            accuracy = run.global_sum(correct) / max(step_targets, 1)
            if run.finish_step(step, loss=step_loss, tokens=step_tokens,
                               metrics={"mean_token_accuracy": accuracy, "num_loss_tokens": step_targets}):
                break
        trained = run.unwrapped().model
        run.save_model(trained, tokenizer, merge_adapter=config.use_peft and config.merge_adapter)
    return SFTResult(output_dir=run.output_dir, model=trained, steps=run.steps_done, last_loss=run.last_loss,
                     stopped_early=run.stopped_early)
