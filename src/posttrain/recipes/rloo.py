"""REINFORCE leave-one-out: `posttrain rloo` and `posttrain.rloo(RLOOConfig(...))`.

The same rollout as GRPO (recipes/grpo.py: sample G completions per prompt, score them); what
differs is the advantage. The KL to the reference is folded into each completion's reward with
the k1 estimator summed over its tokens, and the baseline is the mean of the OTHER completions of
the same prompt (Ahmadian et al. 2024):

    r'_i = r_i - beta * sum_t (log pi(y_t) - log pi_ref(y_t)),     A_i = r'_i - (1/(G-1)) sum_{j != i} r'_j

The policy loss is the clipped surrogate with these advantages, aggregated per --loss_type.
"""

from __future__ import annotations

from posttrain.config import RLOOConfig
from posttrain.recipes.grpo import GRPOResult, train_on_groups


def rloo(config: RLOOConfig, model=None, tokenizer=None, dataset=None, reward_funcs=None) -> GRPOResult:
    """Train `model` with RLOO; arguments as posttrain.grpo."""
    return train_on_groups(config, "rloo", model, tokenizer, dataset, reward_funcs)
