"""Reward-model (Bradley-Terry) loss and its metrics (pure tensor math, torch only)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """Per-pair Bradley-Terry loss of a scalar reward model.

    ``L_i = −log σ(r_c,i − r_r,i − m_i) + η·(r_c,i + r_r,i)²``

    - Bradley & Terry (1952); as a reward-model loss Ouyang et al. 2022 (InstructGPT).
    - ``margin`` m (B,) optional: the Llama 2 margin loss (Touvron et al. 2023), the
      dataset's preference strength; the chosen score must exceed the rejected by at least m.
    - ``center_rewards_coefficient`` η optional: the auxiliary term of Eisenstein et al. 2023
      ("Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward
      Hacking"), which pulls each pair's score sum to 0 so scores are centred (BT is invariant to
      a shift). TRL uses η = 0.01 when set; its batch loss is the mean of these per-pair terms.

    chosen_scores, rejected_scores: (B,) scalar scores read at each sequence's last real token
    (pitfall 9). Returns (B,); the recipe reduces it with the step's pair count.
    """
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(
            f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores {tuple(rejected_scores.shape)} differ"
        )
    diff = chosen_scores - rejected_scores
    if margin is not None:
        if margin.shape != diff.shape:
            raise ValueError(
                f"margin must have the scores' shape {tuple(diff.shape)}, got {tuple(margin.shape)}"
            )
        diff = diff - margin.to(device=diff.device, dtype=diff.dtype)
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen_scores + rejected_scores) ** 2
    return losses


def reward_accuracy(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Fraction of pairs ranked correctly: ``mean(1[r_c > r_r] + ½·1[r_c = r_r])`` (fp32 scalar).

    A tie counts ½ — the expected accuracy of breaking it at random — so a reward model that
    scores everything equally reads 0.5 (chance), not 0 (TRL counts ties as wrong) nor 1.
    (B,) inputs; no gradient. An empty batch gives NaN (there is nothing to measure).
    """
    c, r = chosen_scores.detach().float(), rejected_scores.detach().float()
    return ((c > r).float() + 0.5 * (c == r).float()).mean()


def reward_margin(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Mean score margin ``mean(r_c − r_r)`` (fp32 scalar, no gradient); (B,) inputs."""
    return (chosen_scores.detach().float() - rejected_scores.detach().float()).mean()
