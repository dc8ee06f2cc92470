"""Loss functions: pure tensor math, importable with torch alone (no transformers, no config).

``LOSSES`` maps a ``loss_type`` name to its function; recipes look functions up with
:func:`get_loss` so a misspelt name fails with the list of valid ones.
"""

from __future__ import annotations

from collections.abc import Callable

from posttrain.losses.reductions import AGGREGATION_MODES, aggregate_token_loss, masked_mean, masked_sum
from posttrain.losses.sft import sft_nll_loss, token_accuracy

LOSSES: dict[str, Callable] = {"sft": sft_nll_loss}


def get_loss(name: str) -> Callable:
    """The loss function registered under ``name``; ValueError naming the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        valid = ", ".join(sorted(LOSSES))
        raise ValueError(f"unknown loss {name!r}; valid losses: {valid}") from None


__all__ = [
    "AGGREGATION_MODES",
    "LOSSES",
    "aggregate_token_loss",
    "get_loss",
    "masked_mean",
    "masked_sum",
    "sft_nll_loss",
    "token_accuracy",
]
