"""Supervised fine-tuning loss: negative log-likelihood of the supervised tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.losses.reductions import masked_sum


def sft_nll_loss(token_logps: Tensor, mask: Tensor, *, normalizer: float | Tensor | None = None) -> Tensor:
    """Token-mean negative log-likelihood over the optimizer step.

    ``L = - sum_{i,t} m_it * log p(y_it | y_i,<t) / N``

    token_logps: (B, T) log-probabilities of the target tokens (fp32).
    mask: (B, T) 1 where the token is supervised (built from explicit masks, never pad ids).
    normalizer: N, the number of supervised tokens in the WHOLE optimizer step (all micro-batches,
        all processes); default ``mask.sum()`` of this batch. Returns a scalar.
    """
    total = -masked_sum(token_logps, mask)
    if normalizer is None:
        normalizer = mask.to(torch.bool).sum().clamp(min=1)
    if isinstance(normalizer, Tensor):
        normalizer = normalizer.to(device=total.device, dtype=total.dtype)
    return total / normalizer


def token_accuracy(correct: Tensor, mask: Tensor) -> Tensor:
    """Fraction of supervised tokens whose argmax prediction is the target.

    ``acc = sum(correct * m) / sum(m)``; correct and mask (B, T); returns an fp32 scalar
    (0 when nothing is supervised). No gradient.
    """
    mask = mask.to(torch.bool)
    hits = (correct.to(torch.bool) & mask).sum().float()
    return hits / mask.sum().clamp(min=1).float()
