"""Typed run configuration: one dataclass per concern, composed per method.

Every field carries its help text in `metadata["help"]`; the command line and `--config run.yaml`
are generated from these dataclasses (transformers' HfArgumentParser), so a flag, a YAML key and a
Python keyword are the same name. Names follow TRL / Hugging Face where the concept is shared, so
a `trl sft ...` command line runs with the program name changed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (shown by --help and in docs)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: list(value) if isinstance(value, list) else dict(value),
                     metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """Which model to train and how it is loaded."""

    model_name_or_path: str | None = _f(
        None, "Hub id, local directory or .gguf file. Unset: the embedded SmolLM2-135M-Instruct.")
    model_revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the model.")
    tokenizer_name_or_path: str | None = _f(None, "Tokenizer to use; default: the model's own.")
    dtype: str = _f("auto", "auto or float32: fp32 weights (--bf16 decides autocast). bfloat16/float16: fp32 master "
                            "weights + autocast in that dtype (with --use_peft the frozen base is held in it); pure "
                            "bf16 weights only with --low_precision_master_weights (docs/precision.md).")
    low_precision_master_weights: bool = _f(
        False, "With --dtype bfloat16: train the weights and AdamW state in pure bf16 (saves memory; updates below "
               "~2^-8 of a weight round away, e.g. most at lr 1e-6). Off: fp32 master weights.")
    attn_implementation: str | None = _f(None, "Attention backend: sdpa, eager, flash_attention_2, ...")
    trust_remote_code: bool = _f(False, "Run code shipped with a hub model. Off unless given.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    use_peft: bool = _f(False, "Train a LoRA adapter (peft) instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA branch.")
    lora_target_modules: list[str] | None = _f(
        None, "Module names to adapt (e.g. q_proj v_proj); default: all linear layers.")
    merge_adapter: bool = _f(False, "With --use_peft, also save the adapter merged into full weights in OUTPUT_DIR/merged.")
    adapter_start: str = _f("continue", "When --model_name_or_path is a LoRA adapter dir: continue (train that adapter; "
                                        "reference = it, frozen) or merge (fold it into the base, train a new LoRA).")
    disable_dropout: bool = _f(True, "Set every dropout probability (attention, hidden, LoRA) to 0, as TRL.")


@dataclass
class DataConfig:
    """Where the training data comes from."""

    dataset_name: str | None = _f(None, "A JSONL/JSON/CSV/Parquet file, a directory of them, or a hub dataset.")
    dataset_config: str | None = _f(None, "Hub dataset configuration name.")
    dataset_split: str = _f("train", "Split to train on (alias: --dataset_train_split).")
    max_length: int | None = _f(1024, "Longest sequence in tokens; longer rows are truncated (reported).")


@dataclass
class SFTDataConfig(DataConfig):
    """How SFT rows become token batches."""

    truncation_side: str = _f("right", "Which end to cut over-long rows from: right or left.")
    packing: bool = _f(False, "Pack examples into rows of max_length (best-fit decreasing), padding-free.")
    padding_free: bool = _f(False, "Concatenate each batch into one row without padding (implied by --packing).")
    completion_only_loss: bool | None = _f(
        None, "Prompt-completion data: train on the completion only (default True).")
    assistant_only_loss: bool = _f(False, "Conversational data: train on assistant turns only.")
    dataset_text_field: str = _f("text", "Column holding raw text for language-modelling data.")


@dataclass
class PreferenceDataConfig(DataConfig):
    """Preference pairs (or KTO's unpaired rows): truncation, batching and the held-out split."""

    max_prompt_length: int | None = _f(512, "Longest prompt in tokens; longer prompts are truncated first.")
    truncation_mode: str = _f("keep_end", "Prompt truncation: keep_end (keep its last tokens) or keep_start.")
    padding_free: bool = _f(False, "Run each batch's sequences as one padding-free row (position_ids restart).")
    eval_split_ratio: float = _f(0.0, "Hold out this fraction of the data for evaluation metrics.")
    eval_dataset_name: str | None = _f(None, "A separate held-out preference file (instead of a split).")
    per_device_eval_batch_size: int = _f(8, "Pairs per evaluation batch.")
    eval_steps: int = _f(0, "Evaluate every this many optimizer steps (0: only at the end).")


@dataclass
class ReferenceConfig:
    """The frozen reference policy of KL-regularised methods."""

    ref_model_name_or_path: str | None = _f(
        None, "Reference model; default: the starting policy (with LoRA: the adapter disabled, no second copy).")
    precompute_ref_log_probs: bool = _f(
        False, "Compute reference log-probs once before training and cache them on disk (no reference in memory).")


@dataclass
class TrainingConfig:
    """The optimisation loop, logging and checkpoints shared by every method."""

    output_dir: str = _f("runs/posttrain", "Where the model, config.yaml, metrics.jsonl and checkpoints go.")
    seed: int = _f(42, "Random seed for initialisation, shuffling and sampling.")
    learning_rate: float = _f(2e-5, "Peak learning rate of AdamW.")
    lr_scheduler_type: str = _f("linear", "Schedule after warmup: linear, cosine, constant, constant_with_warmup, ...")
    warmup_ratio: float = _f(0.0, "Fraction of the optimizer steps spent warming up linearly.")
    warmup_steps: int = _f(0, "Warmup steps (overrides --warmup_ratio when > 0).")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0 disables clipping).")
    per_device_train_batch_size: int = _f(
        8, "Sequences per micro-batch per device (packed rows when --packing).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    max_steps: int = _f(-1, "Optimizer steps to run; -1 means --num_train_epochs decides.")
    num_train_epochs: float = _f(3.0, "Passes over the data when --max_steps is not set.")
    bf16: bool | None = _f(None, "bf16 autocast of forward/backward, fp32 master weights; default (auto): on where "
                                 "bf16 is fast (CUDA with bf16, CPU with AMX/AVX512-BF16), else fp32.")
    fp16: bool = _f(False, "fp16 autocast with a gradient scaler (CUDA only); overflowing steps are skipped, not fatal.")
    logging_steps: int = _f(10, "Write a metrics line every this many optimizer steps.")
    save_steps: int = _f(500, "Write a checkpoint every this many optimizer steps (0: only at the end).")
    save_total_limit: int | None = _f(None, "Keep at most this many checkpoints (oldest deleted).")
    resume_from_checkpoint: str | None = _f(None, "Checkpoint dir to resume from, or 'latest'.")
    report_to: list[str] = _f(["none"], "Trackers: none, tensorboard, wandb, trackio, mlflow (several allowed).")
    run_name: str | None = _f(None, "Run name shown by trackers.")
    logprob_chunk_size: int = _f(1024, "Tokens per chunk when computing log-probs over the vocabulary.")
    disable_tqdm: bool = _f(False, "Hide the progress bar.")


@dataclass
class SFTConfig(ModelConfig, SFTDataConfig, TrainingConfig):
    """Supervised fine-tuning (`posttrain sft`)."""

    output_dir: str = _f("runs/sft", "Where the model, config.yaml, metrics.jsonl and checkpoints go.")


@dataclass
class RewardConfig(ModelConfig, PreferenceDataConfig, TrainingConfig):
    """Reward modelling with a Bradley-Terry loss (`posttrain reward`)."""

    output_dir: str = _f("runs/reward", "Where the model, config.yaml, metrics.jsonl and checkpoints go.")
    learning_rate: float = _f(1e-5, "Peak learning rate of AdamW.")
    num_train_epochs: float = _f(1.0, "Passes over the data when --max_steps is not set.")
    center_rewards_coefficient: float | None = _f(
        None, "Weight of the (r_chosen + r_rejected)^2 penalty that keeps rewards centred at 0 (e.g. 0.01).")


@dataclass
class DPOConfig(ModelConfig, PreferenceDataConfig, ReferenceConfig, TrainingConfig):
    """Direct preference optimisation and its variants (`posttrain dpo`)."""

    output_dir: str = _f("runs/dpo", "Where the model, config.yaml, metrics.jsonl and checkpoints go.")
    learning_rate: float = _f(1e-6, "Peak learning rate of AdamW.")
    num_train_epochs: float = _f(1.0, "Passes over the data when --max_steps is not set.")
    beta: float = _f(0.1, "KL strength beta (ORPO: the odds-ratio weight lambda).")
    loss_type: list[str] = _f(["sigmoid"], "One or more of: sigmoid hinge ipo robust exo_pair nca_pair bco_pair "
                                           "sppo_hard aot aot_pair apo_zero apo_down discopop sft simpo orpo.")
    loss_weights: list[float] | None = _f(None, "Weights of the --loss_type terms (default: all 1).")
    label_smoothing: float = _f(0.0, "Label noise epsilon for sigmoid (cDPO), robust and exo_pair.")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin gamma.")
    discopop_tau: float = _f(0.05, "DiscoPOP temperature tau.")


@dataclass
class KTOConfig(ModelConfig, PreferenceDataConfig, ReferenceConfig, TrainingConfig):
    """Kahneman-Tversky optimisation on unpaired good/bad completions (`posttrain kto`)."""

    output_dir: str = _f("runs/kto", "Where the model, config.yaml, metrics.jsonl and checkpoints go.")
    learning_rate: float = _f(1e-6, "Peak learning rate of AdamW.")
    num_train_epochs: float = _f(1.0, "Passes over the data when --max_steps is not set.")
    beta: float = _f(0.1, "KL strength beta.")
    desirable_weight: float = _f(1.0, "Loss weight of desirable (label true) rows.")
    undesirable_weight: float = _f(1.0, "Loss weight of undesirable (label false) rows.")


@dataclass
class PromptDataConfig(DataConfig):
    """Prompts for online methods (other columns, e.g. `answer`, are passed to reward functions)."""

    max_prompt_length: int | None = _f(512, "Longest prompt in tokens; longer prompts are truncated.")
    truncation_mode: str = _f("keep_end", "Prompt truncation: keep_end (keep its last tokens) or keep_start.")


@dataclass
class GenerationSettings:
    """How the policy samples completions during training."""

    num_generations: int = _f(8, "Completions sampled per prompt (the group size).")
    max_completion_length: int = _f(256, "Longest completion in tokens; longer ones are cut (truncated).")
    temperature: float = _f(1.0, "Sampling temperature.")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0: off).")
    top_k: int = _f(0, "Top-k sampling (0: off).")
    stop_token: list[str] | None = _f(None, "Extra stop tokens besides the model's end-of-sequence ids.")
    generation_backend: str = _f("hf", "Sampler: hf (transformers generate with KV cache) or vllm (GPU, [vllm] extra).")


