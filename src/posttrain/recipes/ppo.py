"""PPO with a critic, the classic RLHF step: `posttrain ppo` and `posttrain.ppo(PPOConfig(...))`.

Reads top to bottom: prompts → reward functions (a reward model and/or functions) → policy,
critic, reference → sampler → loop → save. One step is one PPO iteration:

1. sample `num_generations` completions per prompt (ids kept exactly as sampled);
2. score each completion s (the reward model at its last real token; minus --missing_eos_penalty
   when it ended without a stop token) and compute, with no gradient, the sampling policy's
   log-probs, the reference's and the critic's values — in exactly the micro-batches the first
   PPO epoch trains on, so the first mini-batch's ratio is exactly 1;
3. per-token rewards r_t = -kl_coef * KL_t + [t = last token] * s (KL by --kl_estimator),
   optionally whitened (--whiten_rewards); GAE advantages and returns (--gamma, --lam); the
   advantages whitened over the rollout;
4. num_ppo_epochs passes, each shuffled into num_mini_batches mini-batches, one optimizer update
   per mini-batch on the token mean over the mini-batch of

       l_t = -min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t)
             + vf_coef * 1/2 max((V_t - R_t)^2, (clip(V_t, V_old-c, V_old+c) - R_t)^2)

   (eps = --cliprange, c = --cliprange_value); policy and critic share one optimizer.

The LR schedule advances once per iteration; metrics are logged per iteration (averages over its
updates). Math lives in posttrain.losses; the critic in posttrain.models.value_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.config import PPOConfig
from posttrain.engine.batching import BatchPlan, total_steps
from posttrain.engine.gathering import own_rows, rows_everywhere, scores_everywhere
from posttrain.engine.sequence_batches import batch_to_device
from posttrain.engine.session import TrainingSession
from posttrain.engine.setup import start_run


@dataclass
class PPOResult:
    output_dir: Path
    model: Any  # the trained policy (HF or peft causal LM)
    value_model: Any  # the trained critic: a ValueModel (separate) or a ValueHead (on the policy)
    steps: int
    last_loss: float | None
    stopped_early: bool


@dataclass
class PPORollout:
    """One iteration's completions on this process. Per-token tensors are completion-aligned:
    (N, C), entry [i, j] = completion token j of row i, C = the longest completion."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    mask: Tensor  # (N, C) bool: a real completion token
    old_logps: Tensor  # (N, C) the sampling policy's log-probs (temperature-scaled, as trained)
    old_values: Tensor  # (N, C) the critic's values at rollout time
    advantages: Tensor  # (N, C) GAE, whitened
    returns: Tensor  # (N, C) GAE returns (targets of the value loss)
    first_order: Tensor  # (N,) the row order of PPO epoch 0 (the rollout was scored in its micro-batches)
    metrics: dict[str, float]


# ---------------------------------------------------------------- completion <-> sequence layout


