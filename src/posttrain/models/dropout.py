"""Dropout off: in the trained model (``--disable_dropout``, default on as in TRL) and, always, in
every quantity that stands for the old or reference policy (pitfall 25).

A ratio π/π_old is 1 at the first minibatch only if both sides are computed by the same function;
with dropout active in the rollout's no-grad forward, "old" log-probs are one random draw of the
masked network (≈0.2 nats/token apart with LoRA dropout 0.1), so clipping and KL see noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0, in place; returns how many were > 0.

    Two kinds: ``nn.Dropout`` modules (GPT-2's, peft's LoRA dropout) and float attributes that a
    module reads in its forward — Llama/Qwen/Mistral attention copies ``config.attention_dropout``
    into ``self.attention_dropout`` at init and passes it to attention in train mode, so editing
    the config afterwards would change nothing. The model's config is left as it was (saved as is).
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
            continue
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                changed += value > 0
                setattr(module, name, 0.0)
    return changed


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run the block with ``modules`` in eval mode (no dropout), then give every submodule back
    its own previous mode — not a blanket ``train()``, which would also wake submodules that were
    deliberately left in eval."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training