@dataclass
class RewardSettings:
    """Where rewards come from."""

    reward_funcs: list[str] = _f([], "Reward functions: module:function, or built-ins accuracy, format, length_penalty.")
    reward_weights: list[float] | None = _f(None, "Weights of the reward functions (default: all 1).")
    reward_model_path: str | None = _f(None, "A reward model directory (posttrain reward output), used as a reward function.")
    missing_eos_penalty: float | None = _f(
        None, "Subtracted from the score of a completion that ended without a stop token (cut by length), e.g. 1.0.")


@dataclass
class GRPOConfig(ModelConfig, PromptDataConfig, ReferenceConfig, GenerationSettings, RewardSettings, TrainingConfig):
    """Group relative policy optimisation (`posttrain grpo`).

    Batch semantics (as TRL): an optimizer step trains on per_device_train_batch_size x
    gradient_accumulation_steps x processes completions, i.e. that number / num_generations prompts."""

    output_dir: str = _f("runs/grpo", "Where the model, config.yaml, metrics.jsonl and checkpoints go.")
    learning_rate: float = _f(1e-6, "Peak learning rate of AdamW.")
    num_train_epochs: float = _f(1.0, "Passes over the prompts when --max_steps is not set.")
    beta: float = _f(0.0, "KL penalty weight (0: no reference model is loaded).")
    kl_estimator: str = _f("k3", "Per-token KL estimator: k2 or k3 as a loss term; k1 or k3 in the reward.")
    kl_in: str = _f("loss", "Where the KL goes: loss (beta x per-token KL added to the loss) or reward "
                    "(beta x the completion's summed KL subtracted from its reward, before the advantages).")
    loss_type: str = _f("dapo", "Aggregation: grpo (per-sequence mean), dr_grpo, dapo (global token mean), bnpo.")
    scale_rewards: str = _f("group", "Advantage scaling: group (std of the group), batch, or none (Dr. GRPO).")
    epsilon: float = _f(0.2, "Lower clip range of the importance ratio.")
    epsilon_high: float | None = _f(None, "Upper clip range (default: --epsilon; DAPO uses 0.28).")
    num_iterations: int = _f(1, "Optimisation passes over each batch of rollouts (mu).")
    mask_truncated_completions: bool = _f(False, "Exclude completions cut by max_completion_length from the loss and its denominator.")


