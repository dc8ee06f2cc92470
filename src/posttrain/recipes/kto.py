"""KTO on unpaired desirable / undesirable completions: `posttrain kto` and `posttrain.kto(KTOConfig(...))`.

Reads top to bottom: data → policy → reference → mismatched KL pairs → loop → save.

With r = log π(y|x) − log π_ref(y|x) (summed completion log-probs) and the reference point
z₀ = max(0, E[log π(y'|x) − log π_ref(y'|x)]) estimated on MISMATCHED pairs (x, y'):

    desirable:   λ_D (1 − σ(β (r − z₀)))        undesirable:   λ_U (1 − σ(β (z₀ − r)))

Each example's mismatched partner is fixed once (a seeded derangement of the training set), so
z₀ is the mean over the examples of the whole optimizer step on every process: the loss does not
depend on how the step is split into micro-batches or processes, and the reference log-probs of
both the examples and their partners can be cached per example.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from posttrain.config import KTOConfig
from posttrain.engine.batching import BatchPlan, total_steps
from posttrain.engine.console import format_batch_plan
from posttrain.engine.sequence_batches import batch_to_device, scorer_kwargs, sequence_logps
from posttrain.engine.session import TrainingSession
from posttrain.engine.setup import start_run


@dataclass
class KTOResult:
    output_dir: Path
    model: Any
    steps: int
    last_loss: float | None
    stopped_early: bool
    eval_metrics: dict[str, float]


def derangement(n: int, seed: int) -> list[int]:
    """partner[i] != i for every i when n > 1: a cycle through a seeded random order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = [0] * n
    for k in range(n):
        partner[order[k]] = order[(k + 1) % n]
    return partner


def mismatched_pairs(examples: list, seed: int, max_length: int | None) -> list:
    """Example i's prompt with the completion of its partner (a seeded derangement), cut so
    prompt + completion fits max_length."""
    out = []
    for ex, j in zip(examples, derangement(len(examples), seed)):
        completion = examples[j].completion_ids
        if max_length:
            completion = completion[: max(1, max_length - len(ex.prompt_ids))]
        out.append(replace(ex, completion_ids=completion))
    return out


