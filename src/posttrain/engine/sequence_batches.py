"""Glue between collated sequence batches (padded or padding-free, with segment ids) and a
LogProbModel: device placement, forward arguments, per-sequence sums of completion log-probs."""

from __future__ import annotations

import torch


def batch_to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def scorer_kwargs(batch: dict) -> dict:
    """LogProbModel keyword arguments: only completion positions are scored."""
    return {"attention_mask": batch.get("attention_mask"), "position_ids": batch.get("position_ids"),
            "target_mask": batch["completion_mask"][:, 1:]}


def sequence_logps(token_logps: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of completion log-probs (S,) and completion lengths (S,), from token
    log-probs (R, T-1) of a batch with `completion_mask`, `segment_ids` and `num_sequences`."""
    from posttrain.losses.reductions import sequence_sums

    mask = batch["completion_mask"][:, 1:]
    return sequence_sums(token_logps, mask.to(token_logps.dtype), batch["segment_ids"][:, 1:],
                         batch["num_sequences"])