@dataclass
class RLOOConfig(GRPOConfig):
    """REINFORCE leave-one-out (`posttrain rloo`): the GRPO rollout with the KL folded into the
    reward (always --kl_in reward; k1 by default) and a leave-one-out baseline; --scale_rewards
    does not apply."""

    output_dir: str = _f("runs/rloo", "Where the model, config.yaml, metrics.jsonl and checkpoints go.")
    beta: float = _f(0.05, "Weight of the KL (summed over the completion) subtracted from the reward.")
    kl_estimator: str = _f("k1", "Per-token KL estimator in the reward: k1 or k3.")
    kl_in: str = _f("reward", "Where the KL goes: RLOO always folds it into the reward.")


@dataclass
class PPOConfig(ModelConfig, PromptDataConfig, ReferenceConfig, GenerationSettings, RewardSettings, TrainingConfig):
    """PPO with a critic, the classic RLHF step (`posttrain ppo`).

    Batch semantics (as TRL): one PPO iteration samples per_device_train_batch_size x
    gradient_accumulation_steps x num_mini_batches completions per process, then makes
    num_ppo_epochs x num_mini_batches optimizer updates on them. Steps (--max_steps, --save_steps,
    --logging_steps) count iterations."""

    output_dir: str = _f("runs/ppo", "Where the model, config.yaml, metrics.jsonl and checkpoints go.")
    learning_rate: float = _f(3e-6, "Peak learning rate of AdamW (policy and critic).")
    num_train_epochs: float = _f(1.0, "Passes over the prompts when --max_steps is not set.")
    max_steps: int = _f(-1, "PPO iterations (rollout batches) to run; -1 means --num_train_epochs decides.")
    num_generations: int = _f(1, "Completions sampled per prompt.")
    value_model_path: str | None = _f(
        None, "Critic initialisation: a reward model or causal-LM dir (default: --reward_model_path, as TRL).")
    value_head_on_policy: bool = _f(
        False, "Critic = a linear value head on the policy's own hidden states (one backbone, no second model).")
    kl_coef: float = _f(0.05, "Weight beta of the per-token KL penalty in the reward.")
    kl_estimator: str = _f("k1", "Per-token KL estimator in the reward: k1 or k3.")
    gamma: float = _f(1.0, "Discount factor of GAE.")
    lam: float = _f(0.95, "Lambda of GAE.")
    whiten_rewards: bool = _f(False, "Whiten the per-token rewards over the rollout (scale only) before GAE.")
    cliprange: float = _f(0.2, "Clip range epsilon of the policy ratio.")
    cliprange_value: float = _f(0.2, "Clip range of the value prediction around the rollout's value.")
    vf_coef: float = _f(0.1, "Weight of the value loss in the total loss.")
    num_ppo_epochs: int = _f(4, "Optimisation passes over each rollout.")
    num_mini_batches: int = _f(1, "Mini-batches (optimizer updates) per pass over a rollout.")


