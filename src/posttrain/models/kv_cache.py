"""The KV-cache argument across transformers versions.

transformers 5.2x renamed a model's ``past_key_values`` argument and output field to ``cache``;
the old name warns on every call and is removed in 5.40, while 4.x only knows the old one.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.cache
def _cache_kwarg_for(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name `model.forward` takes (``cache`` or ``past_key_values``); a
    peft wrapper (whose forward takes **kwargs) is looked through to its base model."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return {_cache_kwarg_for(type(model)): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache``, or ``output.past_key_values`` on 4.x)."""
    cache = output.get("cache") if hasattr(output, "get") else getattr(output, "cache", None)
    if cache is None:
        cache = output.get("past_key_values") if hasattr(output, "get") else getattr(output, "past_key_values", None)
    return cache
