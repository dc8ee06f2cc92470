"""Held-out evaluation: `posttrain eval` and `posttrain.evaluate(EvalConfig(...))`.

Reads top to bottom: prompts → scorers (reward functions, reward model, judge, answers) → for
the model, then the baseline: load → generate (greedy and sampled) → score → free → compare
(win rate, KL of the model to the baseline on the model's samples) → eval.json + report.html.

Task accuracy is checked against the data's ``answer`` column by the exact answer checker
(:func:`posttrain.rollout.rewards.answers_match`), never by the reward: a model that learns to
please its reward without solving the task shows a rising reward and a flat accuracy.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.config import EvalConfig
from posttrain.errors import PosttrainError

EVAL_FILE = "eval.json"
# not config.yaml: eval may write into a training run's directory, whose config.yaml it must keep
EVAL_CONFIG_FILE = "eval_config.yaml"
MODES = ("greedy", "sampled")


class EvalSetupError(PosttrainError):
    """An evaluation that cannot measure anything, or settings that contradict each other."""


@dataclass
class EvalResult:
    """metrics["model"] / metrics["baseline"]: one model's numbers (``greedy/reward``,
    ``sampled/accuracy``, ...); comparison: ``greedy/win_rate``, ``sampled/kl_k1``, ...;
    samples: one row per prompt, the model's and the baseline's answers side by side."""

    output_dir: Path
    metrics: dict[str, dict[str, float | None]]
    comparison: dict[str, float | None]
    samples: list[dict]
    report_path: Path | None = None


@dataclass
class ModelRun:
    """One model's generations on the eval prompts and their scores, per mode."""

    rollouts: dict[str, Any] = field(default_factory=dict)  # mode -> Rollout
    prompts: dict[str, list] = field(default_factory=dict)  # mode -> prompt per completion
    completions: dict[str, list] = field(default_factory=dict)
    columns: dict[str, dict[str, list]] = field(default_factory=dict)
    rewards: dict[str, Any] = field(default_factory=dict)  # mode -> RewardScores
    correct: dict[str, list[bool | None]] = field(default_factory=dict)
    sample_logps: tuple[torch.Tensor, torch.Tensor] | None = None  # this model on the model's samples


def _check(config: EvalConfig) -> None:
    if config.num_samples < 0:
        raise EvalSetupError(f"--num_samples must be >= 0, got {config.num_samples}")
    if not config.greedy and config.num_samples == 0:
        raise EvalSetupError("nothing to generate: --greedy false and --num_samples 0")
    if config.num_samples and config.temperature <= 0:
        raise EvalSetupError("--num_samples > 0 needs --temperature > 0 (greedy decoding is --greedy)")
    if config.max_eval_samples is not None and config.max_eval_samples < 1:
        raise EvalSetupError(f"--max_eval_samples must be >= 1, got {config.max_eval_samples}")
    if config.per_device_eval_batch_size < 1:
        raise EvalSetupError("--per_device_eval_batch_size must be >= 1")


