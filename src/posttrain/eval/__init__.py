"""Held-out evaluation: `evaluate(EvalConfig(...))` / `posttrain eval` (generation_eval), win rate
(win_rate), KL of a model to a baseline (kl_to_baseline). Names are imported lazily."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "generation_eval",
    "EvalResult": "generation_eval",
    "win_rate_from_scores": "win_rate",
    "judge_preferences": "win_rate",
    "sequence_kl": "kl_to_baseline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
