"""Reward functions and judges the eval tests load by `path/to/scorers.py:name`, as a user would."""

from __future__ import annotations

from posttrain.rollout.rewards import completion_text


def text_length(prompts, completions, **columns):
    """A reward that knows nothing of the task: characters / 10."""
    return [len(completion_text(c)) / 10 for c in completions]


def always_one(prompts, completions, **columns):
    return [1.0 for _ in completions]


def first_shown_bias_longer(prompts, completions_a, completions_b, **columns):
    """A judge with a position bias: prefers the longer text, and the first one shown by 0.2."""
    out = []
    for a, b in zip(completions_a, completions_b):
        la, lb = len(completion_text(a)), len(completion_text(b))
        out.append(min(1.0, (0.8 if la > lb else 0.3 if la < lb else 0.5) + 0.2))
    return out


def out_of_range_judge(prompts, completions_a, completions_b):
    return [1.5 for _ in completions_a]