def prompt_text(prompt: Any) -> str:
    """A prompt for display: the string, or a conversation's messages (roles shown when several)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return str(prompt[0].get("content", ""))
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


def _load_model(name: str | None, config: EvalConfig, device: torch.device):
    from posttrain.models.loading import load_causal_lm, model_load_kwargs

    # model and baseline with the same load kwargs: a baseline equal to the model gives KL 0 exactly
    model = load_causal_lm(name, **model_load_kwargs(config))
    return model.to(device).eval()


def _vocab_size(model) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def _generate_and_score(model, examples, tokenizer, config: EvalConfig, fns, log) -> ModelRun:
    from posttrain.rollout.generation import make_backend
    from posttrain.rollout.rewards import answers_match, completion_text, reward_inputs, score_completions

    backend = make_backend("hf", model, tokenizer, stop_tokens=config.stop_token or [],
                           batch_size=config.per_device_eval_batch_size)
    run = ModelRun()
    modes = [("greedy", 1, 0.0)] if config.greedy else []
    if config.num_samples:
        modes.append(("sampled", config.num_samples, config.temperature))
    for mode, n, temperature in modes:
        rollout = backend.generate([e.prompt_ids for e in examples], num_generations=n,
                                   max_completion_length=config.max_completion_length, temperature=temperature,
                                   top_p=config.top_p if temperature else 1.0,
                                   top_k=(config.top_k or None) if temperature else None, seed=config.seed)
        prompts, completions, columns = reward_inputs(examples, rollout, tokenizer)
        run.rollouts[mode], run.prompts[mode], run.completions[mode], run.columns[mode] = (
            rollout, prompts, completions, columns)
        if fns:
            run.rewards[mode] = score_completions(fns, config.reward_weights, prompts, completions, columns)
        answers = columns.get("answer", [None] * len(completions))
        run.correct[mode] = [None if a is None else answers_match(completion_text(c), a)
                             for c, a in zip(completions, answers)]
        log(f"  {mode}: {len(rollout)} completions")
    return run


def _model_metrics(run: ModelRun, num_samples: int) -> dict[str, float | None]:
    """Per mode: reward (weighted total) and each function's mean, task accuracy over the rows
    with an answer, completion length, share cut by max_completion_length; pass@k when sampled."""
    out: dict[str, float | None] = {}
    for mode, rollout in run.rollouts.items():
        if mode in run.rewards:
            out.update({f"{mode}/{k}": v for k, v in run.rewards[mode].metrics().items()})
        judged = [c for c in run.correct[mode] if c is not None]
        if judged:
            out[f"{mode}/accuracy"] = sum(judged) / len(judged)
            if mode == "sampled" and num_samples > 1:
                by_prompt: dict[int, list[bool]] = {}
                for i, c in zip(rollout.prompt_index, run.correct[mode]):
                    if c is not None:
                        by_prompt.setdefault(i, []).append(c)
                out[f"sampled/pass@{num_samples}"] = sum(any(v) for v in by_prompt.values()) / len(by_prompt)
        out[f"{mode}/mean_length"] = sum(rollout.completion_lengths) / len(rollout)
        out[f"{mode}/truncated_ratio"] = sum(rollout.truncated) / len(rollout)
    return out


def _comparison(model: ModelRun, baseline: ModelRun, judge) -> dict[str, float | None]:
    """Win rate of the model over the baseline per mode (by reward; by the judge when given,
    which is then the headline ``win_rate``) and the KL of the model to the baseline."""
    from posttrain.eval.kl_to_baseline import sequence_kl
    from posttrain.eval.win_rate import judge_preferences, win_rate_from_scores

    out: dict[str, float | None] = {}
    for mode in model.rollouts:
        if mode in model.rewards:
            out[f"{mode}/win_rate_reward"] = win_rate_from_scores(model.rewards[mode].total,
                                                                  baseline.rewards[mode].total).item()
        if judge is not None:
            columns = {k: v for k, v in model.columns[mode].items() if k != "completion_ids"}
            prefs = judge_preferences(judge, model.prompts[mode], model.completions[mode],
                                      baseline.completions[mode], columns)
            out[f"{mode}/win_rate_judge"] = prefs.mean().item()
        headline = out.get(f"{mode}/win_rate_judge", out.get(f"{mode}/win_rate_reward"))
        if headline is not None:
            out[f"{mode}/win_rate"] = headline
    if model.sample_logps is not None and baseline.sample_logps is not None:
        (logps_a, mask), (logps_b, _) = model.sample_logps, baseline.sample_logps
        k1, k3 = sequence_kl(logps_a, logps_b, mask)
        out["sampled/kl_k1"] = k1.mean().item()
        out["sampled/kl_k3"] = k3.mean().item()
    return out


def _samples(examples, model: ModelRun, baseline: ModelRun | None) -> list[dict]:
    """One row per prompt: its greedy answer (else its first sample) from each model."""
    from posttrain.rollout.rewards import completion_text

    mode = "greedy" if "greedy" in model.rollouts else "sampled"
    first = {}
    for row, i in enumerate(model.rollouts[mode].prompt_index):
        first.setdefault(i, row)
    rows = []
    for i, ex in enumerate(examples):
        r = first[i]
        entry = {"row": ex.row, "prompt": prompt_text(ex.prompt), "answer": ex.columns.get("answer"), "mode": mode}
        for name, run in (("model", model), ("baseline", baseline)):
            if run is None:
                continue
            entry[name] = completion_text(run.completions[mode][r])
            entry[f"{name}_reward"] = run.rewards[mode].total[r].item() if mode in run.rewards else None
            entry[f"{name}_correct"] = run.correct[mode][r]
        rows.append(entry)
    return rows


def _finite(values: dict) -> dict:
    """NaN (a reward function that applied to no sample) is written as null: JSON has no NaN."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def _format_table(metrics: dict[str, dict], comparison: dict) -> str:
    names = list(dict.fromkeys(k for m in metrics.values() for k in m))
    columns = list(metrics)

    def cell(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    width = max([len(n) for n in names + list(comparison)] + [6])
    lines = [f"  {'metric':<{width}}  " + "  ".join(f"{c:>10}" for c in columns)]
    for n in names:
        lines.append(f"  {n:<{width}}  " + "  ".join(f"{cell(metrics[c].get(n)):>10}" for c in columns))
    for n, v in comparison.items():
        lines.append(f"  {n:<{width}}  {cell(v):>10}   (model vs baseline)")
    return "\n".join(lines)


def evaluate(config: EvalConfig, model=None, tokenizer=None, dataset=None, baseline_model=None) -> EvalResult:
    """Generate on the held-out prompts of `dataset` (default: config.dataset_name) with `model`
    (default: config.model_name_or_path) and, when given, the baseline (`baseline_model` or
    config.baseline); score, compare, and write OUTPUT_DIR/eval.json and report.html."""
    import yaml

    from posttrain.data.formats import describe_format, detect_format
    from posttrain.data.in_memory import as_loaded_rows
    from posttrain.engine.console import format_config
    from posttrain.eval.kl_to_baseline import completion_logps
    from posttrain.eval.win_rate import load_judge
    from posttrain.models.loading import load_tokenizer, model_load_kwargs
    from posttrain.rollout.prompts import prepare_prompts
    from posttrain.rollout.rewards import load_reward_functions

    _check(config)
    log = print
    log(format_config(config))
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / EVAL_CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))

    # prompts
    if tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path,
                                   trust_remote_code=config.trust_remote_code)
    loaded = as_loaded_rows(dataset, config.dataset_name, config.dataset_split, config.dataset_config)
    if config.max_eval_samples is not None and len(loaded) > config.max_eval_samples:
        loaded = loaded.subset(list(range(config.max_eval_samples)))
    fmt = detect_format(loaded.rows, loaded.source)
    log(f"data: {loaded.source}: {len(loaded.rows)} prompts, format {describe_format(fmt)}")
    examples = prepare_prompts(loaded, fmt, tokenizer, max_prompt_length=config.max_prompt_length,
                               truncation_mode=config.truncation_mode)

    # what measures the completions
    fns = load_reward_functions(config.reward_funcs, reward_model_path=config.reward_model_path,
                                model_kwargs=model_load_kwargs(config))
    if config.reward_weights is not None and len(config.reward_weights) != len(fns):
        raise EvalSetupError(f"--reward_weights has {len(config.reward_weights)} values for {len(fns)} reward functions")
    judge = load_judge(config.judge) if config.judge else None
    has_answers = any(e.columns.get("answer") is not None for e in examples)
    has_baseline = baseline_model is not None or config.baseline is not None
    if not (fns or has_answers or (judge is not None and has_baseline)):
        raise EvalSetupError("nothing to measure: pass --reward_funcs and/or --reward_model_path, a --judge with "
                             f"--baseline, or give the prompts in {loaded.source} an 'answer' column")
    if judge is not None and not has_baseline:
        raise EvalSetupError("--judge compares two models: give --baseline too")

    # the model, then the baseline: one in memory at a time when posttrain loads them
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs: dict[str, ModelRun] = {}
    samples_of_model = None
    vocab = None
    for name, given, path in (("model", model, config.model_name_or_path),
                              ("baseline", baseline_model, config.baseline)):
        if name == "baseline" and not has_baseline:
            break
        log(f"{name}: {'given in Python' if given is not None else path or 'the embedded default'}")
        current = given if given is not None else _load_model(path, config, device)
        was_training = current.training
        current.eval()
        if vocab is not None and _vocab_size(current) != vocab:
            raise EvalSetupError(f"the baseline's vocabulary has {_vocab_size(current)} tokens, the model's {vocab}: "
                                 "win rate and KL need both to share one tokenizer")
        vocab = _vocab_size(current)
        run = _generate_and_score(current, examples, tokenizer, config, fns, log)
        if "sampled" in run.rollouts:
            if samples_of_model is None:
                samples_of_model = run.rollouts["sampled"]
            if has_baseline:  # KL(model ‖ baseline) is measured on the model's own samples
                run.sample_logps = completion_logps(
                    current, samples_of_model.prompt_ids, samples_of_model.completion_ids,
                    pad_token_id=tokenizer.pad_token_id, temperature=config.temperature,
                    batch_size=config.per_device_eval_batch_size, chunk_size=config.logprob_chunk_size)
        runs[name] = run
        current.train(was_training)
        if given is None:
            del current
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    metrics = {name: _finite(_model_metrics(run, config.num_samples)) for name, run in runs.items()}
    comparison = _finite(_comparison(runs["model"], runs["baseline"], judge)) if "baseline" in runs else {}
    samples = _samples(examples, runs["model"], runs.get("baseline"))
    record = {
        "model": config.model_name_or_path or ("<python>" if model is not None else "embedded default"),
        "baseline": config.baseline or ("<python>" if baseline_model is not None else None),
        "dataset": loaded.source,
        "num_prompts": len(examples),
        "settings": {"greedy": config.greedy, "num_samples": config.num_samples, "temperature": config.temperature,
                     "top_p": config.top_p, "top_k": config.top_k, "max_completion_length": config.max_completion_length,
                     "seed": config.seed, "reward_funcs": list(config.reward_funcs),
                     "reward_model_path": config.reward_model_path, "judge": config.judge,
                     "num_shown_samples": config.num_shown_samples},
        "metrics": metrics,
        "comparison": comparison,
        "samples": samples,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / EVAL_FILE).write_text(json.dumps(record, indent=2))
    log("eval:\n" + _format_table(metrics, comparison))

    from posttrain.report.html_report import write_report_safely

    report = write_report_safely(output_dir, log)
    log(f"done: {output_dir / EVAL_FILE}" + (f", report {report}" if report else ""))
    return EvalResult(output_dir=output_dir, metrics=metrics, comparison=comparison, samples=samples,
                      report_path=report)
