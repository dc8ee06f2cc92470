"""Loss functions: pure tensor math, importable with torch alone (no transformers, no config).

``LOSSES`` maps a ``loss_type`` name to its function; recipes look functions up with
:func:`get_loss` so a misspelt name fails with the list of valid ones. The pairwise preference
family (DPO variants, SimPO, ORPO), which shares one signature, has its own registry
``PREFERENCE_LOSSES`` and :func:`get_preference_loss` (its ``"sft"`` is the per-pair NLL of the
chosen response, not the token-level :func:`sft_nll_loss` registered in ``LOSSES``).

Online RL: ``"ppo_clip"`` (:func:`clipped_policy_loss`, per token) and ``"ppo_value"``
(:func:`value_loss`) are in ``LOSSES``; the GRPO ``loss_type`` names (``POLICY_LOSS_TYPES``:
grpo, dr_grpo, dapo, bnpo) are aggregation modes of :func:`aggregate_policy_loss`, the advantage
estimators and KL estimators (``KL_ESTIMATORS``) are plain functions.
"""

from __future__ import annotations

from collections.abc import Callable

from posttrain.losses.advantages import (
    ADVANTAGE_SCALES,
    gae,
    group_advantages,
    kl_penalized_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)
from posttrain.losses.kl import KL_ESTIMATORS, kl_estimate
from posttrain.losses.kto import kto_kl_reference, kto_loss
from posttrain.losses.policy_gradient import (
    POLICY_LOSS_TYPES,
    aggregate_policy_loss,
    clipped_policy_loss,
    explained_variance,
    masked_entropy_mean,
    value_loss,
)
from posttrain.losses.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE_LOSSES,
    USES_AVERAGE_LOGPS,
    USES_LABEL_SMOOTHING,
    CombinedPreferenceLoss,
    PreferenceLossOutput,
    PreferenceLossParams,
    combine_preference_losses,
    get_preference_loss,
)
from posttrain.losses.reductions import AGGREGATION_MODES, aggregate_token_loss, masked_mean, masked_sum
from posttrain.losses.reward import bradley_terry_loss, reward_accuracy, reward_margin
from posttrain.losses.sft import sft_nll_loss, token_accuracy

LOSSES: dict[str, Callable] = {
    "sft": sft_nll_loss,
    "bradley_terry": bradley_terry_loss,
    "kto": kto_loss,
    "ppo_clip": clipped_policy_loss,
    "ppo_value": value_loss,
}


def get_loss(name: str) -> Callable:
    """The loss function registered under ``name``; ValueError naming the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        valid = ", ".join(sorted(LOSSES))
        raise ValueError(f"unknown loss {name!r}; valid losses: {valid}") from None


__all__ = [
    "ADVANTAGE_SCALES",
    "AGGREGATION_MODES",
    "KL_ESTIMATORS",
    "LOSSES",
    "POLICY_LOSS_TYPES",
    "PREFERENCE_LOSSES",
    "REFERENCE_FREE_LOSSES",
    "USES_AVERAGE_LOGPS",
    "USES_LABEL_SMOOTHING",
    "CombinedPreferenceLoss",
    "PreferenceLossOutput",
    "PreferenceLossParams",
    "aggregate_policy_loss",
    "aggregate_token_loss",
    "bradley_terry_loss",
    "clipped_policy_loss",
    "combine_preference_losses",
    "explained_variance",
    "gae",
    "get_loss",
    "get_preference_loss",
    "group_advantages",
    "kl_estimate",
    "kl_penalized_rewards",
    "kto_kl_reference",
    "kto_loss",
    "masked_entropy_mean",
    "masked_mean",
    "masked_sum",
    "reinforce_pp_advantages",
    "reward_accuracy",
    "reward_margin",
    "rloo_advantages",
    "sft_nll_loss",
    "token_accuracy",
    "value_loss",
    "whiten",
]
