"""Advantage estimators for online RL: group-relative (GRPO), leave-one-out (RLOO), GAE (PPO),
REINFORCE++, and masked whitening. Pure tensor functions (torch only).

Advantages are regression TARGETS, not differentiated: every function here returns detached
tensors. Grouped functions take the rewards of the WHOLE rollout batch (gathered over processes)
laid out in consecutive groups: rows ``[k*G, (k+1)*G)`` are the G completions of prompt k (the
layout ``repeat_interleave`` gives).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from posttrain.losses.reductions import masked_mean

AdvantageScale = Literal["group", "batch", "none"]
ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size must be >= 1 and divide the number of rewards; got group_size={group_size}, "
            f"N={rewards.numel()}"
        )
    return rewards.detach().view(-1, group_size)


def group_advantages(
    rewards: Tensor, group_size: int, *, scale: AdvantageScale = "group", eps: float = 1e-4,
    valid: Tensor | None = None,
) -> Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath, outcome supervision).

    For completion i of a group g of G completions of one prompt:

    - ``scale="group"`` (GRPO):   ``A_i = (r_i − mean_g r) / (std_g r + eps)``
    - ``scale="batch"``:          ``A_i = (r_i − mean_g r) / (std_batch r + eps)`` (mean still per group;
      the std over all N rewards, as recommended by Hu et al. 2025 / TRL ``scale_rewards="batch"``)
    - ``scale="none"`` (Dr. GRPO, Liu et al. 2025 "Understanding R1-Zero-Like Training"):
      ``A_i = r_i − mean_g r`` (dividing by the std biases towards too easy / too hard prompts)

    std is the UNBIASED sample std (Bessel, divide by G − 1) and ``eps = 1e-4`` is added to the
    std, not the variance — both exactly as TRL's GRPOTrainer, so advantages match TRL's to the
    bit. A group whose rewards are all equal gets advantage 0 (numerator 0), not NaN; with
    G = 1 (or N = 1 for ``batch``) the std is taken as 0.

    rewards: (N,), N = number of prompts × group_size, in consecutive groups; pass the rewards of
    the whole step gathered over processes so every process normalises identically. valid:
    optional (N,) bool, False for a sample with no reward at all (every reward function returned
    None, pitfall 31): it gets advantage 0 and is left out of its group's mean and std (and of
    the batch std); mean and Bessel std are then over the n_g valid samples of each group (std 0
    when n_g <= 1). Returns (N,), detached, same dtype.
    """
    if valid is not None and not bool(_valid_mask(valid, rewards).all()):
        return _masked_group_advantages(rewards, group_size, _valid_mask(valid, rewards), scale, eps)
    grouped = _grouped(rewards, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    elif scale == "batch":
        std = (
            rewards.detach().std()
            if rewards.numel() > 1
            else torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        )
    else:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(ADVANTAGE_SCALES)}")
    return (centred / (std + eps)).reshape(-1)


def _valid_mask(valid: Tensor, rewards: Tensor) -> Tensor:
    if valid.shape != rewards.shape:
        raise ValueError(f"valid {tuple(valid.shape)} and rewards {tuple(rewards.shape)} differ")
    return valid.to(device=rewards.device, dtype=torch.bool)