def kto(config: KTOConfig, model=None, tokenizer=None, dataset=None, eval_dataset=None, ref_model=None) -> KTOResult:
    """Train `model` with the KTO loss on (prompt, completion, label) rows (or preference pairs,
    unpaired: chosen = desirable, rejected = undesirable)."""
    from posttrain.data.preference_collate import collate_unpaired
    from posttrain.data.preference_loading import load_preference_data
    from posttrain.engine.precision import autocast_reference
    from posttrain.losses.kto import kto_loss
    from posttrain.models.dropout import eval_mode
    from posttrain.models.loading import load_causal_lm, model_load_kwargs
    from posttrain.models.logprobs import LogProbModel, check_packing_support
    from posttrain.models.reference import ReferencePolicy, build_reference
    from posttrain.models.setup import prepare_model_for_training, resolve_tokenizer

    accelerator = start_run(config)
    log = accelerator.print
    device = accelerator.device
    tokenizer = resolve_tokenizer(config, tokenizer)
    train, held_out = load_preference_data(config, tokenizer, dataset, eval_dataset, unpaired=True, log=log)
    n_good = sum(e.label for e in train)
    log(f"kto: {n_good} desirable, {len(train) - n_good} undesirable training examples; "
        f"weights desirable {config.desirable_weight}, undesirable {config.undesirable_weight}")
    train_kl = mismatched_pairs(train, config.seed, config.max_length)
    eval_kl = mismatched_pairs(held_out, config.seed, config.max_length) if held_out else []

    model = prepare_model_for_training(config, model, log)
    if config.padding_free:
        check_packing_support(model)
    policy = LogProbModel(model, chunk_size=config.logprob_chunk_size)
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
        reference = ReferencePolicy("separate", LogProbModel(ref_model.to(device), chunk_size=config.logprob_chunk_size))
    else:
        reference = build_reference(
            model, ref_model_name_or_path=config.ref_model_name_or_path,
            load=lambda p: load_causal_lm(p, **model_load_kwargs(config, p)),
            chunk_size=config.logprob_chunk_size, device=device, log=log)
    autocast_reference(reference, accelerator)  # the policy's autocast: the identity holds exactly
    pad_id = tokenizer.pad_token_id

    def collate(examples):
        return batch_to_device(collate_unpaired(examples, pad_token_id=pad_id, padding_free=config.padding_free), device)

    def ref_sums(batch, scorer):
        return sequence_logps(reference.token_logps(scorer, batch["input_ids"], **scorer_kwargs(batch)), batch)[0]

    cached: dict[str, torch.Tensor] | None = None
    if config.precompute_ref_log_probs:
        with accelerator.autocast():  # the policy is not prepared (autocast) yet
            cached = _precompute(train, train_kl, held_out, eval_kl, reference, policy.to(device), collate,
                                 ref_sums, config, log, accelerator.mixed_precision)
        if reference.mode == "separate":
            reference.scorer = None  # the cache replaces it

    def reference_of(split: str, indices, batch, kl_batch, scorer):
        if cached is not None:
            idx = torch.tensor(indices)
            return cached[f"{split}"][idx].to(device), cached[f"{split}_kl"][idx].to(device)
        return ref_sums(batch, scorer), ref_sums(kl_batch, scorer)

    plan = BatchPlan(units=[[i] for i in range(len(train))], micro_batch_size=config.per_device_train_batch_size,
                     accumulation=config.gradient_accumulation_steps, world_size=accelerator.num_processes,
                     seed=config.seed)
    plan.require_one_step()
    steps = total_steps(plan, config.max_steps, config.num_train_epochs)
    mean_tokens = sum(len(e.prompt_ids) + len(e.completion_ids) for e in train) / len(train)
    log(format_batch_plan(micro_batch_size=config.per_device_train_batch_size,
                          accumulation=config.gradient_accumulation_steps, world_size=accelerator.num_processes,
                          packing=False, max_length=config.max_length, steps=steps,
                          steps_per_epoch=plan.steps_per_epoch, unused_units=plan.unused_units_per_epoch,
                          mean_tokens_per_step=2 * mean_tokens * plan.units_per_step, examples=len(train),
                          units=len(train)).replace("sequences", "examples (+ a mismatched KL pair each)"))

    def step_kl(micro, examples, kl_examples, split, scorer, global_sum) -> tuple[float, list]:
        """z₀ over all of a step's examples (no grad): the mean policy − reference log-prob of their
        mismatched pairs, clamped at 0; also returns each micro-batch's batches and reference sums."""
        prepared, total, count = [], 0.0, 0
        with torch.no_grad(), eval_mode(scorer):  # a reference point, not one dropout draw (pitfall 25)
            for indices in micro:
                batch = collate([examples[i] for i in indices])
                kl_batch = collate([kl_examples[i] for i in indices])
                ref, ref_kl = reference_of(split, indices, batch, kl_batch, scorer)
                policy_kl = sequence_logps(scorer(kl_batch["input_ids"], **scorer_kwargs(kl_batch))["logps"],
                                            kl_batch)[0]
                total += float((policy_kl - ref_kl).sum())
                count += len(indices)
                prepared.append((indices, batch, ref))
        return max(0.0, global_sum(total) / max(global_sum(count), 1)), prepared

    def example_metrics(rewards, labels, logps) -> dict[str, torch.Tensor]:
        good, bad = labels.float(), (~labels).float()
        return {"rewards/chosen_sum": (rewards * good).sum(), "rewards/rejected_sum": (rewards * bad).sum(),
                "logps/chosen_sum": (logps.detach() * good).sum(), "logps/rejected_sum": (logps.detach() * bad).sum(),
                "count/chosen": good.sum(), "count/rejected": bad.sum()}

    def finalize(sums: dict[str, float], kl: float) -> dict[str, float]:
        nc, nr = max(sums["count/chosen"], 1), max(sums["count/rejected"], 1)
        out = {"kl": kl, "rewards/chosen": sums["rewards/chosen_sum"] / nc,
               "rewards/rejected": sums["rewards/rejected_sum"] / nr,
               "logps/chosen": sums["logps/chosen_sum"] / nc, "logps/rejected": sums["logps/rejected_sum"] / nr,
               "count/chosen": sums["count/chosen"], "count/rejected": sums["count/rejected"]}
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    def evaluate(run: TrainingSession) -> dict[str, float]:
        if not held_out:
            return {}
        scorer = run.unwrapped()
        scorer.eval()
        micro = [list(range(s, min(s + config.per_device_eval_batch_size, len(held_out))))
                 for s in range(0, len(held_out), config.per_device_eval_batch_size)]
        z, prepared = step_kl(micro, held_out, eval_kl, "eval", scorer, lambda v: v)
        sums: dict[str, float] = {"loss": 0.0}
        with torch.no_grad():
            for _indices, batch, ref in prepared:
                logps = sequence_logps(scorer(batch["input_ids"], **scorer_kwargs(batch))["logps"], batch)[0]
                losses, rewards = kto_loss(logps, ref, batch["labels"], z, beta=config.beta,
                                           desirable_weight=config.desirable_weight,
                                           undesirable_weight=config.undesirable_weight)
                sums["loss"] += float(losses.sum())
                for k, v in example_metrics(rewards, batch["labels"], logps).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        scorer.train()
        return {f"eval/{k}": v for k, v in {"loss": sums["loss"] / len(held_out), **finalize(sums, z)}.items()}

    eval_metrics: dict[str, float] = {}
    with TrainingSession(accelerator, config, policy, total_steps=steps, steps_per_epoch=plan.steps_per_epoch) as run:
        run.set_model_for_checkpoints(run.unwrapped().model, tokenizer)  # checkpoints load with from_pretrained
        if held_out and run.start_step == 0:
            run.metrics.log(0, evaluate(run))
        for step in run.steps():
            micro = plan.step_micro_batches(step, accelerator.process_index)
            z, prepared = step_kl(micro, train, train_kl, "train", run.unwrapped(), run.global_sum)
            step_examples = run.global_sum(sum(len(m) for m in micro))
            step_loss = torch.zeros((), device=device)
            sums: dict[str, torch.Tensor] = {}
            step_tokens = 0
            for k, (_indices, batch, ref) in enumerate(prepared):
                with run.sync(k, len(prepared)):
                    logps = sequence_logps(run.module(batch["input_ids"], **scorer_kwargs(batch))["logps"], batch)[0]
                    losses, rewards = kto_loss(logps, ref, batch["labels"], z, beta=config.beta,
                                               desirable_weight=config.desirable_weight,
                                               undesirable_weight=config.undesirable_weight)
                    loss = losses.sum() / step_examples * run.world_size
                    run.backward(loss)
                step_loss = step_loss + loss.detach() / run.world_size  # not +=: keeps a float64 run in float64
                for key, value in example_metrics(rewards, batch["labels"], logps).items():
                    sums[key] = sums.get(key, 0.0) + value
                step_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            metrics = finalize({key: run.global_sum(v) for key, v in sums.items()}, z)
            stop = run.finish_step(step, loss=step_loss, tokens=step_tokens, metrics=metrics)
            if held_out:
                run.maybe_evaluate(step, config.eval_steps, lambda: evaluate(run))
            if stop:
                break
        if held_out:
            eval_metrics = run.final_evaluation(lambda: evaluate(run))
        trained = run.unwrapped().model
        run.save_model(trained, tokenizer, merge_adapter=config.use_peft and config.merge_adapter)
    return KTOResult(output_dir=run.output_dir, model=trained, steps=run.steps_done, last_loss=run.last_loss,
                     stopped_early=run.stopped_early, eval_metrics=eval_metrics)


