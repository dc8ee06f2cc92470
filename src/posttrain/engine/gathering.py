"""Per-process rollout tensors -> the whole step's, for step-wide statistics and logged metrics.

Every online recipe gives each process the same number of completions per step (whole groups,
`BatchPlan`), so rows concatenate in process order: the gathered tensor of W processes is the
tensor one process would hold with the W-fold batch (the basis of the 1-process == W-process
tests in tests/distributed/).
"""

from __future__ import annotations

import dataclasses

from torch import Tensor


def rows_everywhere(accelerator, t: Tensor) -> Tensor:
    """(N,) or (N, C) rows of this process -> (W*N,) or (W*N, C_max) in process order; a 2-D
    tensor is padded with 0 (mask it) to the widest process's C. Returned on the CPU, same dtype."""
    if accelerator.num_processes == 1:
        return t
    moved = (t if t.is_floating_point() else t.float()).to(accelerator.device)  # gloo gathers no bool
    if t.dim() > 1:
        moved = accelerator.pad_across_processes(moved, dim=1, pad_index=0)
    return accelerator.gather(moved).cpu().to(t.dtype)


def scores_everywhere(accelerator, scores):
    """A step's RewardScores from every process, so reward metrics are global, not rank 0's."""
    if accelerator.num_processes == 1:
        return scores
    return dataclasses.replace(
        scores, total=rows_everywhere(accelerator, scores.total),
        per_fn={k: rows_everywhere(accelerator, v) for k, v in scores.per_fn.items()},
        applicable={k: rows_everywhere(accelerator, v) for k, v in scores.applicable.items()},
        valid=None if scores.valid is None else rows_everywhere(accelerator, scores.valid))


def own_rows(accelerator, everywhere: Tensor, n: int, width: int | None = None) -> Tensor:
    """This process's n rows (and first `width` columns) of a tensor built by rows_everywhere."""
    start = accelerator.process_index * n
    rows = everywhere[start:start + n]
    return (rows if width is None else rows[:, :width]).contiguous()

