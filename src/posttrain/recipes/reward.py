"""Reward modelling: `posttrain reward` and `posttrain.recipes.reward.reward(RewardConfig(...))`.

Reads top to bottom: data (validated, tokenised, held-out split) → model → batch plan →
optimisation loop (with evaluation) → save.

Loss (Bradley-Terry, mean over every pair of the whole optimizer step, so it does not depend on
how the step is split into micro-batches or processes):

    L = (1 / P_step) * sum_{pairs in step} [ -log sigmoid(r_c - r_r - m) + eta * (r_c + r_r)^2 ]

r = the score head read at the last real token of each sequence (pitfall 9), m the optional
per-pair margin column, eta = center_rewards_coefficient, P_step = pairs in the step on every
process. Chosen and rejected of a micro-batch go through ONE forward (2B sequences).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import RewardConfig
from posttrain.engine.batching import BatchPlan, total_steps
from posttrain.engine.console import format_batch_plan
from posttrain.engine.session import TrainingSession
from posttrain.engine.setup import start_run


@dataclass
class RewardResult:
    output_dir: Path
    model: Any  # the trained HF AutoModelForSequenceClassification (or peft) model
    steps: int
    last_loss: float | None
    stopped_early: bool
    eval_metrics: dict[str, float] | None  # the final held-out metrics ("eval/accuracy", ...), if any


# -------------------------------------------------------------------------------------------- data


def _load_pairs(config: RewardConfig, tokenizer, data, name: str | None, split: str, log, what: str):
    from posttrain.data.formats import DataFormat, describe_format, detect_format
    from posttrain.data.in_memory import as_loaded_rows
    from posttrain.data.preference import prepare_preference_examples

    loaded = as_loaded_rows(data, name, split, config.dataset_config)
    fmt = detect_format(loaded.rows, loaded.source)
    log(f"{what} data: {loaded.source}: {len(loaded.rows)} rows, format {describe_format(fmt)}")
    if fmt != DataFormat.PREFERENCE:
        raise ValueError(f"{loaded.source}: a reward model trains on preference pairs ('chosen' and 'rejected', "
                         f"optional 'prompt' and 'margin'); this data is {DataFormat(fmt).value}")
    examples, report = prepare_preference_examples(loaded, fmt, tokenizer, max_length=config.max_length,
                                                   max_prompt_length=config.max_prompt_length,
                                                   truncation_mode=config.truncation_mode)
    for line in report.lines():
        log(f"  {line}")
    if not examples:
        raise ValueError(f"{loaded.source}: no pair is left to {'train' if what == 'train' else 'evaluate'} on")
    return examples


def _split_held_out(examples: list, ratio: float, seed: int) -> tuple[list, list]:
    """A seeded random `ratio` of the pairs held out (at least one, never all)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"eval_split_ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return examples, []
    n_eval = min(max(1, round(ratio * len(examples))), len(examples) - 1)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def _collate(examples, padding_free: bool, pad_token_id: int, device) -> dict[str, Any]:
    """2B sequences [chosen..., rejected...] as the scorer's inputs, plus margin and counts."""
    from posttrain.data.preference_collate import collate_preference

    batch = collate_preference(examples, pad_token_id=pad_token_id, padding_free=padding_free)
    out: dict[str, Any] = {"input_ids": batch["input_ids"].to(device),
                           "position_ids": batch["position_ids"].to(device)}
    if padding_free:
        out["seq_lens"] = batch["seq_lens"]
        tokens = batch["input_ids"].numel()
    else:
        out["attention_mask"] = batch["attention_mask"].to(device)
        tokens = int(batch["attention_mask"].sum())
    margin = batch.get("margin")
    return {"inputs": out, "pairs": len(examples), "tokens": tokens,
            "margin": None if margin is None else margin.to(device)}


# ----------------------------------------------------------------------------------------- metrics


