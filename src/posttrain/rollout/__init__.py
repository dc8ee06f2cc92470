"""Generation and rewards for the online methods (GRPO, RLOO, PPO, Online DPO).

Token ids in, token ids out: prompts are tokenised once (:mod:`.prompts`), a backend samples
completions and their log-probs as ids (:mod:`.generation`), and reward functions score the
decoded text (:mod:`.rewards`). Names are imported lazily, so ``import posttrain.rollout`` is cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Rollout": "generation",
    "GenerationBackend": "generation",
    "HFGenerationBackend": "generation",
    "GenerationBackendError": "generation",
    "make_backend": "generation",
    "resolve_stop_token_ids": "generation",
    "PromptExample": "prompts",
    "prepare_prompts": "prompts",
    "RewardFunction": "rewards",
    "RewardFunctionError": "rewards",
    "RewardSpecError": "rewards",
    "RewardScores": "rewards",
    "load_reward_functions": "rewards",
    "score_completions": "rewards",
    "reward_inputs": "rewards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
