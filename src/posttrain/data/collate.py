"""Batch collators. All tensors are torch.long.

completion_mask[t] == 1 means input_ids[t] is a target predicted from position t - 1, so the
model side uses ``targets = input_ids[:, 1:]`` and ``mask = completion_mask[:, 1:]``. Labels
are never derived from pad ids (pitfall 1: pad == eos would hide the EOS).
"""

from __future__ import annotations

import torch


def collate_padding_free(examples) -> dict:
    """Concatenate all examples into ONE row, without padding.

    Returns input_ids (1, N), position_ids (1, N) restarting at 0 for each example,
    completion_mask (1, N) with 0 on every example's first token (nothing in the same example
    predicts it), and seq_lens: list[int] (lengths in order, sum N).
    """
    ids, pos, mask, lens = [], [], [], []
    for ex in examples:
        n = len(ex.input_ids)
        ids += ex.input_ids
        pos += range(n)
        mask += [0] + list(ex.completion_mask[1:n])
        lens.append(n)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "completion_mask": torch.tensor([mask], dtype=torch.long),
        "seq_lens": lens,
    }


def collate_padded(examples, pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad examples to the longest one.

    Returns input_ids, attention_mask, position_ids (0.. over the real tokens, 0 on pads, left
    padding included) and completion_mask (0 on pads and on each first real token), all (B, T).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the eos token)")
    B = len(examples)
    T = max((len(ex.input_ids) for ex in examples), default=0)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    position = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        if n == 0:
            continue
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[b, sl] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention[b, sl] = 1
        position[b, sl] = torch.arange(n, dtype=torch.long)
        m = torch.tensor(ex.completion_mask, dtype=torch.long)
        m[0] = 0
        mask[b, sl] = m
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "position_ids": position,
        "completion_mask": mask,
    }
