"""Policy-gradient losses of PPO / GRPO / RLOO and their metrics (torch only).

The per-token clipped surrogate (Schulman et al. 2017, PPO eq. 7, with DAPO's asymmetric
"clip-higher", Yu et al. 2025), its aggregation to a scalar under the four GRPO loss types, the
clipped value loss of PPO, and metric helpers computed from the same masked tensors as the loss
(pitfall 18).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from posttrain.losses.reductions import aggregate_token_loss, masked_mean

PolicyLossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
POLICY_LOSS_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo", "bnpo")


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clipped surrogate loss.

        ``ρ_t = exp(logp_t − old_logp_t)``
        ``ℓ_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t)``

    logp: (B, T) log π_θ of the sampled tokens (differentiable); old_logp: (B, T) log π_θ_old, the
    policy that sampled them (detached here; with one optimisation pass per rollout pass
    ``logp.detach()`` so ρ == 1 exactly and the gradient is ``−A ∇log π`` — pitfall 13).
    advantages: (B,) per sequence (GRPO/RLOO, broadcast over tokens) or (B, T) per token (PPO);
    detached here. mask: (B, T) 1 on completion tokens. epsilon_high defaults to epsilon_low
    (symmetric PPO); DAPO uses ε_low = 0.2, ε_high = 0.28.

    Returns ``(per_token_loss (B, T), stats)``; the loss is 0 at masked positions, where the log
    ratio is set to 0 BEFORE ``exp`` so padding can never give inf/NaN values or gradients.
    stats (all detached, (B, T)):

    - ``ratio``: ρ (1 at masked positions);
    - ``clipped_low``: ρ < 1 − ε_low and A < 0 (the clip binds from below: the gradient is cut);
    - ``clipped_high``: ρ > 1 + ε_high and A > 0 (binds from above);
    - ``clipped``: either — exactly the tokens whose gradient the clip removed (TRL's
      ``clip_ratio/region``; equals PPO's ``pg_clipfrac`` test ``ℓ_clipped > ℓ_unclipped``).

    All three masks are False at masked positions; their masked means are TRL's
    ``clip_ratio/low_mean``, ``clip_ratio/high_mean`` and ``clip_ratio/region_mean``.
    """
    if not (logp.shape == old_logp.shape == mask.shape) or logp.dim() != 2:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} "
            "must all be (B, T)"
        )
    if epsilon_high is None:
        epsilon_high = epsilon_low
    adv = advantages.detach()
    if adv.dim() == 1:
        if adv.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages {tuple(adv.shape)} do not match batch size {logp.shape[0]}")
        adv = adv.unsqueeze(1)
    elif adv.shape != logp.shape:
        raise ValueError(f"advantages {tuple(adv.shape)} must be (B,) or (B, T) = {tuple(logp.shape)}")
    adv = adv.to(logp.dtype)
    keep = mask.to(torch.bool)
    log_ratio = torch.where(keep, logp - old_logp.detach(), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    loss = torch.where(keep, -torch.minimum(unclipped, clipped), torch.zeros_like(unclipped))
    r = ratio.detach()
    low = (r < 1 - epsilon_low) & (adv < 0) & keep
    high = (r > 1 + epsilon_high) & (adv > 0) & keep
    stats = {"ratio": r, "clipped_low": low, "clipped_high": high, "clipped": low | high}
    return loss, stats


def aggregate_policy_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    *,
    loss_type: PolicyLossType = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
    num_sequences_in_batch: float | Tensor | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token policy loss to a scalar, the four ways of TRL's GRPO ``loss_type``.

    With ``ℓ_it`` the loss, ``m_it`` the mask, ``n_i = sum_t m_it``:

    =========  =======================================================  ==============================
    loss_type  formula                                                  aggregate_token_loss mode
    =========  =======================================================  ==============================
    grpo       ``(1/S) sum_i (1/n_i) sum_t ℓ_it m_it``  (Shao 2024)     sequence_mean, Z = S
    bnpo       ``sum_{i,t} ℓ_it m_it / sum_{i,t} m_it`` (this batch)    token_mean, Z = local tokens
    dapo       ``sum_{i,t} ℓ_it m_it / N``  (Yu et al. 2025)            token_mean, Z = N
    dr_grpo    ``sum_{i,t} ℓ_it m_it / (S · L)``  (Liu et al. 2025)     sum, Z = S · L
    =========  =======================================================  ==============================

    N = ``num_items_in_batch``: completion tokens in the WHOLE optimizer step (all micro-batches,
    all processes); default this batch's ``mask.sum()``. S = ``num_sequences_in_batch``:
    completions in the whole step that have at least one valid token; default this batch's count
    of such rows. A completion whose mask is all 0 (e.g. dropped by ``mask_truncated_completions``)
    thus leaves every denominator, not only the token counts (pitfall 16; TRL's grpo and dr_grpo
    keep it in B). L = ``max_completion_length`` (required for dr_grpo). With the step-wide N and S, grpo, dapo and dr_grpo give a loss whose sum over
    micro-batches equals the loss of the whole step, whatever the split (pitfall 14) — so the
    engine must NOT divide by the number of accumulation steps again, and under DDP (which
    averages gradients) the recipe multiplies by the world size, as the SFT recipe does. bnpo is
    by definition normalised by the local batch's tokens (TRL); use dapo for the global version.
    grpo differs from TRL only in using S instead of "B, then divide by accumulation steps" (the
    same when micro-batches have equal size).
    """
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types: {', '.join(POLICY_LOSS_TYPES)}")
    if per_token_loss.shape != mask.shape:
        raise ValueError(f"per_token_loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} differ")
    sequences = num_sequences_in_batch
    if sequences is None:  # completions that take part: at least one valid token (pitfall 16)
        sequences = mask.to(torch.bool).any(dim=-1).sum().clamp(min=1)
    if loss_type == "grpo":
        return aggregate_token_loss(per_token_loss, mask, mode="sequence_mean", normalizer=sequences)
    if loss_type == "bnpo":
        return aggregate_token_loss(per_token_loss, mask, mode="token_mean")
    if loss_type == "dapo":
        return aggregate_token_loss(per_token_loss, mask, mode="token_mean", normalizer=num_items_in_batch)
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length >= 1")
    return aggregate_token_loss(
        per_token_loss, mask, mode="sum", normalizer=sequences * max_completion_length
    )


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range_value: float | None = 0.2,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss per token (Schulman et al. 2017 as implemented in OpenAI baselines
    and TRL's PPOTrainer):

        ``V_clip = clip(V, V_old − c, V_old + c)``
        ``ℓ_t = ½ · max((V_t − R_t)², (V_clip,t − R_t)²)``

    values: (B, T) current critic outputs (differentiable); old_values: (B, T) the critic's
    values at rollout time and returns: (B, T) the GAE returns (both detached here); mask (B, T).
    ``clip_range_value=None`` gives the unclipped ½(V − R)². Returns ``(per_token (B, T),
    clipfrac)``: the loss is 0 at masked positions (aggregate it with
    :func:`posttrain.losses.reductions.aggregate_token_loss`; TRL uses the token mean), clipfrac
    is the detached fraction of valid tokens where the clipped term is the larger (strictly), i.e.
    where the clip changed the loss.
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(
            f"values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, returns "
            f"{tuple(returns.shape)} and mask {tuple(mask.shape)} must have the same shape"
        )
    keep = mask.to(torch.bool)
    old_values, returns = old_values.detach(), returns.detach()
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        worst = unclipped
        was_clipped = torch.zeros_like(keep)
    else:
        v_clip = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
        clipped = (v_clip - returns) ** 2
        worst = torch.maximum(unclipped, clipped)
        was_clipped = clipped.detach() > unclipped.detach()
    per_token = torch.where(keep, 0.5 * worst, torch.zeros_like(worst))
    clipfrac = masked_mean(was_clipped.to(values.dtype), keep).detach()
    return per_token, clipfrac


def masked_entropy_mean(entropy: Tensor, mask: Tensor) -> Tensor:
    """Mean per-token policy entropy over valid tokens: ``sum_t H_t m_t / sum_t m_t``.

    entropy: (B, T) per-token entropies ``−sum_v p_v log p_v`` (each >= 0); mask: (B, T), the
    completion mask the loss uses. Padding positions are excluded with ``where`` (never multiplied
    in), so garbage there — negative, NaN or inf — cannot make the logged entropy negative or NaN
    (pitfall 18). Returns a detached 0-dim tensor; 0 when nothing is valid. For the step-wide
    value, sum ``masked_sum(entropy, mask)`` and the token counts over micro-batches first.
    """
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} differ")
    return masked_mean(entropy.detach(), mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Fraction of the variance of the returns the critic explains, over valid tokens:

        ``EV = 1 − Var_m[R − V] / Var_m[R]``

    (1: perfect critic; 0: no better than a constant; < 0: worse.) Variances are masked and use
    the same (population) normalisation in numerator and denominator, so the choice cancels.
    values, returns, mask: (B, T). Returns a detached 0-dim tensor; NaN when Var_m[R] = 0 (the
    ratio is undefined; the convention of Stable-Baselines3).
    """
    if not (values.shape == returns.shape == mask.shape):
        raise ValueError(
            f"values {tuple(values.shape)}, returns {tuple(returns.shape)} and mask {tuple(mask.shape)} differ"
        )
    keep = mask.to(torch.bool)
    values, returns = values.detach(), returns.detach()

    def var(x: Tensor) -> Tensor:
        return masked_mean((x - masked_mean(x, keep)) ** 2, keep)

    var_returns = var(returns)
    ev = 1 - var(returns - values) / var_returns
    return torch.where(var_returns > 0, ev, torch.full_like(ev, float("nan")))
