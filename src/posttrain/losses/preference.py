"""Pairwise preference losses: DPO and its variants, SimPO, ORPO (pure tensor math, torch only).

Every variant has ONE signature, so a recipe picks it by name from :data:`PREFERENCE_LOSSES`::

    fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
       chosen_lengths=None, rejected_lengths=None, label_smoothing=0.0, params=None)
        -> PreferenceLossOutput(losses (B,), chosen_rewards (B,), rejected_rewards (B,))

Inputs, all (B,) and aligned pair by pair:

- ``chosen_logps`` / ``rejected_logps``: the policy's **summed** log-probability of the completion
  tokens of y_w / y_l, ``log π_θ(y|x) = Σ_t log π_θ(y_t | x, y_<t)``.
- ``ref_chosen_logps`` / ``ref_rejected_logps``: the same sums under the reference policy; ``None``
  is allowed only for the reference-free variants (``simpo``, ``orpo``, ``sft``).
- ``chosen_lengths`` / ``rejected_lengths``: the number of completion tokens |y|. Variants that work
  on **average** log-probs (``ipo``, ``simpo``, ``orpo``, ``sft``) divide the sums by them and raise
  ``ValueError`` when they are missing (pitfall 12: summed vs averaged). Lengths are clamped to
  >= 1 (a zero-length completion never reaches the loss: the data layer drops it, pitfall 7).

With ``ρ_w = log π_θ(y_w|x) − log π_ref(y_w|x)``, ``ρ_l`` likewise, and ``h = ρ_w − ρ_l`` (the DPO
"logits"), the rewards returned are the implicit rewards ``β·ρ_w`` and ``β·ρ_l`` (detached; for
``ipo`` computed from the averaged log-probs it trains on), and for reference-free variants the
β-scaled average log-probs ``β·log π_θ(y|x)/|y|`` (SimPO's reward). They are metrics only.

``losses`` is per pair; the recipe reduces it (sum over the step's pairs / number of pairs in the
whole optimizer step, see :mod:`posttrain.losses.reductions`). For ``aot``/``aot_pair`` entry i
is the loss of the i-th *quantile* of the sorted batch, not of pair i (see their docstrings).

``label_smoothing`` ε is used by ``sigmoid``, ``robust``, ``exo_pair``, ``aot``, ``aot_pair`` and
``simpo``; every other variant raises ``ValueError`` when given ε != 0 rather than ignore it.
:func:`combine_preference_losses` passes ε only to the variants that use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

EXO_DEFAULT_EPSILON = 1e-3
"""EXO's ε when ``label_smoothing`` is 0 (Ji et al. 2024 need 0 < ε < 1; TRL uses 1e-3)."""


@dataclass(frozen=True)
class PreferenceLossParams:
    """Variant-specific hyper-parameters, with the defaults of the papers / TRL.

    simpo_gamma: SimPO's target reward margin γ (Meng et al. 2024), in the same units as
        the β-scaled average log-probs: ``L = −log σ(β·Δavg − γ)``. Default 0.5 (TRL's
        ``simpo_gamma``). The SimPO code base is configured by ``gamma_beta_ratio`` = γ/β
        instead, so convert with γ = gamma_beta_ratio · β; SimPO also uses much larger β
        (2 to 10) than DPO.
    discopop_tau: the temperature τ of DiscoPOP's log-ratio modulation σ(βh/τ) (Chris Lu et al.
        2024, eq. 27). Default 0.05.
    bco_delta: δ of ``bco_pair``, the running mean of the implicit rewards β·ρ over all chosen
        and rejected completions seen so far (Jung et al. 2024). It is state, so the caller
        keeps it (update it with ``torch.cat([chosen_rewards, rejected_rewards]).mean()`` of each
        batch, gathered over processes) and passes the current value. Default 0.0.

    ORPO's weight λ is ``beta`` (as in TRL's ORPOConfig), not a field here.
    """

    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    bco_delta: float | Tensor = 0.0