@dataclass
class OnlineDPOConfig(ModelConfig, PromptDataConfig, ReferenceConfig, GenerationSettings, RewardSettings,
                      TrainingConfig):
    """Online DPO (`posttrain online-dpo`): two completions per prompt, ranked by the reward
    functions / reward model, a DPO (or IPO) step on the pair against the frozen reference.

    Batch semantics (as TRL): per_device_train_batch_size counts PROMPTS (pairs) per micro-batch;
    each pair is two sequences in one forward."""

    output_dir: str = _f("runs/online-dpo", "Where the model, config.yaml, metrics.jsonl and checkpoints go.")
    learning_rate: float = _f(5e-7, "Peak learning rate of AdamW.")
    num_train_epochs: float = _f(1.0, "Passes over the prompts when --max_steps is not set.")
    per_device_train_batch_size: int = _f(8, "Prompts (= preference pairs, 2 completions each) per micro-batch per device.")
    num_generations: int = _f(2, "Completions per prompt: always 2 (one chosen, one rejected).")
    max_completion_length: int = _f(64, "Longest completion in tokens (alias --max_new_tokens); longer ones are cut.")
    temperature: float = _f(0.9, "Sampling temperature; log-probs in the loss use the same temperature (as TRL).")
    beta: float = _f(0.1, "KL strength beta of the DPO / IPO loss.")
    loss_type: str = _f("sigmoid", "sigmoid (DPO, summed log-probs) or ipo (IPO, average log-probs).")