def _precompute(train, train_kl, held_out, eval_kl, reference, policy, collate, ref_sums, config, log, precision):
    """Reference sums of every example and of its mismatched pair, cached on disk."""
    from posttrain.models.reference import (
        data_fingerprint,
        load_cached,
        reference_cache_path,
        save_cached,
        weights_fingerprint,
    )

    ref_weights = reference.scorer.model if reference.mode == "separate" else policy.model
    seqs = [ids for group in (train, train_kl, held_out, eval_kl) for e in group for ids in (e.prompt_ids, e.completion_ids)]
    path = reference_cache_path(weights_fingerprint(ref_weights) + f"|{reference.mode}|{precision}",
                                data_fingerprint(seqs),
                                {"kind": "kto", "sizes": [len(train), len(held_out)]})
    cached = load_cached(path)
    if cached is not None:
        log(f"reference log-probs: loaded from cache {path}")
        return cached
    out = {}
    for name, group in (("train", train), ("train_kl", train_kl), ("eval", held_out), ("eval_kl", eval_kl)):
        sums = []
        for s in range(0, len(group), config.per_device_eval_batch_size):
            sums.append(ref_sums(collate(group[s:s + config.per_device_eval_batch_size]), policy).cpu())
        out[name] = torch.cat(sums) if sums else torch.zeros(0)
    save_cached(path, out)
    log(f"reference log-probs: computed for {len(train) + len(held_out)} examples and their KL pairs, cached at {path}")
    return out
