"""Win rate of model A over model B on the same prompts: by a score (reward) or by a judge.

Completions are paired: pair i is A's and B's answer to the same prompt, sampled with the same
seed (greedy: the one greedy answer each). A judge is a callable

    judge(prompts, completions_a, completions_b, **columns) -> list[float in [0, 1]]

returning, per pair, the probability that the FIRST completion is the better one (1: a, 0: b,
0.5: a tie). Columns are the dataset's other fields (e.g. ``answer``); a judge without
``**kwargs`` gets only the columns it names as parameters.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

from posttrain.errors import PosttrainError

Judge = Callable[..., list]


class JudgeError(PosttrainError):
    """A judge cannot be loaded, failed, or returned something that is not one probability per pair."""


def win_rate_from_scores(scores_a: Tensor, scores_b: Tensor) -> Tensor:
    """Fraction of pairs where A scores higher than B, a tie counting one half.

    scores_a, scores_b: (N,) scores of the paired completions.

        win_rate = (1/N) * sum_i [ 1(a_i > b_i) + 1/2 * 1(a_i = b_i) ]

    Returns a 0-dim float64 tensor in [0, 1]. A model against itself (equal scores) gives
    exactly 0.5; 0.5 means "no better, no worse", not "no data".
    """
    if scores_a.shape != scores_b.shape or scores_a.dim() != 1:
        raise ValueError(f"scores_a {tuple(scores_a.shape)} and scores_b {tuple(scores_b.shape)} must be equal (N,)")
    if scores_a.numel() == 0:
        raise ValueError("no pairs to compare")
    a, b = scores_a.double(), scores_b.double()
    return ((a > b).double() + 0.5 * (a == b).double()).mean()


def debiased_judge_preference(p_ab: Tensor, p_ba: Tensor) -> Tensor:
    """Per-pair probability that A is better, from a judge asked in both orders.

    p_ab: (N,) judge(a, b), the probability that a (shown first) is better; p_ba: (N,) judge(b, a).
    A judge that favours whichever completion is shown first adds the same bias to both, so

        w_i = 1/2 * (p_ab_i + 1 - p_ba_i) = 1/2 + 1/2 * (p_ab_i - p_ba_i)

    cancels it. Written in the second form, A against itself (p_ab == p_ba) is exactly 0.5 for any
    deterministic judge. Returns (N,) float64.
    """
    if p_ab.shape != p_ba.shape:
        raise ValueError(f"p_ab {tuple(p_ab.shape)} and p_ba {tuple(p_ba.shape)} differ")
    return 0.5 + 0.5 * (p_ab.double() - p_ba.double())


def load_judge(spec: str) -> Judge:
    """``module:function`` (or ``path/to/file.py:function``) -> the judge callable."""
    from posttrain.rollout.rewards import BUILTINS, RewardSpecError, load_reward_functions

    name = spec.split("=", 1)[0]
    if ":" not in spec or name in BUILTINS:
        raise JudgeError(f"--judge {spec!r}: expected module:function, a judge "
                         "fn(prompts, completions_a, completions_b, **columns) -> list of P(a better)")
    try:
        return load_reward_functions([spec])[0]  # the same importer as --reward_funcs
    except RewardSpecError as e:
        raise JudgeError(str(e).replace("reward function", "judge", 1)) from None


def _columns_for(fn: Judge, columns: dict[str, list]) -> dict[str, list]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return columns
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return columns
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in columns.items() if k in named}


def _call_judge(judge: Judge, prompts: list, first: list, second: list, columns: dict[str, list]) -> Tensor:
    name = getattr(judge, "__name__", type(judge).__name__)
    try:
        out = judge(prompts, first, second, **_columns_for(judge, columns))
    except Exception as e:
        raise JudgeError(f"judge {name!r} raised {type(e).__name__}: {e}") from e
    if isinstance(out, Tensor):
        out = out.reshape(-1).tolist()
    out = list(out)
    if len(out) != len(prompts):
        raise JudgeError(f"judge {name!r} returned {len(out)} values for {len(prompts)} pairs (one per pair)")
    for i, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
            raise JudgeError(f"judge {name!r} returned {v!r} for pair {i}; expected a probability in [0, 1]")
    return torch.tensor(out, dtype=torch.float64)


def judge_preferences(judge: Judge, prompts: list, completions_a: list, completions_b: list,
                      columns: dict[str, list] | None = None) -> Tensor:
    """(N,) probability that A's completion is better, the judge asked in both orders
    (:func:`debiased_judge_preference`)."""
    columns = columns or {}
    p_ab = _call_judge(judge, prompts, completions_a, completions_b, columns)
    p_ba = _call_judge(judge, prompts, completions_b, completions_a, columns)
    return debiased_judge_preference(p_ab, p_ba)
