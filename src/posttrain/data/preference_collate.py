"""Collators for preference pairs (reward models, DPO) and unpaired examples (KTO).

Both policies (chosen and rejected) go through ONE forward pass: a batch of B pairs becomes 2B
sequences ordered ``[prompt+chosen_0 .. prompt+chosen_{B-1}, prompt+rejected_0 ..
prompt+rejected_{B-1}]``, so ``logps[:B]`` are the chosen and ``logps[B:]`` the rejected ones.

Convention (as in :mod:`posttrain.data.collate`): ``completion_mask[t] == 1`` means token ``t``
is a target predicted from position ``t - 1``; only completion tokens are targets (the EOS is
one of them: masks never come from pad ids, pitfall 1). ``segment_ids`` name the sequence each
token belongs to (-1 on padding), so per-sequence sums are one scatter
(:func:`posttrain.losses.reductions.sequence_sums` with ``values = token_logps (R, T-1)``,
``mask = completion_mask[:, 1:]``, ``segment_ids[:, 1:]``, ``num_segments = num_sequences``).

Keys, padded (``padding_free=False``; right padding):
    input_ids, attention_mask, position_ids, completion_mask, segment_ids: (S, T) long
Keys, padding-free (one row; attention must not cross sequences, pitfall 6):
    input_ids, position_ids (restarting at 0 per sequence), completion_mask, segment_ids: (1, N)
    long, and seq_lens: list[int]
Both: num_sequences (int S), completion_lengths (S,) long; preference adds margin (B,) float
when the examples carry one; unpaired adds labels (B,) bool.
"""

from __future__ import annotations

import torch

from posttrain.data.preference import PreferenceExample, UnpairedExample


def _collate_sequences(
    prompts: list[list[int]], completions: list[list[int]], pad_token_id, padding_free: bool
) -> dict:
    """Sequences ``prompts[i] + completions[i]`` with completion-only target masks."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    masks = []
    for p, c in zip(prompts, completions):
        m = [0] * len(p) + [1] * len(c)
        if m:
            m[0] = 0  # nothing predicts a sequence's first token
        masks.append(m)
    S = len(seqs)
    out: dict = {
        "num_sequences": S,
        "completion_lengths": torch.tensor([len(c) for c in completions], dtype=torch.long),
    }
    if padding_free:
        ids, pos, mask, seg = [], [], [], []
        for s, (x, m) in enumerate(zip(seqs, masks)):
            ids += x
            pos += range(len(x))
            mask += m
            seg += [s] * len(x)
        out.update(
            input_ids=torch.tensor([ids], dtype=torch.long),
            position_ids=torch.tensor([pos], dtype=torch.long),
            completion_mask=torch.tensor([mask], dtype=torch.long),
            segment_ids=torch.tensor([seg], dtype=torch.long),
            seq_lens=[len(x) for x in seqs],
        )
        return out
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the eos token)")
    T = max((len(x) for x in seqs), default=0)
    input_ids = torch.full((S, T), pad_token_id, dtype=torch.long)
    attention = torch.zeros((S, T), dtype=torch.long)
    position = torch.zeros((S, T), dtype=torch.long)
    mask = torch.zeros((S, T), dtype=torch.long)
    seg = torch.full((S, T), -1, dtype=torch.long)
    for s, (x, m) in enumerate(zip(seqs, masks)):
        n = len(x)
        input_ids[s, :n] = torch.tensor(x, dtype=torch.long)
        attention[s, :n] = 1
        position[s, :n] = torch.arange(n, dtype=torch.long)
        mask[s, :n] = torch.tensor(m, dtype=torch.long)
        seg[s, :n] = s
    out.update(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position,
        completion_mask=mask,
        segment_ids=seg,
    )
    return out


def collate_preference(examples: list[PreferenceExample], *, pad_token_id: int, padding_free: bool) -> dict:
    """B pairs -> 2B sequences (all chosen, then all rejected) for one forward pass.

    ``margin`` (B,) float is added when the examples carry margins (all or none must).
    """
    prompts = [ex.prompt_ids for ex in examples] * 2
    completions = [ex.chosen_ids for ex in examples] + [ex.rejected_ids for ex in examples]
    out = _collate_sequences(prompts, completions, pad_token_id, padding_free)
    margins = [ex.margin for ex in examples]
    if any(m is not None for m in margins):
        missing = [ex.row for ex in examples if ex.margin is None]
        if missing:
            raise ValueError(f"some pairs have a margin and some do not (rows without: {missing})")
        out["margin"] = torch.tensor(margins, dtype=torch.float32)
    return out


def collate_unpaired(
    examples: list[UnpairedExample], *, pad_token_id: int, padding_free: bool, kl_shift: bool = False
) -> dict:
    """B examples -> B sequences ``prompt_i + completion_i``, with ``labels`` (B,) bool.

    kl_shift=True builds KTO's mismatched batch for its KL reference point:
    ``prompt_i + completion_{(i+1) mod B}`` (``labels`` and ``completion_lengths`` then still
    follow position i's example and its shifted completion respectively). With B == 1 the
    "mismatched" pair is the example itself.
    """
    B = len(examples)
    prompts = [ex.prompt_ids for ex in examples]
    completions = [ex.completion_ids for ex in examples]
    if kl_shift and B:
        completions = [completions[(i + 1) % B] for i in range(B)]
    out = _collate_sequences(prompts, completions, pad_token_id, padding_free)
    out["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.bool)
    return out