@dataclass
class EvalConfig:
    """Held-out evaluation (`posttrain eval`): generate on prompts, score, compare with a baseline.

    Not a training run: no optimizer, no steps. Writes OUTPUT_DIR/eval.json and report.html."""

    model_name_or_path: str | None = _f(
        None, "The model to evaluate (hub id, directory, .gguf). Unset: the embedded SmolLM2-135M-Instruct.")
    baseline: str | None = _f(None, "A second model to compare with (win rate, KL to it); e.g. the model before training.")
    tokenizer_name_or_path: str | None = _f(None, "Tokenizer for both models; default: the model's own.")
    dtype: str = _f("auto", "Weights dtype of both models (inference): auto (bf16 on a bf16 GPU, else fp32), "
                            "float32, bfloat16, float16.")
    attn_implementation: str | None = _f(None, "Attention backend: sdpa, eager, flash_attention_2, ...")
    trust_remote_code: bool = _f(False, "Run code shipped with a hub model. Off unless given.")
    dataset_name: str | None = _f(None, "Held-out prompts: a JSONL/JSON/CSV/Parquet file, a directory, or a hub dataset.")
    dataset_config: str | None = _f(None, "Hub dataset configuration name.")
    dataset_split: str = _f("train", "Split to read (a local file has one split, 'train').")
    max_eval_samples: int | None = _f(None, "Evaluate on the first N prompts only (default: all).")
    max_prompt_length: int | None = _f(512, "Longest prompt in tokens; longer prompts are truncated.")
    truncation_mode: str = _f("keep_end", "Prompt truncation: keep_end (keep its last tokens) or keep_start.")
    max_completion_length: int = _f(256, "Longest completion in tokens; longer ones are cut (truncated).")
    greedy: bool = _f(True, "Also decode one greedy completion per prompt (temperature 0).")
    num_samples: int = _f(4, "Sampled completions per prompt (0: greedy only); KL is measured on these.")
    temperature: float = _f(1.0, "Sampling temperature (also the temperature of the KL's log-probs).")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0: off).")
    top_k: int = _f(0, "Top-k sampling (0: off).")
    stop_token: list[str] | None = _f(None, "Extra stop tokens besides the model's end-of-sequence ids.")
    reward_funcs: list[str] = _f([], "Reward functions: module:function, or built-ins accuracy, format, length_penalty.")
    reward_weights: list[float] | None = _f(None, "Weights of the reward functions (default: all 1).")
    reward_model_path: str | None = _f(None, "A reward model directory (posttrain reward output), scored as a reward.")
    judge: str | None = _f(
        None, "module:function judge fn(prompts, completions_a, completions_b, **columns) -> P(a better) in [0, 1].")
    per_device_eval_batch_size: int = _f(16, "Prompts per generate call and sequences per log-prob forward.")
    num_shown_samples: int = _f(8, "Prompts whose generations are shown side by side in the report.")
    output_dir: str = _f("runs/eval", "Where eval.json, config.yaml and report.html go.")
    seed: int = _f(42, "Sampling seed; both models sample with the same seeds.")
    logprob_chunk_size: int = _f(1024, "Tokens per chunk when computing log-probs over the vocabulary.")


