"""The GRPO benchmark's reward function, imported by both sides (standard library only).

    posttrain grpo --reward_funcs grpo_reward:arithmetic_reward      (with benchmarks/ on PYTHONPATH)
    GRPOTrainer(reward_funcs=[grpo_reward.arithmetic_reward], ...)

Deterministic and dense enough to vary within a group on the untrained SmolLM2-135M-Instruct:
1.0 when the last number of the completion is the answer, 0.5 when the answer appears anywhere
else in it, 0.0 otherwise. Completions arrive as message lists (conversational prompts) on both
sides; plain strings are accepted too.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+")


def _text(completion) -> str:
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def arithmetic_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """One score per completion, from the dataset's `answer` column (an integer as text)."""
    scores = []
    for completion, expected in zip(completions, answer):
        numbers = _NUMBER.findall(_text(completion))
        if numbers and numbers[-1] == str(expected):
            scores.append(1.0)
        elif str(expected) in numbers:
            scores.append(0.5)
        else:
            scores.append(0.0)
    return scores
