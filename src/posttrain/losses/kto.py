"""KTO: Kahneman-Tversky optimisation from unpaired desirable/undesirable examples (torch only).

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
(the form TRL implements: β multiplies r − z₀).
"""

from __future__ import annotations

import torch
from torch import Tensor


def kto_kl_reference(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """The reference point z₀ = max(0, mean_j(log π_θ(y'_j|x_j) − log π_ref(y'_j|x_j))).

    A batch estimate of KL(π_θ ‖ π_ref) from MISMATCHED pairs (x_j, y'_j) — each prompt with a
    completion of another row — so it does not reward the examples' own completions.
    policy_kl_logps, ref_kl_logps: (B,) summed completion log-probs. Returns a detached 0-dim
    tensor (z₀ carries no gradient, as in the paper), clamped at 0 since a KL is >= 0. With data
    parallelism, gather the per-process means (or the rows) first so all processes share one z₀.
    """
    if policy_kl_logps.shape != ref_kl_logps.shape:
        raise ValueError(
            f"policy_kl_logps {tuple(policy_kl_logps.shape)} and ref_kl_logps {tuple(ref_kl_logps.shape)} differ"
        )
    return (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    is_desirable: Tensor,
    kl_reference: Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-example KTO loss and implicit reward.

    With r = log π_θ(y|x) − log π_ref(y|x) (summed completion log-probs) and z₀ = kl_reference:

    - desirable y:   ``L = λ_D · (1 − σ(β·(r − z₀)))``
    - undesirable y: ``L = λ_U · (1 − σ(β·(z₀ − r)))``

    policy_logps, ref_logps: (B,); is_desirable: (B,) bool; kl_reference: scalar z₀ (from
    :func:`kto_kl_reference`; detached here too). Any mix of desirable and undesirable rows
    works, including all of one kind. Returns ``(losses (B,), rewards (B,))`` in the input row
    order, rewards = β·r detached. The recipe averages losses over the step's examples (TRL: the
    mean over all rows). The paper advises λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3].
    """
    if not (policy_logps.shape == ref_logps.shape == is_desirable.shape) or policy_logps.dim() != 1:
        raise ValueError(
            "policy_logps, ref_logps and is_desirable must all be (B,), got "
            f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(is_desirable.shape)}"
        )
    if is_desirable.dtype != torch.bool:
        raise ValueError(f"is_desirable must be a bool tensor, got {is_desirable.dtype}")
    if isinstance(kl_reference, Tensor):
        if kl_reference.numel() != 1:
            raise ValueError(f"kl_reference must be a scalar, got shape {tuple(kl_reference.shape)}")
        z = kl_reference.detach().reshape(()).to(device=policy_logps.device, dtype=policy_logps.dtype)
    else:
        z = float(kl_reference)
    r = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - r)))
    losses = torch.where(is_desirable, desirable, undesirable)
    return losses, (beta * r).detach()
