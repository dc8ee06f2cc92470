"""Best-fit-decreasing packing of examples into bins of at most max_length tokens.

Packed examples must not attend to each other (pitfall 6): the padding-free collator gives
every example its own position_ids and seq_lens, which the model side turns into varlen
attention boundaries.
"""

from __future__ import annotations

import bisect


def pack_best_fit_decreasing(lengths: list[int], max_length: int) -> list[list[int]]:
    """Bins of example indices, each bin's total length <= max_length.

    Examples are placed longest first (ties by index, so the result is deterministic) into the
    open bin with the least room that still fits them, else a new bin. Bins are returned in
    creation order, indices within a bin in placement order. O(n log n) lookups.
    Raises ValueError for an example longer than max_length (truncate first) or of length < 1.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(
                f"example {i} has {n} tokens, more than max_length={max_length}; truncate it first"
            )
        if n < 1:
            raise ValueError(f"example {i} is empty")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            cap, b = room.pop(k)
        else:
            cap, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if cap - n > 0:
            bisect.insort(room, (cap - n, b))
    return bins