def _completion_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> dict:
    """Right-padded rows prompt + completion (ids as sampled); completion_mask marks the completion."""
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        completion[i, len(p): len(p) + len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def _completion_positions(prompt_ids: list[list[int]], completion_ids: list[list[int]],
                          width: int) -> tuple[Tensor, Tensor]:
    """Where completion token j of row i sits in LogProbModel's (B, T-1) outputs (entry t scores
    token t+1): index p_i - 1 + j, valid for j < len(completion_i). Both (B, width)."""
    j = torch.arange(width)
    starts = torch.tensor([len(p) - 1 for p in prompt_ids]).unsqueeze(1)
    lengths = torch.tensor([len(c) for c in completion_ids]).unsqueeze(1)
    return starts + j, j < lengths


def _to_completion(per_position: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """(B, T-1) sequence-aligned -> (B, C) completion-aligned; 0 where not valid."""
    index, valid = index.to(per_position.device), valid.to(per_position.device)
    picked = per_position.gather(1, torch.where(valid, index, torch.zeros_like(index)))
    return torch.where(valid, picked, torch.zeros_like(picked))


def _to_sequence(per_token: Tensor, index: Tensor, valid: Tensor, positions: int) -> Tensor:
    """(B, C) completion-aligned -> (B, positions) sequence-aligned; 0 off the completion."""
    out = torch.zeros(per_token.shape[0], positions, dtype=per_token.dtype)
    rows = torch.arange(per_token.shape[0]).unsqueeze(1).expand_as(index)
    out[rows[valid], index[valid]] = per_token[valid]
    return out


def _micro_batch(rollout: PPORollout, rows: Tensor, pad_id: int, device) -> dict:
    """Right-padded prompt + completion rows with the rollout's per-token tensors in place."""
    prompts = [rollout.prompt_ids[i] for i in rows.tolist()]
    completions = [rollout.completion_ids[i] for i in rows.tolist()]
    batch = _completion_batch(prompts, completions, pad_id)
    index, valid = _completion_positions(prompts, completions, rollout.mask.shape[1])
    positions = batch["input_ids"].shape[1] - 1
    for key in ("old_logps", "old_values", "advantages", "returns"):
        batch[key] = _to_sequence(getattr(rollout, key)[rows], index, valid, positions)
    batch["mask"] = batch.pop("completion_mask")[:, 1:].bool()
    return batch_to_device(batch, device)


def _shuffled(seed: int, step: int, epoch: int, n: int) -> Tensor:
    """The row order of one PPO epoch: a function of (seed, step, epoch) only, so resume agrees."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + epoch))


def _check(config: PPOConfig) -> tuple[int, int]:
    """(prompts per process per iteration, completions per mini-batch per process)."""
    if config.num_ppo_epochs < 1 or config.num_mini_batches < 1:
        raise ValueError("--num_ppo_epochs and --num_mini_batches must be >= 1")
    if config.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"--kl_estimator {config.kl_estimator!r}: expected k1 or k3")
    if not (0.0 <= config.gamma <= 1.0 and 0.0 <= config.lam <= 1.0):
        raise ValueError(f"--gamma {config.gamma} and --lam {config.lam} must lie in [0, 1]")
    if config.precompute_ref_log_probs:
        raise ValueError("--precompute_ref_log_probs does not apply to PPO: every rollout is new")
    mini = config.per_device_train_batch_size * config.gradient_accumulation_steps
    per_process = mini * config.num_mini_batches
    if per_process % config.num_generations:
        raise ValueError(
            f"per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches = {per_process} "
            f"completions per process per iteration must be a multiple of --num_generations {config.num_generations}")
    return per_process // config.num_generations, mini


def _whiten_everywhere(accelerator, values: Tensor, mask: Tensor, *, shift_mean: bool = True) -> Tensor:
    """Whitening with the mean and variance of the whole step (every process), so W processes
    give the advantages one process would on the same rollouts; this process's rows back."""
    from posttrain.losses.advantages import whiten

    if accelerator.num_processes == 1:
        return whiten(values, mask, shift_mean=shift_mean)
    n, width = values.shape
    everywhere = whiten(rows_everywhere(accelerator, values), rows_everywhere(accelerator, mask),
                        shift_mean=shift_mean)
    return own_rows(accelerator, everywhere, n, width)


def _optimizer_update(run: TrainingSession, step: int, update: int) -> None:
    """An update inside an iteration. The iteration's last one goes through run.finish_step,
    which also advances the LR schedule, logs and checkpoints."""
    clip = run.config.max_grad_norm if run.config.max_grad_norm > 0 else float("inf")
    grad_norm = float(run.accelerator.clip_grad_norm_(run.params, clip))
    if not math.isfinite(grad_norm) and run.accelerator.scaler is None:  # fp16: the scaler skips it
        from posttrain.errors import NonFiniteLossError

        run.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"step {step + 1}, update {update + 1}: grad norm {grad_norm} is not finite; "
                                 "the update was not applied and the run stopped")
    run.optimizer_step()  # fp16: an overflowing update is skipped (counted in fp16/skipped_steps)
    run.optimizer.zero_grad(set_to_none=True)


def ppo(config: PPOConfig, model=None, tokenizer=None, dataset=None, reward_funcs=None) -> PPOResult:
    """Train `model` (default: config.model_name_or_path) with PPO on the prompts of `dataset`
    (default: config.dataset_name), scored by config.reward_model_path and/or reward functions
    (callables `fn(prompts, completions, **columns) -> list[float]`, plus config.reward_funcs)."""
    from posttrain.engine.precision import autocast_reference
    from posttrain.losses.advantages import gae, kl_penalized_rewards
    from posttrain.losses.kl import kl_estimate
    from posttrain.losses.policy_gradient import clipped_policy_loss, explained_variance, value_loss
    from posttrain.losses.reductions import aggregate_token_loss, masked_sum
    from posttrain.models.dropout import eval_mode
    from posttrain.models.loading import load_causal_lm, model_load_kwargs
    from posttrain.models.logprobs import LogProbModel
    from posttrain.models.reference import build_reference
    from posttrain.models.saving import save_pretrained_model
    from posttrain.models.setup import prepare_model_for_training, resolve_tokenizer
    from posttrain.models.value_model import (
        PolicyWithCritic,
        load_value_model,
        save_value_head,
        value_head_for,
    )
    from posttrain.rollout.generation import make_backend, rollout_seeds
    from posttrain.rollout.prompts import load_prompts
    from posttrain.rollout.rewards import reward_functions_for, reward_inputs, score_completions

    prompts_per_process, mini_size = _check(config)
    micro_size = config.per_device_train_batch_size
    accelerator = start_run(config)
    log = accelerator.print
    device = accelerator.device

    # ---- prompts and rewards
    tokenizer = resolve_tokenizer(config, tokenizer)
    prompts = load_prompts(config, dataset, tokenizer, log)
    fns = reward_functions_for(config, reward_funcs)

    # ---- policy, critic, reference
    critic = None if config.value_head_on_policy else load_value_model(config, policy_model=model,
                                                                       tokenizer=tokenizer, log=log)
    model = prepare_model_for_training(config, model, log)
    value_head = value_head_for(model) if config.value_head_on_policy else None
    if value_head is not None:
        log("critic: a value head on the policy's own hidden states (one backbone for policy and critic)")
    module = PolicyWithCritic(LogProbModel(model, chunk_size=config.logprob_chunk_size), critic, value_head)
    reference = None
    if config.kl_coef > 0:
        reference = build_reference(
            model, ref_model_name_or_path=config.ref_model_name_or_path,
            load=lambda p: load_causal_lm(p, **model_load_kwargs(config, p)),
            chunk_size=config.logprob_chunk_size, device=device, log=log)
    else:
        log("reference: none (--kl_coef 0: no KL penalty, no reference model loaded)")
    autocast_reference(reference, accelerator)  # the policy's autocast: KL 0 exactly at the start
    backend = make_backend(config.generation_backend, model, tokenizer, stop_tokens=config.stop_token or [])

    # ---- batch plan: one step = one PPO iteration
    plan = BatchPlan(units=[[i] for i in range(len(prompts))], micro_batch_size=prompts_per_process,
                     accumulation=1, world_size=accelerator.num_processes, seed=config.seed)
    plan.require_one_step()
    steps = total_steps(plan, config.max_steps, config.num_train_epochs)
    n_rollout = prompts_per_process * config.num_generations
    updates = config.num_ppo_epochs * config.num_mini_batches
    log("batch plan (one step = one PPO iteration):\n"
        f"  {prompts_per_process} prompts x {config.num_generations} generations = {n_rollout} completions per "
        f"process ({accelerator.num_processes} process(es)), up to {config.max_completion_length} tokens each\n"
        f"  {config.num_ppo_epochs} PPO epochs x {config.num_mini_batches} mini-batches = {updates} optimizer "
        f"updates per iteration; a mini-batch = {config.per_device_train_batch_size} per micro-batch x "
        f"{config.gradient_accumulation_steps} accumulation\n"
        f"  {len(prompts)} prompts; {plan.steps_per_epoch} iterations per epoch; {steps} iterations = "
        f"{steps * updates} optimizer updates")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collect(run: TrainingSession, step: int) -> PPORollout:
        """Sample, score, and compute old log-probs, reference log-probs, values, GAE."""
        indices = plan.step_micro_batches(step, accelerator.process_index)[0]
        examples = [prompts[i] for i in indices]
        rollout = backend.generate([e.prompt_ids for e in examples], num_generations=config.num_generations,
                                   max_completion_length=config.max_completion_length,
                                   temperature=config.temperature, top_p=config.top_p,
                                   top_k=config.top_k or None,
                                   seed=rollout_seeds(config.seed, step, accelerator.process_index * len(examples),
                                                      len(examples)))
        r_prompts, r_completions, columns = reward_inputs(examples, rollout, tokenizer)
        scored = score_completions(fns, config.reward_weights, r_prompts, r_completions, columns)
        truncated = torch.tensor(rollout.truncated, dtype=torch.bool)
        scores = scored.total.float()
        if config.missing_eos_penalty is not None:
            scores = scores - config.missing_eos_penalty * truncated.float()

        n, width = len(rollout), max(rollout.completion_lengths)
        order = _shuffled(config.seed, step, 0, n)
        # fp32 (a float64 run stays float64: the scorer's log-probs come in promote(dtype, fp32))
        held = torch.promote_types(next(run.unwrapped().parameters()).dtype, torch.float32)
        fields = {k: torch.zeros(n, width, dtype=held) for k in ("old_logps", "ref_logps", "old_values", "entropy")}
        mask = torch.zeros(n, width, dtype=torch.bool)
        scorer = run.unwrapped()
        for start in range(0, n, micro_size):  # the micro-batches of PPO epoch 0, in its order
            rows = order[start:start + micro_size]
            p_ids = [rollout.prompt_ids[i] for i in rows.tolist()]
            c_ids = [rollout.completion_ids[i] for i in rows.tolist()]
            batch = batch_to_device(_completion_batch(p_ids, c_ids, pad_id), device)
            target = batch["completion_mask"][:, 1:].bool()
            # eval mode: the old log-probs and values are the policy and critic themselves, not
            # one dropout draw of them, so the first mini-batch's ratio is exactly 1 (pitfall 25)
            with torch.no_grad(), eval_mode(scorer):
                out = scorer(batch["input_ids"], batch["attention_mask"], target_mask=target,
                             temperature=config.temperature, with_entropy=True)
                ref = out["logps"] if reference is None else reference.token_logps(
                    scorer.policy, batch["input_ids"], attention_mask=batch["attention_mask"], target_mask=target,
                    temperature=config.temperature)
            index, valid = _completion_positions(p_ids, c_ids, width)
            for key, per_position in (("old_logps", out["logps"]), ("ref_logps", ref),
                                      ("old_values", out["values"]), ("entropy", out["entropy"])):
                fields[key][rows] = _to_completion(per_position.to(held), index, valid).cpu()
            mask[rows] = valid

        kl = kl_estimate(fields["old_logps"], fields["ref_logps"], config.kl_estimator, mask=mask)
        rewards = kl_penalized_rewards(scores, kl, mask, beta=config.kl_coef)
        if config.whiten_rewards:
            rewards = _whiten_everywhere(accelerator, rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, fields["old_values"], mask, gamma=config.gamma, lam=config.lam)
        advantages = _whiten_everywhere(accelerator, advantages, mask)

        # per-completion means over every process, from the same masked tensors the loss uses
        seq_kl = (kl * mask).sum(1)
        non_score = -config.kl_coef * seq_kl
        count = run.global_sum(n)
        sums = {"objective/scores": scores.double().sum(), "objective/kl": seq_kl.sum(),
                "objective/non_score_reward": non_score.sum(), "objective/rlhf_reward": (scores + non_score).sum(),
                "objective/entropy": masked_sum(fields["entropy"], mask),
                "completions/mean_length": mask.sum(), "completions/clipped_ratio": truncated.sum()}
        metrics = {k: run.global_sum(float(v)) / count for k, v in sums.items()}
        metrics["val/explained_variance"] = float(explained_variance(
            *(rows_everywhere(accelerator, t) for t in (fields["old_values"], returns, mask))))
        metrics.update({k: v for k, v in scores_everywhere(accelerator, scored).metrics().items()
                        if k.startswith("rewards/")})
        return PPORollout(rollout.prompt_ids, rollout.completion_ids, mask, fields["old_logps"],
                          fields["old_values"], advantages, returns, order, metrics)

    with TrainingSession(accelerator, config, module, total_steps=steps,
                         steps_per_epoch=plan.steps_per_epoch) as run:
        trained = run.unwrapped()  # checkpoints hold the policy, and the critic in value_model/
        run.set_model_for_checkpoints(trained.policy.model, tokenizer, extra={"value_model": trained.critic.model
                                      if trained.critic is not None else partial(save_value_head, trained.value_head)})
        for step in run.steps():
            rollout = collect(run, step)
            step_loss = torch.zeros((), device=device)
            sums = dict.fromkeys(("policy/approxkl", "policy/clipfrac", "policy/entropy", "val/clipfrac",
                                  "val/ratio", "loss/policy", "loss/value"), 0.0)
            tokens, trained_tokens, update = 0, 0.0, 0
            for epoch in range(config.num_ppo_epochs):
                order = rollout.first_order if epoch == 0 else _shuffled(config.seed, step, epoch, n_rollout)
                for m in range(config.num_mini_batches):
                    rows = order[m * mini_size:(m + 1) * mini_size]
                    micro = [rows[s:s + micro_size] for s in range(0, mini_size, micro_size)]
                    # token mean over the whole mini-batch (all micro-batches, all processes)
                    n_tokens = max(run.global_sum(int(rollout.mask[rows].sum())), 1.0)
                    for k, micro_rows in enumerate(micro):
                        batch = _micro_batch(rollout, micro_rows, pad_id, device)
                        mask = batch["mask"]
                        with run.sync(k, len(micro)):
                            out = run.module(batch["input_ids"], batch["attention_mask"], target_mask=mask,
                                             temperature=config.temperature, with_entropy=True)
                            pg_per_token, stats = clipped_policy_loss(out["logps"], batch["old_logps"],
                                                                      batch["advantages"], mask,
                                                                      epsilon_low=config.cliprange)
                            vf_per_token, vf_clipfrac = value_loss(out["values"], batch["old_values"],
                                                                   batch["returns"], mask,
                                                                   clip_range_value=config.cliprange_value)
                            pg = aggregate_token_loss(pg_per_token, mask, mode="token_mean", normalizer=n_tokens)
                            vf = aggregate_token_loss(vf_per_token, mask, mode="token_mean", normalizer=n_tokens)
                            loss = (pg + config.vf_coef * vf) * run.world_size  # DDP averages gradients
                            run.backward(loss)
                        step_loss = step_loss + loss.detach() / run.world_size / updates  # not +=: keeps a float64 run in float64
                        n_mask = float(mask.sum())
                        log_ratio = torch.where(mask, out["logps"].detach() - batch["old_logps"], 0.0)
                        sums["policy/approxkl"] += float(0.5 * (log_ratio ** 2).sum())
                        sums["policy/clipfrac"] += float(masked_sum(stats["clipped"].float(), mask))
                        sums["policy/entropy"] += float(masked_sum(out["entropy"], mask))
                        sums["val/clipfrac"] += float(vf_clipfrac) * n_mask
                        sums["val/ratio"] += float(masked_sum(stats["ratio"], mask))
                        sums["loss/policy"] += float(pg.detach()) / updates
                        sums["loss/value"] += float(vf.detach()) / updates
                        tokens += int(batch["attention_mask"].sum())
                        trained_tokens += n_mask
                    update += 1
                    if update < updates:
                        _optimizer_update(run, step, update - 1)
            all_tokens = max(run.global_sum(trained_tokens), 1.0)
            metrics = {k: run.global_sum(v) / (1.0 if k.startswith("loss/") else all_tokens) for k, v in sums.items()}
            metrics.update(rollout.metrics)
            stop = run.finish_step(step, loss=step_loss, tokens=tokens, metrics=metrics)
            backend.sync_weights(run.unwrapped().policy.model)  # the sampler uses the updated weights (pitfall 15)
            if stop:
                break

        trained = run.unwrapped()
        if not run.stopped_early and accelerator.is_main_process:
            value_dir = run.output_dir / "value_model"  # reusable: --value_model_path OUTPUT_DIR/value_model
            if trained.critic is not None:
                save_pretrained_model(trained.critic.model, tokenizer, value_dir)
            else:
                save_value_head(trained.value_head, value_dir)
        run.save_model(trained.policy.model, tokenizer, merge_adapter=config.use_peft and config.merge_adapter)
    return PPOResult(output_dir=run.output_dir, model=trained.policy.model,
                     value_model=trained.critic if trained.critic is not None else trained.value_head,
                     steps=run.steps_done, last_loss=run.last_loss, stopped_early=run.stopped_early)
