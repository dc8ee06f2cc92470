"""posttrain: post-train language models — SFT, reward models, DPO, KTO, PPO, GRPO, RLOO, Online DPO.

    from posttrain import sft, SFTConfig
    result = sft(SFTConfig(dataset_name="chat.jsonl", output_dir="out", max_steps=20))

Recipes import torch/transformers only when called, so `import posttrain` stays light.
"""

from __future__ import annotations

from posttrain.config import (
    DPOConfig,
    EvalConfig,
    GRPOConfig,
    KTOConfig,
    OnlineDPOConfig,
    PPOConfig,
    RewardConfig,
    RLOOConfig,
    SFTConfig,
)

__version__ = "0.1.0"
__all__ = ["DPOConfig", "EvalConfig", "evaluate", "GRPOConfig", "KTOConfig", "OnlineDPOConfig", "PPOConfig", "RLOOConfig", "RewardConfig",
           "SFTConfig", "__version__", "dpo", "grpo", "kto", "online_dpo", "ppo", "reward", "rloo", "sft"]


def sft(config: SFTConfig, model=None, tokenizer=None, dataset=None):
    """Supervised fine-tuning; see posttrain.recipes.sft.sft."""
    from posttrain.recipes.sft import sft as run

    return run(config, model=model, tokenizer=tokenizer, dataset=dataset)


def dpo(config: DPOConfig, model=None, tokenizer=None, dataset=None, eval_dataset=None, ref_model=None):
    """DPO and its variants; see posttrain.recipes.dpo.dpo."""
    from posttrain.recipes.dpo import dpo as run

    return run(config, model=model, tokenizer=tokenizer, dataset=dataset, eval_dataset=eval_dataset,
               ref_model=ref_model)


def reward(config: RewardConfig, model=None, tokenizer=None, dataset=None, eval_dataset=None):
    """Reward modelling (Bradley-Terry); see posttrain.recipes.reward.reward."""
    from posttrain.recipes.reward import reward as run

    return run(config, model=model, tokenizer=tokenizer, dataset=dataset, eval_dataset=eval_dataset)


def kto(config: KTOConfig, model=None, tokenizer=None, dataset=None, eval_dataset=None, ref_model=None):
    """KTO on unpaired desirable/undesirable completions; see posttrain.recipes.kto.kto."""
    from posttrain.recipes.kto import kto as run

    return run(config, model=model, tokenizer=tokenizer, dataset=dataset, eval_dataset=eval_dataset,
               ref_model=ref_model)


def grpo(config: GRPOConfig, model=None, tokenizer=None, dataset=None, reward_funcs=None):
    """GRPO with reward functions and/or a reward model; see posttrain.recipes.grpo.grpo."""
    from posttrain.recipes.grpo import grpo as run

    return run(config, model=model, tokenizer=tokenizer, dataset=dataset, reward_funcs=reward_funcs)


def rloo(config: RLOOConfig, model=None, tokenizer=None, dataset=None, reward_funcs=None):
    """RLOO (leave-one-out baseline, KL in the reward); see posttrain.recipes.rloo.rloo."""
    from posttrain.recipes.rloo import rloo as run

    return run(config, model=model, tokenizer=tokenizer, dataset=dataset, reward_funcs=reward_funcs)


def ppo(config: PPOConfig, model=None, tokenizer=None, dataset=None, reward_funcs=None):
    """PPO with a critic (reward model score minus per-token KL, GAE); see posttrain.recipes.ppo.ppo."""
    from posttrain.recipes.ppo import ppo as run

    return run(config, model=model, tokenizer=tokenizer, dataset=dataset, reward_funcs=reward_funcs)


def online_dpo(config: OnlineDPOConfig, model=None, tokenizer=None, dataset=None, reward_funcs=None, ref_model=None):
    """Online DPO (two samples per prompt, ranked by rewards); see posttrain.recipes.online_dpo.online_dpo."""
    from posttrain.recipes.online_dpo import online_dpo as run

    return run(config, model=model, tokenizer=tokenizer, dataset=dataset, reward_funcs=reward_funcs,
               ref_model=ref_model)


def evaluate(config: EvalConfig, model=None, tokenizer=None, dataset=None, baseline_model=None):
    """Held-out evaluation of a model, optionally against a baseline; see posttrain.eval.generation_eval."""
    from posttrain.eval.generation_eval import evaluate as run

    return run(config, model=model, tokenizer=tokenizer, dataset=dataset, baseline_model=baseline_model)