def _pair_sums(chosen: torch.Tensor, rejected: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
    """Sums over pairs that the metrics are made of (so they can be added across micro-batches and
    processes): [n, n*accuracy, Σ(r_c − r_r), Σr_c, Σr_c², Σr_r, Σr_r², Σloss]."""
    from posttrain.losses.reward import reward_accuracy, reward_margin

    c, r = chosen.detach().double(), rejected.detach().double()
    n = c.numel()
    return torch.stack([
        torch.tensor(float(n), dtype=torch.float64, device=c.device),
        reward_accuracy(c, r).double() * n,
        reward_margin(c, r).double() * n,
        c.sum(), (c * c).sum(), r.sum(), (r * r).sum(),
        (losses.detach().double().sum() if losses is not None else c.new_zeros(())),
    ])


def _pair_metrics(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    n, correct, margin, sc, sc2, sr, sr2, loss = sums.tolist()
    n = max(n, 1.0)

    def std(s, s2):
        return max(s2 / n - (s / n) ** 2, 0.0) ** 0.5

    out = {"accuracy": correct / n, "margin": margin / n,
           "rewards/chosen_mean": sc / n, "rewards/chosen_std": std(sc, sc2),
           "rewards/rejected_mean": sr / n, "rewards/rejected_std": std(sr, sr2)}
    if prefix:
        out = {"loss": loss / n, **out, "num_pairs": int(n)}
    return {prefix + k: v for k, v in out.items()}


@torch.no_grad()
def _evaluate(run: TrainingSession, examples, config: RewardConfig, padding_free: bool, pad_token_id: int
              ) -> dict[str, float]:
    """Held-out metrics (no gradient, eval mode): each process scores every world_size-th batch."""
    from posttrain.losses.reward import bradley_terry_loss

    acc = run.accelerator
    size = config.per_device_eval_batch_size
    batches = [examples[i:i + size] for i in range(0, len(examples), size)]
    sums = torch.zeros(8, dtype=torch.float64, device=acc.device)
    was_training = run.module.training
    run.module.eval()
    try:
        for chunk in batches[acc.process_index::acc.num_processes]:
            b = _collate(chunk, padding_free, pad_token_id, acc.device)
            scores = run.module(**b["inputs"])
            c, r = scores[: b["pairs"]], scores[b["pairs"]:]
            losses = bradley_terry_loss(c, r, b["margin"], config.center_rewards_coefficient)
            sums += _pair_sums(c, r, losses)
    finally:
        run.module.train(was_training)
    return _pair_metrics(acc.reduce(sums, "sum"), prefix="eval/")


# ------------------------------------------------------------------------------------------ recipe


def reward(config: RewardConfig, model=None, tokenizer=None, dataset=None, eval_dataset=None) -> RewardResult:
    """Train a reward model on preference pairs from `dataset` (default: config.dataset_name; also
    a list of dicts or a `datasets.Dataset`). Held-out pairs: `eval_dataset` /
    config.eval_dataset_name, else a seeded config.eval_split_ratio of the training pairs.
    `model` may be a causal LM (its backbone gets a new score head) or a one-output classifier."""
    from posttrain.losses.reward import bradley_terry_loss
    from posttrain.models.logprobs import check_packing_support
    from posttrain.models.reward_model import RewardScorer, prepare_reward_model_for_training
    from posttrain.models.setup import resolve_tokenizer

    accelerator = start_run(config)
    log = accelerator.print
    padding_free = config.padding_free
    eta = config.center_rewards_coefficient

    # Data: validated and tokenised before any model is loaded, so bad rows cost no compute.
    tokenizer = resolve_tokenizer(config, tokenizer)
    examples = _load_pairs(config, tokenizer, dataset, config.dataset_name, config.dataset_split, log, "train")
    if eval_dataset is not None or config.eval_dataset_name:
        eval_examples = _load_pairs(config, tokenizer, eval_dataset, config.eval_dataset_name, "test", log, "eval")
    else:
        examples, eval_examples = _split_held_out(examples, config.eval_split_ratio, config.seed)
        if eval_examples:
            log(f"held out {len(eval_examples)} of {len(examples) + len(eval_examples)} pairs for evaluation "
                f"(eval_split_ratio {config.eval_split_ratio}, seed {config.seed})")

    model = prepare_reward_model_for_training(config, model, tokenizer, log)
    if padding_free:
        check_packing_support(model)

    # Batch plan: a unit is one pair (two sequences in the forward).
    plan = BatchPlan(units=[[i] for i in range(len(examples))], micro_batch_size=config.per_device_train_batch_size,
                     accumulation=config.gradient_accumulation_steps, world_size=accelerator.num_processes,
                     seed=config.seed)
    plan.require_one_step()
    steps = total_steps(plan, config.max_steps, config.num_train_epochs)
    mean_tokens = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)
                      for e in examples) / len(examples) * plan.units_per_step
    log(format_batch_plan(micro_batch_size=config.per_device_train_batch_size,
                          accumulation=config.gradient_accumulation_steps, world_size=accelerator.num_processes,
                          packing=False, max_length=config.max_length, steps=steps,
                          steps_per_epoch=plan.steps_per_epoch, unused_units=plan.unused_units_per_epoch,
                          mean_tokens_per_step=mean_tokens, examples=len(examples), units=len(examples))
        .replace("sequences", "pairs (2 sequences each, one forward)", 1))

    eval_metrics: dict[str, float] | None = None
    with TrainingSession(accelerator, config, RewardScorer(model), total_steps=steps,
                         steps_per_epoch=plan.steps_per_epoch) as run:
        run.set_model_for_checkpoints(run.unwrapped().model, tokenizer)  # checkpoints load with from_pretrained

        def evaluate() -> dict[str, float]:
            return _evaluate(run, eval_examples, config, padding_free, tokenizer.pad_token_id)

        for step in run.steps():
            micro_batches = [_collate([examples[i] for i in mb], padding_free, tokenizer.pad_token_id,
                                      accelerator.device)
                             for mb in plan.step_micro_batches(step, accelerator.process_index)]
            # The normaliser is the number of pairs in the whole optimizer step, on every process.
            step_pairs = run.global_sum(sum(b["pairs"] for b in micro_batches))
            step_loss = torch.zeros((), device=accelerator.device)
            sums = torch.zeros(8, dtype=torch.float64, device=accelerator.device)
            step_tokens = 0
            for k, b in enumerate(micro_batches):
                with run.sync(k, len(micro_batches)):
                    scores = run.module(**b["inputs"])
                    chosen, rejected = scores[: b["pairs"]], scores[b["pairs"]:]
                    losses = bradley_terry_loss(chosen, rejected, b["margin"], eta)
                    # DDP averages gradients over processes; x world turns that back into the global sum.
                    loss = losses.sum() / step_pairs * run.world_size
                    run.backward(loss)
                step_loss = step_loss + loss.detach() / run.world_size  # not +=: keeps a float64 run in float64
                sums += _pair_sums(chosen, rejected)
                step_tokens += b["tokens"]
            metrics = _pair_metrics(accelerator.reduce(sums, "sum"))
            if run.finish_step(step, loss=step_loss, tokens=step_tokens, metrics=metrics):
                break
            if eval_examples:
                run.maybe_evaluate(step, config.eval_steps, evaluate)
        if eval_examples:  # logged at the last step and written to OUTPUT_DIR/eval_results.json
            eval_metrics = run.final_evaluation(evaluate) or None
        if eval_metrics:
            log("held-out: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in eval_metrics.items()))
        trained = run.unwrapped().model
        run.save_model(trained, tokenizer, merge_adapter=config.use_peft and config.merge_adapter,
                       extra_summary={"eval": eval_metrics} if eval_metrics else None)
    return RewardResult(output_dir=run.output_dir, model=trained, steps=run.steps_done, last_loss=run.last_loss,
                        stopped_early=run.stopped_early, eval_metrics=eval_metrics)
