"""Masked reductions and the one token-loss aggregation every recipe uses.

Pure tensor functions (torch only). The normaliser of a loss is computed ONCE per optimizer
step by the caller (over all micro-batches and processes) and passed in, so the gradient does
not depend on how the step's batch is split (pitfalls 8 and 14): with a global normaliser,
``sum_k loss(micro_batch_k)`` equals ``loss(whole_batch)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AggregationMode = Literal["token_mean", "sequence_mean", "sum"]
AGGREGATION_MODES: tuple[str, ...] = ("token_mean", "sequence_mean", "sum")


def masked_sum(values: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """``sum(values * mask)`` over ``dim`` (all dims when None).

    Shapes: values and mask broadcastable, e.g. (B, T). Masked-out entries are replaced by 0
    with ``where`` (not multiplied), so a NaN/inf in a padded position cannot leak in.
    """
    mask = mask.to(torch.bool)
    zeros = torch.zeros((), dtype=values.dtype, device=values.device)
    kept = torch.where(mask, values, zeros)
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """``sum(values * mask) / sum(mask)`` over ``dim`` (all dims when None).

    An all-masked slice gives 0, not NaN (count clamped to 1): an empty row contributes nothing.
    """
    total = masked_sum(values, mask, dim)
    count = mask.to(total.dtype if total.is_floating_point() else torch.float32)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return total / count.clamp(min=1)


def aggregate_token_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    *,
    mode: AggregationMode = "token_mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    With ``l`` the loss, ``m`` the 0/1 mask, ``n_i = sum_t m_it`` and ``Z`` the normaliser:

    - ``token_mean``:    ``L = sum_{i,t} l_it m_it / Z``, Z = target tokens in the whole optimizer
      step (default: ``mask.sum()`` of this batch, i.e. correct only without accumulation).
    - ``sequence_mean``: ``L = sum_i (sum_t l_it m_it / n_i) / Z``, Z = sequences in the step
      (default B). Rows with ``n_i = 0`` contribute 0.
    - ``sum``:           ``L = sum_{i,t} l_it m_it / Z``, Z a constant (default 1), e.g. Dr.GRPO's
      ``max_completion_length`` times the number of sequences.

    Returns a 0-dim tensor in the loss's dtype.
    """
    if per_token_loss.shape != mask.shape:
        raise ValueError(f"per_token_loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} differ")
    if mode == "token_mean":
        total = masked_sum(per_token_loss, mask)
        if normalizer is None:
            normalizer = mask.to(torch.bool).sum().clamp(min=1)
    elif mode == "sequence_mean":
        per_seq = masked_mean(per_token_loss, mask, dim=-1)
        total = per_seq.sum()
        if normalizer is None:
            normalizer = per_seq.numel()
    elif mode == "sum":
        total = masked_sum(per_token_loss, mask)
        if normalizer is None:
            normalizer = 1.0
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATION_MODES)}")
    if isinstance(normalizer, Tensor):
        normalizer = normalizer.to(device=total.device, dtype=total.dtype)
    return total / normalizer


def sequence_sums(
    values: Tensor, mask: Tensor, segment_ids: Tensor, num_segments: int
) -> tuple[Tensor, Tensor]:
    """Per-segment sums of masked per-token values, and the number of masked-in tokens.

    ``sums[s] = sum_{r,t: seg_rt = s} v_rt m_rt`` and ``counts[s] = sum_{r,t: seg_rt = s} m_rt``.

    Shapes: values, mask, segment_ids (R, T'); returns sums (S,) in values' dtype and counts
    (S,) long, S = num_segments. Works for padded batches (segment = row, R = S) and
    padding-free ones (one row, many segments). Typical call: token log-probs (R, T-1),
    ``completion_mask[:, 1:]``, ``segment_ids[:, 1:]`` -> sequence log-probs; ``sums /
    counts.clamp(min=1)`` is the average log-prob (IPO). Entries with mask 0 or a negative
    segment id (padding) are left out with ``where``, so NaN/inf there cannot leak in; a
    segment with no tokens sums to 0. Segment ids must be < num_segments (not checked: that
    would synchronise the device).
    """
    if not (values.shape == mask.shape == segment_ids.shape):
        raise ValueError(
            f"values {tuple(values.shape)}, mask {tuple(mask.shape)} and segment_ids "
            f"{tuple(segment_ids.shape)} must have the same shape"
        )
    keep = mask.to(torch.bool) & (segment_ids >= 0)
    seg = torch.where(keep, segment_ids, torch.zeros_like(segment_ids)).reshape(-1).to(torch.long)
    zeros = torch.zeros((), dtype=values.dtype, device=values.device)
    vals = torch.where(keep, values, zeros).reshape(-1)
    sums = torch.zeros(num_segments, dtype=values.dtype, device=values.device).scatter_add(0, seg, vals)
    counts = torch.zeros(num_segments, dtype=torch.long, device=values.device).scatter_add(
        0, seg, keep.reshape(-1).to(torch.long)
    )
    return sums, counts


def upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for metrics and sums; fp32 and fp64 unchanged (``.float()`` would cut a
    float64 run's values to fp32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))

