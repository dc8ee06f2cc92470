"""Online DPO: `posttrain online-dpo` and `posttrain.online_dpo(OnlineDPOConfig(...))`.

Reads top to bottom: prompts → reward functions → policy + frozen reference → sampler → loop
(sample 2 completions per prompt → score → rank into a pair → DPO/IPO loss) → save.

Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback": the preference pairs
are not a fixed dataset but sampled from the current policy at every step and labelled by a
reward (functions and/or a reward model). For each prompt x, y_1, y_2 ~ π_θ(·|x); with scores
s_i = Σ_k w_k r_k(x, y_i) − penalty·[y_i has no stop token], the higher one is chosen y_w, the
other rejected y_l, and

    L_sigmoid = −log σ(β [(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))])
    L_ipo     = (h̄ − 1/(2β))²,  h̄ the same difference on AVERAGE (per-token) log-probs

A pair whose scores are equal carries no preference: it stays in the batch (and in the KL and
entropy metrics) but gets weight 0 in the loss and leaves the loss denominator (TRL labels the
first completion chosen instead, which trains on noise when a binary reward ties). The loss is the
mean over the untied pairs of the whole optimizer step on every process, so it does not depend on
how the step is split into micro-batches. The completions' ids are used exactly as sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.config import ConfigError, OnlineDPOConfig
from posttrain.engine.batching import BatchPlan, total_steps
from posttrain.engine.sequence_batches import batch_to_device
from posttrain.engine.session import TrainingSession
from posttrain.engine.setup import start_run

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class OnlineDPOResult:
    output_dir: Path
    model: Any
    steps: int
    last_loss: float | None
    stopped_early: bool


@dataclass
class StepPairs:
    """One optimizer step's pairs on this process: collated micro-batches (chosen rows first,
    then rejected) and the per-completion sums the step's metrics are made of."""

    micro_batches: list[dict]
    sums: dict[str, float]  # summed over this process's completions / pairs; averaged globally later
    per_fn: dict[str, tuple[float, float]]  # reward function -> (sum where applicable, count)


