"""Direct preference optimisation and its variants: `posttrain dpo` and `posttrain.dpo(DPOConfig(...))`.

Reads top to bottom: data → policy → reference → batch plan → loop → save.

For each pair, chosen and rejected go through the policy in ONE forward pass (2B sequences,
padded or padding-free); their completion log-probs are summed per sequence (averaged where the
variant says so) and compared with the reference's:

    L_sigmoid = -log σ(β [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])

(other variants in posttrain.losses.preference). The loss is the mean over every pair of the
optimizer step on every process, so it does not depend on how the step is split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import DPOConfig
from posttrain.engine.batching import BatchPlan, total_steps
from posttrain.engine.console import format_batch_plan
from posttrain.engine.sequence_batches import batch_to_device, scorer_kwargs, sequence_logps
from posttrain.engine.session import TrainingSession
from posttrain.engine.setup import start_run


@dataclass
class DPOResult:
    output_dir: Path
    model: Any
    steps: int
    last_loss: float | None
    stopped_early: bool
    eval_metrics: dict[str, float]


def _reference_logps_for(reference, policy_scorer, cached, indices, batch, device):
    """(2B,) reference sums for a batch: from the cache by example index, or a no-grad forward."""
    if cached is not None:
        idx = torch.tensor(indices)
        return torch.cat([cached["chosen"][idx], cached["rejected"][idx]]).to(device)
    logps = reference.token_logps(policy_scorer, batch["input_ids"], **scorer_kwargs(batch))
    return sequence_logps(logps, batch)[0]


def _precompute_reference(examples, reference, policy_scorer, *, pad_token_id, padding_free, device,
                          batch_size, cache_key_model, log) -> dict[str, torch.Tensor]:
    """Reference sums for every example, from the disk cache or computed once and cached."""
    from posttrain.data.preference_collate import collate_preference
    from posttrain.models.reference import (
        data_fingerprint,
        load_cached,
        reference_cache_path,
        save_cached,
    )

    seqs = [ids for e in examples for ids in (e.prompt_ids, e.chosen_ids, e.rejected_ids)]
    path = reference_cache_path(cache_key_model, data_fingerprint(seqs), {"kind": "dpo-pairs"})
    cached = load_cached(path)
    if cached is not None and cached["chosen"].numel() == len(examples):
        log(f"reference log-probs: loaded from cache {path}")
        return cached
    chosen, rejected = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = batch_to_device(collate_preference(chunk, pad_token_id=pad_token_id, padding_free=padding_free), device)
        sums = _reference_logps_for(reference, policy_scorer, None, None, batch, device)
        chosen.append(sums[: len(chunk)].float().cpu())
        rejected.append(sums[len(chunk):].float().cpu())
    cached = {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}
    save_cached(path, cached)
    log(f"reference log-probs: computed for {len(examples)} pairs and cached at {path}")
    return cached


def _pair_losses(config: DPOConfig, policy_sums, policy_counts, ref_sums, bco_delta: float):
    from posttrain.losses.preference import PreferenceLossParams, combine_preference_losses

    b = policy_sums.shape[0] // 2
    params = PreferenceLossParams(simpo_gamma=config.simpo_gamma, discopop_tau=config.discopop_tau,
                                  bco_delta=bco_delta)
    return combine_preference_losses(
        config.loss_type, config.loss_weights, policy_sums[:b], policy_sums[b:],
        None if ref_sums is None else ref_sums[:b], None if ref_sums is None else ref_sums[b:],
        beta=config.beta, chosen_lengths=policy_counts[:b], rejected_lengths=policy_counts[b:],
        label_smoothing=config.label_smoothing, params=params)


def _pair_metrics(out, policy_sums, policy_counts) -> dict[str, torch.Tensor]:
    """Sums over the pairs of a micro-batch (divided by the pair count of the step later)."""
    from posttrain.losses.reductions import upcast

    b = policy_sums.shape[0] // 2
    chosen_r, rejected_r = upcast(out.chosen_rewards), upcast(out.rejected_rewards)
    metrics = {
        "rewards/chosen": chosen_r.sum(),
        "rewards/rejected": rejected_r.sum(),
        "rewards/margins": (chosen_r - rejected_r).sum(),
        # ties count half, so an untrained policy (all rewards 0) reads 0.5 = chance, not 0
        "rewards/accuracies": ((chosen_r > rejected_r).float() + 0.5 * (chosen_r == rejected_r).float()).sum(),
        "logps/chosen": upcast(policy_sums[:b].detach()).sum(),
        "logps/rejected": upcast(policy_sums[b:].detach()).sum(),
    }
    if len(out.per_type) > 1:
        for name, values in out.per_type.items():
            metrics[f"loss/{name}"] = upcast(values.detach()).sum()
    return metrics


def dpo(config: DPOConfig, model=None, tokenizer=None, dataset=None, eval_dataset=None,
        ref_model=None) -> DPOResult:
    """Train `model` (default: config.model_name_or_path) on preference pairs with the DPO-family
    losses in `config.loss_type`. `ref_model` overrides the reference (separate weights)."""
    from posttrain.data.preference_collate import collate_preference
    from posttrain.data.preference_loading import load_preference_data
    from posttrain.engine.precision import autocast_reference
    from posttrain.losses.preference import REFERENCE_FREE_LOSSES, get_preference_loss
    from posttrain.models.loading import load_causal_lm, model_load_kwargs
    from posttrain.models.logprobs import LogProbModel, check_packing_support
    from posttrain.models.reference import ReferencePolicy, build_reference, weights_fingerprint
    from posttrain.models.setup import prepare_model_for_training, resolve_tokenizer

    for name in config.loss_type:
        get_preference_loss(name)  # an unknown name fails here, before any work
    needs_reference = not set(config.loss_type) <= REFERENCE_FREE_LOSSES
    accelerator = start_run(config)
    log = accelerator.print
    device = accelerator.device

    tokenizer = resolve_tokenizer(config, tokenizer)
    train, held_out = load_preference_data(config, tokenizer, dataset, eval_dataset, log=log)

    model = prepare_model_for_training(config, model, log)
    if config.padding_free:
        check_packing_support(model)
    policy = LogProbModel(model, chunk_size=config.logprob_chunk_size)

    def load_ref(path: str):
        return load_causal_lm(path, **model_load_kwargs(config, path))

    reference: ReferencePolicy | None = None
    if needs_reference:
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            reference = ReferencePolicy("separate", LogProbModel(ref_model.to(device),
                                                                 chunk_size=config.logprob_chunk_size))
            log("reference: the model passed as ref_model (separate weights)")
        else:
            reference = build_reference(model, ref_model_name_or_path=config.ref_model_name_or_path,
                                        load=load_ref, chunk_size=config.logprob_chunk_size,
                                        device=device, log=log)
    else:
        log(f"reference: none ({', '.join(config.loss_type)} is reference-free)")
    autocast_reference(reference, accelerator)  # the policy's autocast: ln 2 exactly at step 0

    pad_id = tokenizer.pad_token_id
    cached_train = cached_eval = None
    if reference is not None and config.precompute_ref_log_probs:
        policy.to(device)
        ref_weights = reference.scorer.model if reference.mode == "separate" else model
        key = weights_fingerprint(ref_weights) + f"|{reference.mode}|{accelerator.mixed_precision}"
        common = {"pad_token_id": pad_id, "padding_free": config.padding_free, "device": device,
                  "batch_size": config.per_device_eval_batch_size, "cache_key_model": key, "log": log}
        with accelerator.autocast():  # the policy is not prepared (autocast) yet
            cached_train = _precompute_reference(train, reference, policy, **common)
            if held_out:
                cached_eval = _precompute_reference(held_out, reference, policy, **common)
        del ref_weights  # else this name keeps the separate reference model alive
        if reference.mode == "separate":
            reference.scorer = None  # the cache replaces it: free its memory for training
            torch.cuda.empty_cache() if torch.cuda.is_available() else None

    plan = BatchPlan(units=[[i] for i in range(len(train))], micro_batch_size=config.per_device_train_batch_size,
                     accumulation=config.gradient_accumulation_steps, world_size=accelerator.num_processes,
                     seed=config.seed)
    plan.require_one_step()
    steps = total_steps(plan, config.max_steps, config.num_train_epochs)
    mean_tokens = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in train) / len(train)
    log(format_batch_plan(micro_batch_size=config.per_device_train_batch_size,
                          accumulation=config.gradient_accumulation_steps, world_size=accelerator.num_processes,
                          packing=False, max_length=config.max_length, steps=steps,
                          steps_per_epoch=plan.steps_per_epoch, unused_units=plan.unused_units_per_epoch,
                          mean_tokens_per_step=mean_tokens * plan.units_per_step, examples=len(train),
                          units=len(train)).replace("sequences", "pairs (2 sequences each, one forward)"))

    def evaluate(run: TrainingSession) -> dict[str, float]:
        """Implicit-reward preference accuracy and margins on the held-out pairs (no grad)."""
        if not held_out:
            return {}
        scorer = run.unwrapped()
        scorer.eval()
        totals: dict[str, float] = {}
        with torch.no_grad():
            for start in range(0, len(held_out), config.per_device_eval_batch_size):
                idx = list(range(start, min(start + config.per_device_eval_batch_size, len(held_out))))
                batch = batch_to_device(collate_preference([held_out[i] for i in idx], pad_token_id=pad_id,
                                                      padding_free=config.padding_free), device)
                sums, counts = sequence_logps(scorer(batch["input_ids"], **scorer_kwargs(batch))["logps"], batch)
                ref = None if reference is None else _reference_logps_for(reference, scorer, cached_eval, idx,
                                                                          batch, device)
                out = _pair_losses(config, sums, counts, ref, run.extra_state.get("bco_delta", 0.0))
                for key, value in {"loss": out.losses.sum(), **_pair_metrics(out, sums, counts)}.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
        scorer.train()
        return {f"eval/{k}": v / len(held_out) for k, v in totals.items()}

    eval_metrics: dict[str, float] = {}
    with TrainingSession(accelerator, config, policy, total_steps=steps, steps_per_epoch=plan.steps_per_epoch) as run:
        run.set_model_for_checkpoints(run.unwrapped().model, tokenizer)  # checkpoints load with from_pretrained
        if held_out and run.start_step == 0:
            run.metrics.log(0, evaluate(run))  # the baseline the run is judged against
        for step in run.steps():
            micro = plan.step_micro_batches(step, accelerator.process_index)
            step_pairs = run.global_sum(sum(len(mb) for mb in micro))  # the loss normaliser
            step_loss = torch.zeros((), device=device)
            sums_of: dict[str, torch.Tensor] = {}
            step_tokens = 0
            bco_delta = run.extra_state.get("bco_delta", 0.0)
            for k, indices in enumerate(micro):
                batch = batch_to_device(collate_preference([train[i] for i in indices], pad_token_id=pad_id,
                                                      padding_free=config.padding_free), device)
                with run.sync(k, len(micro)):
                    out_tok = run.module(batch["input_ids"], **scorer_kwargs(batch))
                    sums, counts = sequence_logps(out_tok["logps"], batch)
                    ref = None
                    if reference is not None:
                        ref = _reference_logps_for(reference, run.unwrapped(), cached_train, indices, batch,
                                                   device)
                    out = _pair_losses(config, sums, counts, ref, bco_delta)
                    loss = out.losses.sum() / step_pairs * run.world_size
                    run.backward(loss)
                step_loss = step_loss + loss.detach() / run.world_size  # not +=: keeps a float64 run in float64
                for key, value in _pair_metrics(out, sums, counts).items():
                    sums_of[key] = sums_of.get(key, 0.0) + value
                step_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            metrics = {key: run.global_sum(value) / step_pairs for key, value in sums_of.items()}
            if "bco_pair" in config.loss_type:
                # BCO's δ: running mean of every implicit reward seen so far (checkpointed for resume)
                seen = run.extra_state.get("bco_count", 0.0)
                batch_mean = (metrics["rewards/chosen"] + metrics["rewards/rejected"]) / 2
                run.extra_state["bco_delta"] = (bco_delta * seen + batch_mean * 2 * step_pairs) / (seen + 2 * step_pairs)
                run.extra_state["bco_count"] = seen + 2 * step_pairs
            stop = run.finish_step(step, loss=step_loss, tokens=step_tokens, metrics=metrics)
            if held_out:
                run.maybe_evaluate(step, config.eval_steps, lambda: evaluate(run))
            if stop:
                break
        if held_out:
            eval_metrics = run.final_evaluation(lambda: evaluate(run))
        trained = run.unwrapped().model
        run.save_model(trained, tokenizer, merge_adapter=config.use_peft and config.merge_adapter)
    return DPOResult(output_dir=run.output_dir, model=trained, steps=run.steps_done, last_loss=run.last_loss,
                     stopped_early=run.stopped_early, eval_metrics=eval_metrics)