@dataclass
class PreferenceLossOutput:
    """losses: (B,) per-pair loss (differentiable); chosen_rewards, rejected_rewards: (B,) detached
    implicit rewards for metrics (see the module docstring for what each variant reports)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class CombinedPreferenceLoss(NamedTuple):
    """Result of :func:`combine_preference_losses`; unpacks as a 4-tuple."""

    losses: Tensor
    per_type: dict[str, Tensor]
    chosen_rewards: Tensor
    rejected_rewards: Tensor


# --------------------------------------------------------------------------------------- helpers


def _check_shapes(chosen: Tensor, rejected: Tensor, *others: Tensor | None) -> None:
    if chosen.dim() != 1:
        raise ValueError(f"chosen_logps must be (B,), got shape {tuple(chosen.shape)}")
    for t in (rejected, *others):
        if t is not None and tuple(t.shape) != tuple(chosen.shape):
            raise ValueError(
                f"preference loss inputs must all be (B,) = {tuple(chosen.shape)}, got {tuple(t.shape)}"
            )


def _require_ref(name: str, ref_chosen: Tensor | None, ref_rejected: Tensor | None) -> tuple[Tensor, Tensor]:
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(
            f"loss_type {name!r} needs reference log-probs (ref_chosen_logps and ref_rejected_logps); "
            f"the reference-free variants are: {', '.join(sorted(REFERENCE_FREE_LOSSES))}"
        )
    return ref_chosen, ref_rejected


def _average(name: str, logps: Tensor, lengths: Tensor | None, which: str) -> Tensor:
    """Average log-prob ``logps / |y|`` (pitfall 12)."""
    if lengths is None:
        raise ValueError(
            f"loss_type {name!r} uses average log-probs (summed log-prob / completion length); "
            f"pass {which}_lengths, the number of completion tokens of each {which} response"
        )
    return logps / lengths.to(device=logps.device, dtype=logps.dtype).clamp(min=1)


def _no_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing != 0.0:
        raise ValueError(
            f"loss_type {name!r} does not use label_smoothing (got {label_smoothing}); "
            f"the variants that do are: {', '.join(sorted(USES_LABEL_SMOOTHING))}"
        )


def _check_smoothing(name: str, eps: float, *, upper: float, inclusive: bool) -> None:
    ok = 0.0 <= eps <= upper if inclusive else 0.0 <= eps < upper
    if not ok:
        bracket = "]" if inclusive else ")"
        raise ValueError(f"label_smoothing for {name!r} must be in [0, {upper}{bracket}, got {eps}")


def _smoothed_logistic(x: Tensor, eps: float) -> Tensor:
    """``−(1−ε)·log σ(x) − ε·log σ(−x)``: the logistic loss with the label flipped w.p. ε."""
    loss = -F.logsigmoid(x)
    if eps:
        loss = loss * (1 - eps) - F.logsigmoid(-x) * eps
    return loss


def _implicit_rewards(
    beta: float, c: Tensor, r: Tensor, ref_c: Tensor, ref_r: Tensor
) -> tuple[Tensor, Tensor]:
    return (beta * (c - ref_c)).detach(), (beta * (r - ref_r)).detach()


def _pair_inputs(name, c, r, ref_c, ref_r):
    _check_shapes(c, r, ref_c, ref_r)
    ref_c, ref_r = _require_ref(name, ref_c, ref_r)
    return c, r, ref_c, ref_r


# --------------------------------------------------------------------- reference-based variants


def sigmoid_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """DPO (Rafailov et al. 2023, eq. 7), with conservative DPO's label smoothing (Mitchell 2023).

    ``L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)``,  ``h = (log π_θ(y_w) − log π_ref(y_w)) −
    (log π_θ(y_l) − log π_ref(y_l))`` on summed log-probs. ε = 0 is plain DPO; ε ∈ (0, 0.5] is the
    probability that a label is flipped. At π_θ = π_ref: h = 0, L = ln 2. Inputs (B,), output (B,).
    """
    c, r, rc, rr = _pair_inputs("sigmoid", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_smoothing("sigmoid", label_smoothing, upper=0.5, inclusive=True)
    h = (c - r) - (rc - rr)
    return PreferenceLossOutput(
        _smoothed_logistic(beta * h, label_smoothing), *_implicit_rewards(beta, c, r, rc, rr)
    )


def hinge_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """SLiC hinge loss (Zhao et al. 2023, "SLiC-HF") on the DPO log-ratio, as in TRL.

    ``L = max(0, 1 − β·h)``: the margin is 1/β in units of h (summed log-probs). Inputs (B,),
    output (B,). Zero gradient once β·h >= 1.
    """
    c, r, rc, rr = _pair_inputs("hinge", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _no_smoothing("hinge", label_smoothing)
    h = (c - r) - (rc - rr)
    return PreferenceLossOutput(torch.relu(1 - beta * h), *_implicit_rewards(beta, c, r, rc, rr))


def ipo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", the sampled loss), τ = β.

    ``L = (h̄ − 1/(2β))²`` where h̄ is h on **average** log-probs:
    ``h̄ = (log π_θ(y_w) − log π_ref(y_w))/|y_w| − (log π_θ(y_l) − log π_ref(y_l))/|y_l|``
    (the practical form TRL uses; pitfall 12). Needs chosen_lengths and rejected_lengths.
    Rewards are β times the averaged log-ratios. Inputs (B,), output (B,).
    """
    c, r, rc, rr = _pair_inputs("ipo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_shapes(c, r, chosen_lengths, rejected_lengths)
    _no_smoothing("ipo", label_smoothing)
    c, rc = _average("ipo", c, chosen_lengths, "chosen"), _average("ipo", rc, chosen_lengths, "chosen")
    r, rr = (
        _average("ipo", r, rejected_lengths, "rejected"),
        _average("ipo", rr, rejected_lengths, "rejected"),
    )
    h = (c - r) - (rc - rr)
    return PreferenceLossOutput((h - 1 / (2 * beta)) ** 2, *_implicit_rewards(beta, c, r, rc, rr))


def robust_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """Robust DPO, rDPO (Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language
    Models with Noisy Feedback").

    An unbiased estimate of the clean DPO loss when labels are flipped with probability ε:
    ``L = [−(1−ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε)``, ε ∈ [0, 0.5). ε = 0 is DPO.
    Inputs (B,), output (B,).
    """
    c, r, rc, rr = _pair_inputs("robust", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    _check_smoothing("robust", eps, upper=0.5, inclusive=False)
    x = beta * ((c - r) - (rc - rr))
    losses = (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    return PreferenceLossOutput(losses, *_implicit_rewards(beta, c, r, rc, rr))


def exo_pair_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """EXO, pairwise form (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment").

    The reverse KL from the model's pair distribution p = (σ(βh), σ(−βh)) to the ε-smoothed
    label distribution (1−ε, ε):
    ``L = σ(βh)·(log σ(βh) − log(1−ε)) + σ(−βh)·(log σ(−βh) − log ε)``.
    ε = ``label_smoothing``, or 1e-3 when it is 0 (log ε must be finite); ε ∈ (0, 1).
    Minimised at σ(βh) = 1 − ε, not at h → ∞. Inputs (B,), output (B,).
    """
    c, r, rc, rr = _pair_inputs(
        "exo_pair", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    eps = label_smoothing if label_smoothing != 0.0 else EXO_DEFAULT_EPSILON
    if not 0.0 < eps < 1.0:
        raise ValueError(
            f"label_smoothing for 'exo_pair' must be in (0, 1) (0 means {EXO_DEFAULT_EPSILON}), got {eps}"
        )
    x = beta * ((c - r) - (rc - rr))
    losses = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(eps)
    )
    return PreferenceLossOutput(losses, *_implicit_rewards(beta, c, r, rc, rr))


def nca_pair_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """NCA, pairwise form (Chen et al. 2024, "Noise Contrastive Alignment...", pairwise NCA).

    With absolute implicit rewards r_w = β·ρ_w, r_l = β·ρ_l:
    ``L = −log σ(r_w) − ½·log σ(−r_w) − ½·log σ(−r_l)``. Unlike DPO it acts on each reward
    separately (not only their difference), so it keeps log π_θ(y_w) from falling.
    Inputs (B,), output (B,).
    """
    c, r, rc, rr = _pair_inputs(
        "nca_pair", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    _no_smoothing("nca_pair", label_smoothing)
    rw, rl = beta * (c - rc), beta * (r - rr)
    losses = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    return PreferenceLossOutput(losses, rw.detach(), rl.detach())


def bco_pair_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for LLM Alignment").

    A binary classifier with logit r = β·ρ shifted by the reward baseline δ:
    ``L = −log σ(r_w − δ) − log σ(−(r_l − δ))``, δ = ``params.bco_delta``, the running mean of
    the rewards (kept by the caller, see :class:`PreferenceLossParams`). Inputs (B,), output (B,).
    """
    c, r, rc, rr = _pair_inputs(
        "bco_pair", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    _no_smoothing("bco_pair", label_smoothing)
    delta = (params or PreferenceLossParams()).bco_delta
    if isinstance(delta, Tensor):
        delta = delta.detach().to(device=c.device, dtype=c.dtype)
    rw, rl = beta * (c - rc), beta * (r - rr)
    losses = -F.logsigmoid(rw - delta) - F.logsigmoid(-(rl - delta))
    return PreferenceLossOutput(losses, rw.detach(), rl.detach())


def sppo_hard_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language
    Model Alignment"; the pairwise hard-label form TRL implements).

    The winner's log-ratio is regressed to +1/(2β) and the loser's to −1/(2β) (the win
    probabilities 1 and 0 minus ½, scaled by η = 1/β):
    ``L = (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²`` on summed log-probs. Inputs (B,), output (B,).
    """
    c, r, rc, rr = _pair_inputs(
        "sppo_hard", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    _no_smoothing("sppo_hard", label_smoothing)
    a, b = c - rc, r - rr
    losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    return PreferenceLossOutput(losses, *_implicit_rewards(beta, c, r, rc, rr))


def aot_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """AOT, paired form (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via
    Optimal Transport").

    First-order stochastic dominance of the policy's log-ratio distribution over the reference's,
    by 1-D optimal transport = sorting over the batch: with ``u = sort(log π_θ(y_w) −
    log π_θ(y_l))`` and ``v = sort(log π_ref(y_w) − log π_ref(y_l))`` (ascending),
    ``L_i = −(1−ε)·log σ(β(u_i − v_i)) − ε·log σ(−β(u_i − v_i))``.
    ``losses[i]`` belongs to the i-th quantile, not to pair i; only the batch mean is meaningful,
    and it depends on the batch (compute it over as large a batch as possible). Rewards are per
    pair (unsorted). Inputs (B,), output (B,).
    """
    c, r, rc, rr = _pair_inputs("aot", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_smoothing("aot", label_smoothing, upper=0.5, inclusive=True)
    u, _ = torch.sort(c - r, dim=0)
    v, _ = torch.sort(rc - rr, dim=0)
    return PreferenceLossOutput(
        _smoothed_logistic(beta * (u - v), label_smoothing), *_implicit_rewards(beta, c, r, rc, rr)
    )


def aot_pair_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """AOT, unpaired form (Melnyk et al. 2024): dominance of the chosen log-ratio distribution
    over the rejected one.

    ``u = sort(ρ_w)``, ``v = sort(ρ_l)`` over the batch (ascending), ``L_i = −(1−ε)·log σ(β(u_i −
    v_i)) − ε·log σ(−β(u_i − v_i))``. As for ``aot``, ``losses[i]`` is the i-th quantile's loss.
    Inputs (B,), output (B,).
    """
    c, r, rc, rr = _pair_inputs(
        "aot_pair", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    _check_smoothing("aot_pair", label_smoothing, upper=0.5, inclusive=True)
    u, _ = torch.sort(c - rc, dim=0)
    v, _ = torch.sort(r - rr, dim=0)
    return PreferenceLossOutput(
        _smoothed_logistic(beta * (u - v), label_smoothing), *_implicit_rewards(beta, c, r, rc, rr)
    )


def apo_zero_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", eq. 7): raise the chosen and lower the rejected likelihood, anchored at ρ = 0.

    ``L = (1 − σ(β·ρ_w)) + σ(β·ρ_l)``. For chosen outputs better than the model's own.
    Inputs (B,), output (B,).
    """
    c, r, rc, rr = _pair_inputs(
        "apo_zero", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    _no_smoothing("apo_zero", label_smoothing)
    a, b = c - rc, r - rr
    losses = (1 - torch.sigmoid(beta * a)) + torch.sigmoid(beta * b)
    return PreferenceLossOutput(losses, *_implicit_rewards(beta, c, r, rc, rr))


def apo_down_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower both likelihoods, the rejected more.

    ``L = σ(β·ρ_w) + (1 − σ(β·(ρ_w − ρ_l)))``. For chosen outputs worse than the model's own:
    by design its gradient LOWERS log π_θ(y_w) once the margin term is satisfied.
    Inputs (B,), output (B,).
    """
    c, r, rc, rr = _pair_inputs(
        "apo_down", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    _no_smoothing("apo_down", label_smoothing)
    a, b = c - rc, r - rr
    losses = torch.sigmoid(beta * a) + (1 - torch.sigmoid(beta * (a - b)))
    return PreferenceLossOutput(losses, *_implicit_rewards(beta, c, r, rc, rr))


def discopop_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """DiscoPOP / LRML, the log-ratio modulated loss (Chris Lu et al. 2024, "Discovering
    Preference Optimization Algorithms with and for Large Language Models", appendix E.6, eq. 27;
    TRL's form).

    With x = β·h: ``L = (1 − σ(x/τ))·(−log σ(x)) + σ(x/τ)·exp(−x)``, τ = ``params.discopop_tau``
    (0.05): the logistic (DPO) loss for x < 0 blended into the exponential loss for x > 0. Not
    monotone: around x = 0 (within a few τ) the loss rises from ln 2 to 1, so there its gradient
    pushes h DOWN (the paper's non-convex region). Inputs (B,), output (B,).
    """
    c, r, rc, rr = _pair_inputs(
        "discopop", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    _no_smoothing("discopop", label_smoothing)
    tau = (params or PreferenceLossParams()).discopop_tau
    if tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {tau}")
    x = beta * ((c - r) - (rc - rr))
    m = torch.sigmoid(x / tau)
    losses = (1 - m) * -F.logsigmoid(x) + m * torch.exp(-x)
    return PreferenceLossOutput(losses, *_implicit_rewards(beta, c, r, rc, rr))


# ---------------------------------------------------------------------- reference-free variants


def sft_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """Per-pair NLL of the chosen response, ``L = −log π_θ(y_w|x) / |y_w|`` (sequence-mean NLL).

    Mixed with a preference loss through :func:`combine_preference_losses` (e.g. ``--loss_type
    sigmoid sft --loss_weights 1 α``: RPO, Pang et al. 2024; the NLL half of ORPO). Needs
    chosen_lengths; ignores the rejected response. It carries no reward of its own, so it reports
    the same rewards as the loss it is mixed with: β·ρ (as ``sigmoid``) when reference log-probs
    are given, else the β-scaled average log-probs (as ``simpo``/``orpo``; then rejected_lengths
    is needed too). Inputs (B,), output (B,).
    """
    _check_shapes(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths
    )
    _no_smoothing("sft", label_smoothing)
    avg_c = _average("sft", chosen_logps, chosen_lengths, "chosen")
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        rewards = _implicit_rewards(beta, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    else:
        avg_r = _average("sft", rejected_logps, rejected_lengths, "rejected")
        rewards = ((beta * avg_c).detach(), (beta * avg_r).detach())
    return PreferenceLossOutput(-avg_c, *rewards)


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """SimPO (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward"), reference-free, on **average** log-probs:

    ``x = β/|y_w|·log π_θ(y_w|x) − β/|y_l|·log π_θ(y_l|x) − γ``,
    ``L = −(1−ε)·log σ(x) − ε·log σ(−x)`` (ε = label_smoothing as in TRL's CPO trainer; 0 in the
    paper), γ = ``params.simpo_gamma``. Reference log-probs are ignored. Rewards are
    β·log π_θ(y|x)/|y|. Needs both lengths. Inputs (B,), output (B,).
    """
    _check_shapes(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths
    )
    _check_smoothing("simpo", label_smoothing, upper=0.5, inclusive=True)
    gamma = (params or PreferenceLossParams()).simpo_gamma
    rw = beta * _average("simpo", chosen_logps, chosen_lengths, "chosen")
    rl = beta * _average("simpo", rejected_logps, rejected_lengths, "rejected")
    return PreferenceLossOutput(
        _smoothed_logistic(rw - rl - gamma, label_smoothing), rw.detach(), rl.detach()
    )


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> PreferenceLossOutput:
    """ORPO's odds-ratio term (Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization
    without Reference Model"), reference-free, λ = ``beta``.

    With p̄ = log π_θ(y|x)/|y| the **average** log-prob and ``log odds(y) = p̄ − log(1 − exp(p̄))``:
    ``L = −λ·log σ(log odds(y_w) − log odds(y_l))``.
    The full ORPO objective is ``L_SFT + λ·L_OR``; the SFT (NLL) part is NOT included here — the
    recipe adds it with the ``sft`` loss (``--loss_type orpo sft``). Rewards are β·p̄ (as TRL's
    ORPO trainer logs). Needs both lengths. Inputs (B,), output (B,).
    """
    _check_shapes(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths
    )
    _no_smoothing("orpo", label_smoothing)
    pw = _average("orpo", chosen_logps, chosen_lengths, "chosen")
    pl = _average("orpo", rejected_logps, rejected_lengths, "rejected")
    log_odds = _log_odds(pw) - _log_odds(pl)
    return PreferenceLossOutput(-beta * F.logsigmoid(log_odds), (beta * pw).detach(), (beta * pl).detach())


def _log_odds(avg_logp: Tensor) -> Tensor:
    """``log(p / (1 − p))`` from ``log p`` (< 0): ``log p − log(−expm1(log p))``. ``log p`` is clamped
    below 0 by the smallest normal number so that p = 1 (an exactly-zero average) stays finite."""
    tiny = torch.finfo(avg_logp.dtype).tiny
    avg_logp = avg_logp.clamp(max=-tiny)
    return avg_logp - torch.log(-torch.expm1(avg_logp))


# ------------------------------------------------------------------------------------ registry

PreferenceLossFn = Callable[..., PreferenceLossOutput]

PREFERENCE_LOSSES: dict[str, PreferenceLossFn] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_pair": aot_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sft": sft_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}

REFERENCE_FREE_LOSSES: frozenset[str] = frozenset({"simpo", "orpo", "sft"})
"""Variants that never need the reference policy (``sft`` uses it only for its reported rewards)."""

USES_AVERAGE_LOGPS: frozenset[str] = frozenset({"ipo", "simpo", "orpo", "sft"})
"""Variants that divide summed log-probs by the completion lengths (the lengths are required)."""

USES_LABEL_SMOOTHING: frozenset[str] = frozenset(
    {"sigmoid", "robust", "exo_pair", "aot", "aot_pair", "simpo"}
)
"""Variants that read ``label_smoothing``; the others raise when it is non-zero."""


def get_preference_loss(name: str) -> PreferenceLossFn:
    """The preference loss registered under ``name``; ValueError naming the valid names otherwise."""
    try:
        return PREFERENCE_LOSSES[name]
    except KeyError:
        valid = ", ".join(PREFERENCE_LOSSES)
        raise ValueError(f"unknown preference loss_type {name!r}; valid loss types: {valid}") from None


def combine_preference_losses(
    names: list[str] | tuple[str, ...],
    weights: list[float] | tuple[float, ...] | None,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    params: PreferenceLossParams | None = None,
) -> CombinedPreferenceLoss:
    """Weighted sum of several variants: ``--loss_type a b --loss_weights w_a w_b``.

    ``losses = Σ_k w_k · L_k`` (B,), weights default to 1 each (as TRL). ``per_type[name]`` is the
    UNweighted L_k (B,), for logging each term. ``label_smoothing`` goes only to the variants in
    :data:`USES_LABEL_SMOOTHING` (ValueError if it is non-zero and none of ``names`` uses it).

    Rewards: the weight-normalised mean ``Σ_k w_k·r_k / Σ_k w_k`` of the variants' rewards. TRL
    logs the weighted SUM, which scales the logged rewards by Σ w (e.g. doubles them for
    ``sigmoid`` + ``hinge``); every variant here reports the same β·ρ (or β·p̄ when
    reference-free), so the normalised mean is that reward. Weights must be >= 0 with Σ > 0.
    """
    names = list(names)
    if not names:
        raise ValueError("loss_type is empty; give at least one preference loss type")
    if len(set(names)) != len(names):
        raise ValueError(f"loss_type lists a variant twice: {names}")
    fns = [get_preference_loss(n) for n in names]
    if weights is None:
        weights = [1.0] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} values for {len(names)} loss types {names}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"loss_weights must be finite, >= 0 and not all 0, got {weights}")
    if label_smoothing != 0.0 and not USES_LABEL_SMOOTHING.intersection(names):
        raise ValueError(
            f"label_smoothing={label_smoothing} is used by none of {names}; "
            f"the variants that use it are: {', '.join(sorted(USES_LABEL_SMOOTHING))}"
        )
    total: Tensor | None = None
    chosen_rewards: Tensor | None = None
    rejected_rewards: Tensor | None = None
    per_type: dict[str, Tensor] = {}
    for name, fn, w in zip(names, fns, weights):
        out = fn(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=beta,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            label_smoothing=label_smoothing if name in USES_LABEL_SMOOTHING else 0.0,
            params=params,
        )
        per_type[name] = out.losses
        total = w * out.losses if total is None else total + w * out.losses
        chosen_rewards = (
            w * out.chosen_rewards if chosen_rewards is None else chosen_rewards + w * out.chosen_rewards
        )
        rejected_rewards = (
            w * out.rejected_rewards
            if rejected_rewards is None
            else rejected_rewards + w * out.rejected_rewards
        )
    w_sum = sum(weights)
    assert total is not None and chosen_rewards is not None and rejected_rewards is not None
    return CombinedPreferenceLoss(total, per_type, chosen_rewards / w_sum, rejected_rewards / w_sum)
