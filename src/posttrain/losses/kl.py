"""Per-token estimators of KL(π_θ ‖ π_ref) from samples of π_θ (torch only).

J. Schulman, "Approximating KL Divergence" (2020, joschu.net/blog/kl-approx.html). Tokens are
sampled from q = π_θ (the policy that generated them); p = π_ref. With the per-token ratio

    r = p(x)/q(x) = π_ref / π_θ,     log r = ref_logp − logp,

the three estimators of KL(q ‖ p) = E_q[log q/p] = E_q[−log r] are

- ``k1 = −log r = logp − ref_logp``            unbiased; negative on some tokens; high variance.
- ``k2 = ½ (log r)²``                          biased (low when π_θ ≈ π_ref); always >= 0.
- ``k3 = (r − 1) − log r``                     unbiased (E_q[r] = 1); always >= 0 since
  log r <= r − 1; low variance. The GRPO paper's KL term (Shao et al. 2024) and TRL's
  GRPO ``per_token_kl``.

What their GRADIENTS estimate (pitfall 26). As a loss term the estimate is differentiated
pathwise through ``logp`` at the SAMPLED tokens only (ref detached, no score-function term — how
GRPO/TRL use it). With u = log q/p and ∇ log q(x) the score, Σ_x q ∇log q = ∇ Σ_x q = 0 gives:

- k1: ``E_q[∇k1] = E_q[∇ log q] = 0``. A k1 LOSS term does nothing in expectation; k1 belongs in
  the reward (RLOO, PPO, GRPO ``--kl_in reward``), where only its value is used.
- k2: ``E_q[∇k2] = E_q[u ∇log q] = Σ_x u ∇q = ∇ KL(q ‖ p)`` — the reverse KL's exact gradient
  (∇ Σ q u = Σ u ∇q + Σ q ∇u and Σ q ∇u = Σ q ∇log q = 0).
- k3: ``E_q[∇k3] = E_q[(1 − p/q) ∇log q] = Σ_x (q − p) ∇log q = −Σ_x p ∇log q = ∇ KL(p ‖ q)`` —
  the gradient of the FORWARD KL(π_ref ‖ π_θ), although its value estimates KL(π_θ ‖ π_ref).
  The two KLs agree to second order at π_θ = π_ref, so their gradients agree to first order there.

So a loss term may use k2 or k3 (``LOSS_KL_ESTIMATORS``); in an autoregressive model each is the
gradient of the per-token KL given the sampled prefix (the effect on later tokens' distributions
is not differentiated).

Every one is 0 exactly when logp == ref_logp (pitfall 13: KL == 0 at step 0).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
# estimators whose pathwise gradient is a KL gradient (module docstring): the only ones a loss may use
LOSS_KL_ESTIMATORS: tuple[str, ...] = ("k2", "k3")


def kl_estimate(
    logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k3", *, mask: Tensor | None = None
) -> Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate (see the module docstring for k1, k2, k3).

    logp: (B, T) log π_θ of the sampled tokens (differentiable: the gradient of β·k flows into
    the policy); ref_logp: (B, T) log π_ref of the same tokens (detached here). mask: optional
    (B, T); where 0 the log-ratio is replaced by 0 BEFORE ``exp``, so the estimate there is exactly
    0 and padding holding ±inf or NaN log-probs cannot produce inf/NaN values or gradients (a later
    ``where`` alone would not stop ``0 · inf`` in the backward of ``exp``). Returns (B, T).
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ")
    log_r = ref_logp.detach() - logp
    if mask is not None:
        if mask.shape != logp.shape:
            raise ValueError(f"mask {tuple(mask.shape)} and logp {tuple(logp.shape)} differ")
        log_r = torch.where(mask.to(torch.bool), log_r, torch.zeros_like(log_r))
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; valid estimators: {', '.join(KL_ESTIMATORS)}")