def rank_pairs(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chosen / rejected rows of each prompt's two completions, and which pairs are tied.

    scores (2P,): completions of prompt k are rows 2k and 2k+1 (the sampler's order).
    Returns chosen (P,), rejected (P,) long row indices and tied (P,) bool. The higher score is
    chosen; on a tie the first row is (arbitrarily) chosen and ``tied`` marks the pair.
    """
    if scores.dim() != 1 or scores.numel() % 2:
        raise ValueError(f"scores must be (2P,), got shape {tuple(scores.shape)}")
    first, second = scores[0::2], scores[1::2]
    first_wins = (first >= second).long()
    base = torch.arange(first.numel(), device=scores.device) * 2
    return base + 1 - first_wins, base + first_wins, first == second


def _pair_batch(prompt_ids: list[list[int]], chosen_ids: list[list[int]], rejected_ids: list[list[int]],
                pad_id: int) -> dict:
    """b pairs as 2b rows [chosen_0 … chosen_{b-1}, rejected_0 …]: the completions right-padded
    (2b, T) with `completion_mask`, and the b prompts once each, left-padded (`prefix_*`;
    `prefix_index` = [0 … b-1, 0 … b-1]), so a pair's prompt is run once for both completions
    (LogProbModel's SharedPrefix)."""
    b = len(prompt_ids)
    width = max(len(p) for p in prompt_ids)
    prefix_ids = torch.full((b, width), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros_like(prefix_ids)
    for i, p in enumerate(prompt_ids):
        prefix_ids[i, width - len(p):] = torch.tensor(p)
        prefix_mask[i, width - len(p):] = 1
    rows = list(chosen_ids) + list(rejected_ids)
    length = max(len(c) for c in rows)
    input_ids = torch.full((2 * b, length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, c in enumerate(rows):
        input_ids[i, : len(c)] = torch.tensor(c)  # the ids exactly as sampled (pitfall 17)
        attention[i, : len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": attention.clone(),
            "prefix_ids": prefix_ids, "prefix_mask": prefix_mask, "prefix_index": torch.arange(b).repeat(2)}


def _check_config(config: OnlineDPOConfig) -> None:
    if config.num_generations != 2:
        raise ConfigError(f"num_generations: online DPO samples exactly 2 completions per prompt, got "
                          f"{config.num_generations}")
    if config.loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type: {config.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not config.beta > 0:
        raise ConfigError(f"beta must be > 0, got {config.beta}")
    if not config.temperature > 0:
        raise ConfigError("temperature must be > 0: greedy decoding gives the same completion twice (no pair)")
    if config.missing_eos_penalty is not None and config.missing_eos_penalty < 0:
        raise ConfigError(f"missing_eos_penalty must be >= 0, got {config.missing_eos_penalty}")
    if config.precompute_ref_log_probs:
        raise ConfigError("precompute_ref_log_probs: online DPO samples new completions every step, so reference "
                          "log-probs cannot be computed in advance")


def online_dpo(config: OnlineDPOConfig, model=None, tokenizer=None, dataset=None, reward_funcs=None,
               ref_model=None) -> OnlineDPOResult:
    """Train `model` with online DPO on the prompts of `dataset` (default: config.dataset_name),
    ranked by `reward_funcs` (callables `fn(prompts, completions, **columns) -> list[float]`) plus
    those named in config.reward_funcs / config.reward_model_path. `ref_model` overrides the
    reference (separate weights); default: the starting policy (LoRA: the adapter disabled)."""
    from posttrain.engine.precision import autocast_reference
    from posttrain.losses.preference import get_preference_loss
    from posttrain.losses.reductions import masked_sum, upcast
    from posttrain.models.loading import load_causal_lm, model_load_kwargs
    from posttrain.models.logprobs import LogProbModel, SharedPrefix
    from posttrain.models.reference import ReferencePolicy, build_reference
    from posttrain.models.setup import prepare_model_for_training, resolve_tokenizer
    from posttrain.rollout.generation import make_backend, rollout_seeds
    from posttrain.rollout.prompts import load_prompts
    from posttrain.rollout.rewards import reward_functions_for, reward_inputs, score_completions

    _check_config(config)
    loss_fn = get_preference_loss(config.loss_type)
    accelerator = start_run(config)
    log = accelerator.print
    device = accelerator.device

    tokenizer = resolve_tokenizer(config, tokenizer)
    prompts = load_prompts(config, dataset, tokenizer, log)
    fns = reward_functions_for(config, reward_funcs)

    model = prepare_model_for_training(config, model, log)
    policy = LogProbModel(model, chunk_size=config.logprob_chunk_size)
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
        reference = ReferencePolicy("separate", LogProbModel(ref_model.to(device), chunk_size=config.logprob_chunk_size))
        log("reference: the model passed as ref_model (separate weights)")
    else:
        reference = build_reference(
            model, ref_model_name_or_path=config.ref_model_name_or_path,
            load=lambda p: load_causal_lm(p, **model_load_kwargs(config, p)),
            chunk_size=config.logprob_chunk_size, device=device, log=log)
    autocast_reference(reference, accelerator)  # the policy's autocast: KL 0 exactly at the start
    # the sampler gets the LogProbModel root, so under FSDP2 it can unshard it once per rollout
    backend = make_backend(config.generation_backend, policy, tokenizer, stop_tokens=config.stop_token or [])

    pairs_per_micro = config.per_device_train_batch_size
    # every prompt of the step on this process is sampled at once, then split into micro-batches
    plan = BatchPlan(units=[[i] for i in range(len(prompts))],
                     micro_batch_size=pairs_per_micro * config.gradient_accumulation_steps,
                     accumulation=1, world_size=accelerator.num_processes, seed=config.seed)
    plan.require_one_step()
    steps = total_steps(plan, config.max_steps, config.num_train_epochs)
    prompts_per_step = plan.units_per_step
    log("batch plan:\n"
        f"  {prompts_per_step} prompts x 2 completions = {prompts_per_step} pairs per optimizer step "
        f"({pairs_per_micro} pairs = {2 * pairs_per_micro} sequences per micro-batch x "
        f"{config.gradient_accumulation_steps} accumulation x {accelerator.num_processes} process(es))\n"
        f"  up to {2 * prompts_per_step * config.max_completion_length:,} completion tokens per step "
        f"(max_completion_length {config.max_completion_length})\n"
        f"  {len(prompts)} prompts; {plan.steps_per_epoch} steps per epoch; {steps} optimizer steps")

    def collect(step: int) -> StepPairs:
        """Sample two completions per prompt, score them, rank each pair, collate the micro-batches."""
        indices = plan.step_micro_batches(step, accelerator.process_index)[0]
        examples = [prompts[i] for i in indices]
        rollout = backend.generate([e.prompt_ids for e in examples], num_generations=2,
                                   max_completion_length=config.max_completion_length,
                                   temperature=config.temperature, top_p=config.top_p,
                                   top_k=config.top_k or None,
                                   seed=rollout_seeds(config.seed, step, accelerator.process_index * len(examples),
                                                      len(examples)))
        r_prompts, r_completions, columns = reward_inputs(examples, rollout, tokenizer)
        scored = score_completions(fns, config.reward_weights, r_prompts, r_completions, columns)
        has_eos = ~torch.tensor(rollout.truncated, dtype=torch.bool)
        scores = scored.total.float()
        if config.missing_eos_penalty is not None:
            scores = scores - config.missing_eos_penalty * (~has_eos).float()
        chosen, rejected, tied = rank_pairs(scores)
        # summed in fp64, so how the step is split over processes does not show in the metrics
        sums = {"objective/scores": float(scores.double().sum()),
                "objective/scores_margin": float((scores[chosen] - scores[rejected]).double().sum()),
                "objective/frac_tied_pairs": float(tied.sum()),
                "val/contain_eos_token": float(has_eos.sum()),
                "completions/mean_length": float(sum(rollout.completion_lengths))}
        per_fn = {name: (float(values[scored.applicable[name]].double().sum()), float(scored.applicable[name].sum()))
                  for name, values in scored.per_fn.items()}
        micro_batches = []
        for start in range(0, len(examples), pairs_per_micro):
            sl = slice(start, start + pairs_per_micro)
            batch = _pair_batch([rollout.prompt_ids[r] for r in chosen[sl].tolist()],
                                [rollout.completion_ids[r] for r in chosen[sl].tolist()],
                                [rollout.completion_ids[r] for r in rejected[sl].tolist()], tokenizer.pad_token_id)
            batch["pair_weights"] = (~tied[sl]).float()  # a tie teaches nothing
            micro_batches.append(batch_to_device(batch, device))
        return StepPairs(micro_batches, sums, per_fn)

    with TrainingSession(accelerator, config, policy, total_steps=steps, steps_per_epoch=plan.steps_per_epoch) as run:
        run.set_model_for_checkpoints(run.unwrapped().model, tokenizer)  # checkpoints load with from_pretrained
        for step in run.steps():
            pairs = collect(step)
            batches = pairs.micro_batches
            # global normalisers, over every micro-batch of the step on every process
            n_pairs = run.global_sum(sum(int(b["pair_weights"].sum()) for b in batches))
            n_all_pairs = run.global_sum(sum(len(b["pair_weights"]) for b in batches))
            step_loss = torch.zeros((), device=device)
            sums = {"objective/kl": 0.0, "objective/entropy": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0,
                    "rewards/margins": 0.0, "rewards/accuracies": 0.0, "logps/chosen": 0.0, "logps/rejected": 0.0}
            step_tokens = 0
            for k, batch in enumerate(batches):
                mask = batch["completion_mask"]  # (2b, T): entry t scores completion token t
                kwargs = {"attention_mask": batch["attention_mask"], "target_mask": mask,
                          "temperature": config.temperature,
                          "prefix": SharedPrefix(batch["prefix_ids"], batch["prefix_mask"], batch["prefix_index"])}
                with torch.no_grad(), accelerator.autocast():
                    ref_sums = masked_sum(reference.token_logps(run.unwrapped(), batch["input_ids"], **kwargs), mask, -1)
                with run.sync(k, len(batches)):
                    out = run.module(batch["input_ids"], with_entropy=True, **kwargs)
                    policy_sums = masked_sum(out["logps"], mask, -1)  # (2b,) chosen rows, then rejected
                    lengths = mask.sum(-1)
                    b = len(batch["pair_weights"])
                    pair = loss_fn(policy_sums[:b], policy_sums[b:], ref_sums[:b], ref_sums[b:], beta=config.beta,
                                   chosen_lengths=lengths[:b], rejected_lengths=lengths[b:])
                    weights = batch["pair_weights"]
                    loss = (pair.losses * weights).sum() / max(n_pairs, 1.0) * run.world_size
                    run.backward(loss)
                step_loss = step_loss + loss.detach() / run.world_size  # not +=: keeps a float64 run in float64
                detached = upcast(policy_sums.detach())
                chosen_r, rejected_r = upcast(pair.chosen_rewards), upcast(pair.rejected_rewards)
                sums["objective/kl"] += float((detached - upcast(ref_sums)).sum())
                sums["objective/entropy"] += float(masked_sum(upcast(out["entropy"].detach()), mask))
                # implicit-reward metrics over the pairs the loss trains on (ties have weight 0)
                sums["rewards/chosen"] += float((chosen_r * weights).sum())
                sums["rewards/rejected"] += float((rejected_r * weights).sum())
                sums["rewards/margins"] += float(((chosen_r - rejected_r) * weights).sum())
                # equal implicit rewards count half, so the untrained policy reads 0.5 (chance), as in dpo.py
                sums["rewards/accuracies"] += float((((chosen_r > rejected_r).float()
                                                      + 0.5 * (chosen_r == rejected_r).float()) * weights).sum())
                sums["logps/chosen"] += float((detached[:b] * weights).sum())
                sums["logps/rejected"] += float((detached[b:] * weights).sum())
                # tokens in the trained sequences, prompt included (each prompt is computed once)
                step_tokens += int(batch["attention_mask"].sum() + 2 * batch["prefix_mask"].sum())
            n_completions = 2 * n_all_pairs
            metrics = {}
            for key, value in sums.items():
                per_pair = key.startswith(("rewards/", "logps/"))
                metrics[key] = run.global_sum(value) / (max(n_pairs, 1.0) if per_pair else n_completions)
            metrics["objective/non_score_reward"] = -config.beta * metrics["objective/kl"]
            for key, value in pairs.sums.items():
                per_pair = key in ("objective/scores_margin", "objective/frac_tied_pairs")
                metrics[key] = run.global_sum(value) / (n_all_pairs if per_pair else n_completions)
            metrics["objective/rlhf_reward"] = metrics["objective/scores"] + metrics["objective/non_score_reward"]
            for name, (total, count) in pairs.per_fn.items():
                count = run.global_sum(count)
                metrics[f"rewards/{name}/mean"] = run.global_sum(total) / count if count else math.nan
            metrics["beta"] = config.beta
            stop = run.finish_step(step, loss=step_loss, tokens=step_tokens, metrics=metrics)
            backend.sync_weights(run.unwrapped())  # the sampler uses the updated weights (pitfall 15)
            if stop:
                break
        trained = run.unwrapped().model
        run.save_model(trained, tokenizer, merge_adapter=config.use_peft and config.merge_adapter)
    return OnlineDPOResult(output_dir=run.output_dir, model=trained, steps=run.steps_done, last_loss=run.last_loss,
                           stopped_early=run.stopped_early)