def _masked_group_advantages(rewards: Tensor, group_size: int, valid: Tensor, scale: str, eps: float) -> Tensor:
    """group_advantages over the valid samples only; invalid ones get exactly 0."""
    grouped, keep = _grouped(rewards, group_size), valid.view(-1, group_size)
    w = keep.to(grouped.dtype)
    n = w.sum(dim=1, keepdim=True)
    mean = (grouped * w).sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(keep, grouped - mean, torch.zeros_like(grouped))
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        std = ((centred**2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    elif scale == "batch":
        kept = rewards.detach()[valid]
        std = kept.std() if kept.numel() > 1 else torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    else:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(ADVANTAGE_SCALES)}")
    return (centred / (std + eps)).reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int, *, valid: Tensor | None = None) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics";
    Kool et al. 2019).

    ``A_i = r_i − 1/(G−1) · sum_{j≠i} r_j``  — the baseline of sample i is the mean reward of the
    OTHER G − 1 samples of its prompt, so it is independent of sample i and the gradient estimate
    is unbiased. Equivalently ``A_i = G/(G−1) · (r_i − mean_g r)``.

    rewards: (N,) in consecutive groups of ``group_size`` (>= 2; with one sample there is no one
    left out). valid: optional (N,) bool (pitfall 31): an invalid sample gets advantage 0 and is
    left out of the others' baselines, ``A_i = r_i − mean_{j≠i, valid} r_j``; a valid sample with
    no other valid one in its group has no baseline and gets 0. Returns (N,), detached. Note
    TRL's early RLOOTrainer laid groups out strided (``(k, -1)``); posttrain always uses
    consecutive groups.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    grouped = _grouped(rewards, group_size)
    if valid is not None and not bool(_valid_mask(valid, rewards).all()):
        keep = _valid_mask(valid, rewards).view(-1, group_size)
        w = keep.to(grouped.dtype)
        others = w.sum(dim=1, keepdim=True) - w  # valid samples other than i
        baseline = ((grouped * w).sum(dim=1, keepdim=True) - grouped * w) / others.clamp(min=1)
        return torch.where(keep & (others > 0), grouped - baseline, torch.zeros_like(grouped)).reshape(-1)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) per token.

    Over the valid tokens t (mask = 1) of each row, in order:

        ``δ_t = r_t + γ V_{t+1} − V_t``,   ``A_t = δ_t + γλ A_{t+1}``,   ``R_t = A_t + V_t``

    where ``t+1`` is the NEXT VALID token of the row, and after the row's last valid token
    ``V = 0, A = 0`` (the episode ends: no bootstrap). Masked positions are skipped, so left
    padding, right padding and holes (e.g. tool output inside a completion) all work, and
    whatever rewards/values padding holds never enters. With a right-padded completion mask
    this is exactly TRL's PPO loop over the valid prefix.

    rewards, values, mask: (B, T); rewards are per token (typically −β·KL per token plus the
    score on the last valid token, see :func:`kl_penalized_rewards`). Returns
    ``(advantages (B, T), returns (B, T))``, both detached and 0 at masked positions.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} "
            "must all be (B, T)"
        )
    rewards, values = rewards.detach(), values.detach()
    keep = mask.to(torch.bool)
    zero = torch.zeros_like(rewards[:, 0])
    next_value, next_adv = zero, zero
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        valid = keep[:, t]
        advantages[:, t] = torch.where(valid, adv_t, zero)
        next_adv = torch.where(valid, adv_t, next_adv)
        next_value = torch.where(valid, values[:, t], next_value)
    returns = torch.where(keep, advantages + values, torch.zeros_like(values))
    return advantages, returns


def whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening: ``(x − μ) / sqrt(σ² + eps)`` with μ, σ² over the masked-in entries.

    σ² is the UNBIASED masked variance (``n/(n−1)`` Bessel correction) and eps = 1e-8 goes under
    the square root — as TRL's ``masked_whiten``. ``shift_mean=False`` adds μ back (only rescales;
    TRL uses it for rewards). With one valid entry the variance is 0 (no division by n − 1 = 0) and
    the whitened value is 0. values, mask: same shape, e.g. (B, T); returns that shape, detached,
    0 at masked-out positions. For DDP, whiten the gathered batch so all processes agree.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    values = values.detach()
    keep = mask.to(torch.bool)
    mean = masked_mean(values, keep)
    n = keep.sum().to(values.dtype)
    var = masked_mean((values - mean) ** 2, keep) * n / (n - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(keep, out, torch.zeros_like(out))


def kl_penalized_rewards(scores: Tensor, kl: Tensor, mask: Tensor, *, beta: float) -> Tensor:
    """Per-token rewards of RLHF-PPO (Ziegler et al. 2019; Ouyang et al. 2022):

        ``r_t = −β · kl_t + [t = last valid token] · score``

    scores: (B,) sequence rewards; kl: (B, T) per-token KL estimate (k1 in TRL's PPO, see
    :func:`posttrain.losses.kl.kl_estimate`); mask: (B, T). A row with no valid token gets no
    score. Returns (B, T), detached, 0 at masked positions.
    """
    if kl.shape != mask.shape or scores.shape != kl.shape[:1]:
        raise ValueError(f"scores {tuple(scores.shape)}, kl {tuple(kl.shape)}, mask {tuple(mask.shape)}")
    keep = mask.to(torch.bool)
    positions = torch.arange(kl.shape[1], device=kl.device).expand_as(keep)
    last = torch.where(keep, positions, torch.full_like(positions, -1)).amax(dim=1, keepdim=True)
    is_last = (positions == last) & keep
    zeros = torch.zeros_like(kl)
    rewards = torch.where(keep, -beta * kl.detach(), zeros)
    return rewards + torch.where(is_last, scores.detach().to(kl.dtype).unsqueeze(1).expand_as(kl), zeros)


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ advantages (Hu et al. 2025, "REINFORCE++"): the discounted return-to-go of the
    per-token rewards, whitened over the whole batch — no critic, no per-prompt group.

        ``G_t = sum_{s >= t, valid} γ^{s−t} r_s``,   ``A = whiten(G)``  (mean and unbiased std
        over all valid tokens of the batch)

    token_rewards: (B, T), typically :func:`kl_penalized_rewards` (score on the last token, −β·KL
    per token); for "REINFORCE++-baseline" subtract the group mean from the scores first
    (``group_advantages(scores, G, scale="none")``). mask: (B, T). Returns (B, T), detached, 0 at
    masked positions. (``G_t`` is GAE with V ≡ 0 and λ = 1.)
    """
    returns, _ = gae(token_rewards, torch.zeros_like(token_rewards), mask, gamma=gamma, lam=1.0)
    return whiten(returns, mask)