# Names TRL / transformers accept that mean the same as one of ours.
FLAG_ALIASES: dict[str, str] = {
    "dataset_train_split": "dataset_split",
    "torch_dtype": "dtype",
    "max_new_tokens": "max_completion_length",  # TRL's OnlineDPOConfig name
}


class ConfigError(ValueError):
    """A config key, flag or value that posttrain cannot use; the message names the fix."""


def field_names(config_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


def closest_key(name: str, valid: list[str]) -> str | None:
    """The valid key nearest to a misspelt one, for 'did you mean' messages."""
    matches = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_key_error(name: str, valid: list[str], where: str, flag: bool = False) -> ConfigError:
    prefix = "--" if flag else ""
    guess = closest_key(name, valid)
    hint = f"; did you mean {prefix}{guess}?" if guess else ""
    return ConfigError(f"{where}: unknown {'flag' if flag else 'key'} {prefix}{name}{hint}")


def _base_type_name(hint: Any) -> str:
    """'int', 'float', 'bool', 'str' or 'list' for a field hint such as `int | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return "list"
    if args and typing.get_origin(hint) is not list:
        return _base_type_name(args[0])
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, annotation: str, key: str, where: str) -> Any:
    """YAML reads `1e-5` as a string and a lone item as a scalar: bring values to the field's type."""
    if value is None:
        return None
    try:
        if annotation.startswith("list"):
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split(",")
        if annotation.startswith("float"):
            return float(value)
        if annotation.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value} is not a whole number")
            return int(value)
        if annotation.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1"):
                    return True
                if value.lower() in ("false", "no", "0"):
                    return False
                raise ValueError(f"{value!r} is not true/false")
            return bool(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {key}: expected {annotation}, got {value!r} ({exc})") from None
    return value


def check_keys(values: dict[str, Any], config_cls: type, where: str) -> dict[str, Any]:
    """Map aliases to canonical names, reject unknown keys (naming the closest valid key) and
    coerce values to the field types."""
    fields = {name: _base_type_name(hint) for name, hint in typing.get_type_hints(config_cls).items()}
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = FLAG_ALIASES.get(key, key)
        if key not in fields:
            raise unknown_key_error(key, list(fields), where)
        out[key] = _coerce(value, fields[key], key, where)
    return out


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def validate_training_config(config: TrainingConfig) -> None:
    """Reject values that would make a run silently wrong, with the field named."""
    if config.per_device_train_batch_size < 1:
        raise ConfigError("per_device_train_batch_size must be >= 1")
    if config.gradient_accumulation_steps < 1:
        raise ConfigError("gradient_accumulation_steps must be >= 1")
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise ConfigError("set --max_steps > 0 or --num_train_epochs > 0")
    if config.logging_steps < 1:
        raise ConfigError("logging_steps must be >= 1")
    if config.save_steps < 0:
        raise ConfigError("save_steps must be >= 0")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise ConfigError("warmup_ratio must be in [0, 1)")
    valid_trackers = {"none", "tensorboard", "wandb", "trackio", "mlflow", "all"}
    for name in config.report_to:
        if name not in valid_trackers:
            guess = closest_key(name, sorted(valid_trackers))
            raise ConfigError(f"report_to: unknown tracker {name!r}" + (f"; did you mean {guess}?" if guess else ""))
