"""Group relative policy optimisation: `posttrain grpo` and `posttrain.grpo(GRPOConfig(...))`.

Reads top to bottom: prompts → reward functions → policy (+ reference when beta > 0) → sampler →
loop (generate → score → advantages → clipped policy loss [+ beta KL]) → save.

For each prompt, G = num_generations completions are sampled; with rewards r and group-relative
advantages A_i = (r_i - mean_group r) / std (per --scale_rewards), each completion token t gives

    l_t = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_t,
    rho_t = pi(y_t | ...) / pi_old(y_t | ...)

aggregated per --loss_type (grpo: per-sequence mean; dapo: token mean over the whole optimizer
step; dr_grpo: sum / (completions x max_completion_length); bnpo: each micro-batch's token mean,
averaged over the step's micro-batches on every process).
The completions' token ids are used exactly as sampled (never decoded and re-encoded); text is
decoded only for reward functions and logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import GRPOConfig
from posttrain.engine.batching import BatchPlan, total_steps
from posttrain.engine.gathering import rows_everywhere, scores_everywhere
from posttrain.engine.sequence_batches import batch_to_device
from posttrain.engine.session import TrainingSession
from posttrain.engine.setup import start_run
from posttrain.errors import CheckpointError


@dataclass
class GRPOResult:
    output_dir: Path
    model: Any
    steps: int
    last_loss: float | None
    stopped_early: bool


@dataclass
class StepRollouts:
    """One optimizer step's rollouts on this process, collated for the loss (kept for
    --num_iterations reuse)."""

    micro_batches: list[dict]  # per micro-batch: input_ids, attention_mask, completion_mask, advantages, ...
    metrics: dict[str, float]


def _restored_rollouts(extra_tensors: dict, step: int, num_iterations: int, device) -> StepRollouts:
    """The rollout a checkpoint saved mid-way through its --num_iterations passes."""
    saved = extra_tensors.get("rollout")
    if saved is None:
        raise CheckpointError(f"resuming at step {step}, inside a rollout's {num_iterations} passes "
                              "(--num_iterations), but the checkpoint holds no rollout")
    return StepRollouts([batch_to_device(b, device) for b in saved["micro_batches"]], dict(saved["metrics"]))


def _group_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> dict:
    """Completions right-padded (B, T), `completion_mask` marking the sampled tokens, and their
    distinct prompts once each, left-padded (`prefix_*`, with `prefix_index` (B,) row -> prompt):
    a group's prompt is run once for its G completions (LogProbModel's SharedPrefix)."""
    distinct: dict[tuple[int, ...], int] = {}
    index = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids]
    prompts = list(distinct)
    width = max(len(p) for p in prompts)
    prefix_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros_like(prefix_ids)
    for i, p in enumerate(prompts):
        prefix_ids[i, width - len(p):] = torch.tensor(p)
        prefix_mask[i, width - len(p):] = 1
    length = max(len(c) for c in completion_ids)
    input_ids = torch.full((len(completion_ids), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, c in enumerate(completion_ids):
        input_ids[i, : len(c)] = torch.tensor(c)  # the ids exactly as sampled (pitfall 17)
        attention[i, : len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": attention.clone(),
            "prefix_ids": prefix_ids, "prefix_mask": prefix_mask, "prefix_index": torch.tensor(index)}


def _scorer_kwargs(batch: dict, temperature: float) -> dict:
    """LogProbModel / reference keyword arguments for a group batch: entry t of the (B, T) result
    scores completion token t."""
    from posttrain.models.logprobs import SharedPrefix

    return {"attention_mask": batch["attention_mask"], "target_mask": batch["completion_mask"].bool(),
            "temperature": temperature,
            "prefix": SharedPrefix(batch["prefix_ids"], batch["prefix_mask"], batch["prefix_index"])}


def _sampler_step(config: GRPOConfig) -> tuple[int, int]:
    """(prompts per process per step, completions per micro-batch); whole groups per process."""
    per_process = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if per_process % config.num_generations:
        raise ValueError(
            f"per_device_train_batch_size x gradient_accumulation_steps = {per_process} completions per "
            f"process per step must be a multiple of --num_generations {config.num_generations} "
            "(each process samples whole groups)")
    return per_process // config.num_generations, config.per_device_train_batch_size


def _check_kl_and_penalty(config: GRPOConfig, method: str) -> None:
    """Where the KL goes and with which estimator (pitfall 26; losses/kl.py): a LOSS term is
    differentiated, so it needs an estimator whose gradient is a KL gradient (k2, k3: k1's
    expected gradient is 0); in the REWARD only its value counts (k1, k3: unbiased)."""
    from posttrain.config import ConfigError
    from posttrain.losses.kl import LOSS_KL_ESTIMATORS

    if config.kl_in not in ("loss", "reward"):
        raise ConfigError(f"--kl_in {config.kl_in!r}: expected loss or reward")
    if method == "rloo" and config.kl_in != "reward":
        raise ConfigError("RLOO folds the KL into the reward: --kl_in must be reward")
    if config.beta > 0 and config.kl_in == "loss" and config.kl_estimator not in LOSS_KL_ESTIMATORS:
        raise ConfigError(
            f"--kl_estimator {config.kl_estimator!r} cannot be a loss term (--kl_in loss): "
            + ("k1's expected gradient is zero, so the KL penalty would do nothing. " if config.kl_estimator == "k1" else "")
            + "Use k3 or k2 in the loss, or --kl_in reward with k1 or k3")
    if config.beta > 0 and config.kl_in == "reward" and config.kl_estimator not in ("k1", "k3"):
        raise ConfigError(f"--kl_estimator {config.kl_estimator!r} in the reward: expected k1 or k3 (unbiased)")
    if config.missing_eos_penalty is not None and config.missing_eos_penalty < 0:
        raise ConfigError(f"--missing_eos_penalty must be >= 0, got {config.missing_eos_penalty}")


def grpo(config: GRPOConfig, model=None, tokenizer=None, dataset=None, reward_funcs=None) -> GRPOResult:
    """Train `model` with GRPO on the prompts of `dataset` (default: config.dataset_name), rewarded
    by `reward_funcs` (callables `fn(prompts, completions, **columns) -> list[float]`) plus those
    named in config.reward_funcs / config.reward_model_path."""
    return train_on_groups(config, "grpo", model, tokenizer, dataset, reward_funcs)


def train_on_groups(config: GRPOConfig, method: str, model=None, tokenizer=None, dataset=None,
                    reward_funcs=None) -> GRPOResult:
    """The group-sampling loop shared by GRPO (`method="grpo"`: group-normalised advantages, KL
    as a per-token loss term or, with --kl_in reward, in the reward) and RLOO (`method="rloo"`:
    KL folded into the reward, leave-one-out baseline)."""
    from posttrain.engine.precision import autocast_reference
    from posttrain.losses.advantages import group_advantages, rloo_advantages
    from posttrain.losses.kl import kl_estimate
    from posttrain.losses.policy_gradient import aggregate_policy_loss, clipped_policy_loss
    from posttrain.losses.reductions import masked_sum
    from posttrain.models.dropout import eval_mode
    from posttrain.models.loading import load_causal_lm, model_load_kwargs
    from posttrain.models.logprobs import LogProbModel
    from posttrain.models.reference import build_reference
    from posttrain.models.setup import prepare_model_for_training, resolve_tokenizer
    from posttrain.rollout.generation import make_backend, rollout_seeds
    from posttrain.rollout.prompts import load_prompts
    from posttrain.rollout.rewards import reward_functions_for, reward_inputs, score_completions

    prompts_per_process, micro_size = _sampler_step(config)
    if config.loss_type not in ("grpo", "dr_grpo", "dapo", "bnpo"):
        raise ValueError(f"--loss_type {config.loss_type!r}: expected grpo, dr_grpo, dapo or bnpo")
    _check_kl_and_penalty(config, method)
    accelerator = start_run(config)
    log = accelerator.print
    device = accelerator.device

    tokenizer = resolve_tokenizer(config, tokenizer)
    prompts = load_prompts(config, dataset, tokenizer, log)
    fns = reward_functions_for(config, reward_funcs)

    model = prepare_model_for_training(config, model, log)
    policy = LogProbModel(model, chunk_size=config.logprob_chunk_size)
    reference = None
    if method == "rloo" and config.num_generations < 2:
        raise ValueError("RLOO needs --num_generations >= 2 (the baseline leaves one out)")
    if config.beta > 0:
        reference = build_reference(
            model, ref_model_name_or_path=config.ref_model_name_or_path,
            load=lambda p: load_causal_lm(p, **model_load_kwargs(config, p)),
            chunk_size=config.logprob_chunk_size, device=device, log=log)
    else:
        log("reference: none (--beta 0: no KL term, no reference model loaded)")
    autocast_reference(reference, accelerator)  # the policy's autocast: KL 0 exactly at the start
    # given the LogProbModel (the module accelerate prepares): under FSDP2 it is the root whose
    # shards the sampler gathers once per rollout (pitfall 28)
    backend = make_backend(config.generation_backend, policy, tokenizer, stop_tokens=config.stop_token or [])

    plan = BatchPlan(units=[[i] for i in range(len(prompts))], micro_batch_size=prompts_per_process,
                     accumulation=1, world_size=accelerator.num_processes, seed=config.seed)
    plan.require_one_step()
    generation_rounds = total_steps(plan, config.max_steps, config.num_train_epochs)
    steps = generation_rounds * config.num_iterations if config.max_steps <= 0 else config.max_steps
    completions_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    log("batch plan:\n"
        f"  {completions_per_step // config.num_generations} prompts x {config.num_generations} generations = "
        f"{completions_per_step} completions per optimizer step ({config.per_device_train_batch_size} per micro-batch "
        f"x {config.gradient_accumulation_steps} accumulation x {accelerator.num_processes} process(es))\n"
        f"  up to {completions_per_step * config.max_completion_length:,} completion tokens per step "
        f"(max_completion_length {config.max_completion_length}); each rollout is trained on "
        f"{config.num_iterations} time(s)\n"
        f"  {len(prompts)} prompts; {plan.steps_per_epoch} rollouts per epoch; {steps} optimizer steps")

    def collect(run: TrainingSession, step: int) -> StepRollouts:
        """Sample this step's completions, score them, compute advantages and the fixed log-probs."""
        indices = plan.step_micro_batches(step // config.num_iterations, accelerator.process_index)[0]
        examples = [prompts[i] for i in indices]
        rollout = backend.generate([e.prompt_ids for e in examples], num_generations=config.num_generations,
                                   max_completion_length=config.max_completion_length,
                                   temperature=config.temperature, top_p=config.top_p,
                                   top_k=config.top_k or None,
                                   seed=rollout_seeds(config.seed, step, accelerator.process_index * len(examples),
                                                      len(examples)))
        r_prompts, r_completions, columns = reward_inputs(examples, rollout, tokenizer)
        scores = score_completions(fns, config.reward_weights, r_prompts, r_completions, columns)
        rewards = scores.total.float()
        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float)
        truncated = torch.tensor(rollout.truncated, dtype=torch.bool)
        if config.missing_eos_penalty is not None:
            # a cut completion is scored as if it had ended (a reward model sees the chat template
            # close the turn), so it pays the penalty instead (TRL's missing_eos_penalty)
            rewards = rewards - config.missing_eos_penalty * truncated.float()
        # logged over the whole step: every process's completions, not this one's
        groups = rows_everywhere(accelerator, rewards).view(-1, config.num_generations)
        metrics = {**scores_everywhere(accelerator, scores).metrics(),
                   "reward_std": groups.std(dim=1).mean().item() if config.num_generations > 1 else 0.0,
                   "frac_reward_zero_std": (groups.std(dim=1) == 0).float().mean().item()
                   if config.num_generations > 1 else 1.0,
                   "completions/mean_length": rows_everywhere(accelerator, lengths).mean().item(),
                   "completions/clipped_ratio": rows_everywhere(accelerator, truncated).float().mean().item()}
        micro_batches, slices = [], []
        for start in range(0, len(rollout), micro_size):
            sl = slice(start, start + micro_size)
            batch = _group_batch(rollout.prompt_ids[sl], rollout.completion_ids[sl], tokenizer.pad_token_id)
            if config.mask_truncated_completions:
                # a cut completion has no ending to judge: out of the loss AND its denominator
                batch["completion_mask"][truncated[sl]] = 0
            batch = batch_to_device(batch, device)
            with torch.no_grad():
                kwargs = _scorer_kwargs(batch, config.temperature)
                if config.num_iterations > 1 or method == "rloo" or (config.kl_in == "reward" and reference is not None):
                    # the sampling policy's log-probs, fixed for every pass over this rollout; in
                    # eval mode: "old" is the policy itself, not one dropout draw of it (pitfall 25)
                    with eval_mode(run.unwrapped()):
                        batch["old_logps"] = run.unwrapped()(batch["input_ids"], **kwargs)["logps"]
                if reference is not None:
                    batch["ref_logps"] = reference.token_logps(run.unwrapped(), batch["input_ids"], **kwargs)
            micro_batches.append(batch)
            slices.append(sl)
        if config.kl_in == "reward":
            # the KL of the sampling policy, summed over the completion, folded into the reward
            # (RLOO always; GRPO with --kl_in reward): only its value counts, so k1 is fine here
            seq_kl = torch.cat([masked_sum(kl_estimate(b["old_logps"], b["ref_logps"], config.kl_estimator,
                                                       mask=b["completion_mask"]), b["completion_mask"], -1).cpu()
                                for b in micro_batches]) if reference is not None else torch.zeros_like(rewards)
            rewards = rewards - config.beta * seq_kl
            metrics.update({"kl": rows_everywhere(accelerator, seq_kl).mean().item(),
                            "rlhf_reward": rows_everywhere(accelerator, rewards).mean().item()})
        # a completion with no reward at all (every function returned None) gets advantage 0 and
        # stays out of its group's baseline (pitfall 31)
        valid = scores.valid
        if method == "rloo":
            # the leave-one-out baseline: A_i = r_i - mean_{j != i} r_j
            advantages = rloo_advantages(rewards, config.num_generations, valid=valid)
        elif config.scale_rewards == "batch":
            # the std over the whole step on every process; the mean stays per group
            gathered = accelerator.gather(rewards.to(device)).float().cpu()
            if valid is not None and not valid.all():
                gathered = gathered[rows_everywhere(accelerator, valid)]
            std = gathered.std() if gathered.numel() > 1 else torch.zeros(())
            advantages = group_advantages(rewards, config.num_generations, scale="none", valid=valid) / (std + 1e-4)
        else:
            advantages = group_advantages(rewards, config.num_generations, scale=config.scale_rewards, valid=valid)
        for batch, sl in zip(micro_batches, slices):
            batch["advantages"] = advantages[sl].to(device)
        return StepRollouts(micro_batches, metrics)

    current: StepRollouts | None = None
    with TrainingSession(accelerator, config, policy, total_steps=steps,
                         steps_per_epoch=plan.steps_per_epoch * config.num_iterations) as run:
        run.set_model_for_checkpoints(run.unwrapped().model, tokenizer)  # checkpoints load with from_pretrained
        for step in run.steps():
            if current is None and step % config.num_iterations != 0:
                # resumed between two passes over one rollout: the checkpoint carries it
                current = _restored_rollouts(run.extra_tensors, step, config.num_iterations, device)
            elif current is None or step % config.num_iterations == 0:
                current = collect(run, step)
                if config.num_iterations > 1:  # later passes reuse it, so a checkpoint must too
                    run.extra_tensors["rollout"] = {"micro_batches": current.micro_batches,
                                                    "metrics": current.metrics}
            batches = current.micro_batches
            # global normalisers, over every micro-batch of the step on every process
            n_tokens = run.global_sum(sum(float(b["completion_mask"].sum()) for b in batches))
            # a completion masked out (e.g. truncated) leaves every denominator too (pitfall 16)
            n_seqs = run.global_sum(sum(int(b["completion_mask"].any(-1).sum()) for b in batches))
            step_loss = torch.zeros((), device=device)
            sums = {"kl": 0.0, "entropy": 0.0, "clip_ratio/low": 0.0, "clip_ratio/high": 0.0}
            step_tokens = 0
            for k, batch in enumerate(batches):
                mask = batch["completion_mask"].float()
                with run.sync(k, len(batches)):
                    out = run.module(batch["input_ids"], with_entropy=True, **_scorer_kwargs(batch, config.temperature))
                    logps = out["logps"]
                    old = batch.get("old_logps", logps.detach())  # one pass: ratio == 1 exactly
                    per_token, stats = clipped_policy_loss(logps, old, batch["advantages"], mask,
                                                           epsilon_low=config.epsilon, epsilon_high=config.epsilon_high)
                    if reference is not None and config.kl_in == "loss":  # else the KL is in the reward
                        kl = kl_estimate(logps, batch["ref_logps"], config.kl_estimator, mask=mask)
                        per_token = per_token + config.beta * kl
                        sums["kl"] += float((kl.detach() * mask).sum())
                    loss = aggregate_policy_loss(
                        per_token, mask, loss_type=config.loss_type, max_completion_length=config.max_completion_length,
                        num_items_in_batch=max(n_tokens, 1.0), num_sequences_in_batch=max(n_seqs, 1.0))
                    if config.loss_type == "bnpo":
                        # the mean of each micro-batch's token mean over the step's K x W micro-batches:
                        # 1/K here, 1/W from DDP's gradient average (TRL's bnpo); never x world size
                        loss = loss / len(batches)
                    else:
                        loss = loss * run.world_size  # a global normaliser; DDP averages gradients
                    run.backward(loss)
                step_loss = step_loss + loss.detach() / run.world_size  # not +=: keeps a float64 run in float64
                sums["entropy"] += float(masked_sum(out["entropy"], mask))
                sums["clip_ratio/low"] += float((stats["clipped_low"].float() * mask).sum())
                sums["clip_ratio/high"] += float((stats["clipped_high"].float() * mask).sum())
                # tokens in the trained sequences, prompt included (each prompt is computed once)
                step_tokens += int(batch["attention_mask"].sum() + batch["prefix_mask"].sum(-1)[batch["prefix_index"]].sum())
            metrics = {key: run.global_sum(v) / max(n_tokens, 1) for key, v in sums.items()}
            if reference is None or config.kl_in == "reward":
                metrics.pop("kl")
            metrics.update(current.metrics)
            if (step + 1) % config.num_iterations == 0:
                run.extra_tensors.pop("rollout", None)  # its last pass: a checkpoint here need not carry it
            stop = run.finish_step(step, loss=step_loss, tokens=step_tokens, metrics=metrics)
            backend.sync_weights(run.unwrapped())  # the sampler uses the updated weights (pitfall 15)
            if stop:
                break
        trained = run.unwrapped().model
        run.save_model(trained, tokenizer, merge_adapter=config.use_peft and config.merge_adapter)
    return GRPOResult(output_dir=run.output_dir, model=trained, steps=run.steps_done, last_loss=run.last_loss,
                      stopped_early=run.stopped_early)

