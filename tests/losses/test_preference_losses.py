"""DPO-family preference losses against numbers worked by hand (pitfalls 10 and 12).

Every expected value is computed here with the ``math`` module from the paper's formula, never
with the function under test. Shared hand-made batch of 3 pairs, β = 0.5:

    chosen_logps      c  = [-10, -12, -8]      ref_chosen   = [-11, -11, -8.5]
    rejected_logps    r  = [-12, -11, -9]      ref_rejected = [-11, -11.5, -8.5]
    ρ_w = c − ref_c      = [1, -1, 0.5]        β·ρ_w = [0.5, -0.5, 0.25]
    ρ_l = r − ref_r      = [-1, 0.5, -0.5]     β·ρ_l = [-0.5, 0.25, -0.25]
    h = ρ_w − ρ_l        = [2, -1.5, 1]        β·h   = [1.0, -0.75, 0.5]
    lengths |y_w| = [4, 2, 5], |y_l| = [2, 5, 1]
    averages c/|y_w| = [-2.5, -6, -1.6], r/|y_l| = [-6, -2.2, -9]
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE_LOSSES,
    USES_AVERAGE_LOGPS,
    USES_LABEL_SMOOTHING,
    PreferenceLossParams,
    combine_preference_losses,
    get_preference_loss,
)

BETA = 0.5
C = [-10.0, -12.0, -8.0]
R = [-12.0, -11.0, -9.0]
RC = [-11.0, -11.0, -8.5]
RR = [-11.0, -11.5, -8.5]
LC = [4, 2, 5]
LR = [2, 5, 1]
X = [1.0, -0.75, 0.5]  # β·h
RW = [0.5, -0.5, 0.25]  # β·ρ_w
RL = [-0.5, 0.25, -0.25]  # β·ρ_l


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(values, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def run(
    name: str, *, label_smoothing: float = 0.0, params: PreferenceLossParams | None = None, beta: float = BETA
):
    return get_preference_loss(name)(
        t(C),
        t(R),
        t(RC),
        t(RR),
        beta=beta,
        chosen_lengths=t(LC),
        rejected_lengths=t(LR),
        label_smoothing=label_smoothing,
        params=params,
    )


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, t(expected), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- hand values


def test_sigmoid_dpo_by_hand():
    """DPO: −log σ(β·h) at β·h = [1, −0.75, 0.5] = [0.31326, 1.13687, 0.47408];
    rewards β·ρ_w = [0.5, −0.5, 0.25], β·ρ_l = [−0.5, 0.25, −0.25]."""
    out = run("sigmoid")
    close(out.losses, [-log_sigmoid(x) for x in X])
    close(out.chosen_rewards, RW)
    close(out.rejected_rewards, RL)


def test_sigmoid_conservative_dpo_label_smoothing_by_hand():
    """cDPO, ε = 0.1: 0.9·(−log σ(x)) + 0.1·(−log σ(−x)); x = 1: 0.9·0.31326 + 0.1·1.31326 = 0.41326;
    all three = [0.41326, 1.06187, 0.52408]."""
    out = run("sigmoid", label_smoothing=0.1)
    close(out.losses, [-0.9 * log_sigmoid(x) - 0.1 * log_sigmoid(-x) for x in X])


def test_hinge_by_hand():
    """SLiC: max(0, 1 − β·h) = [max(0, 0), 1.75, 0.5] = [0, 1.75, 0.5]."""
    close(run("hinge").losses, [0.0, 1.75, 0.5])


def test_ipo_by_hand_on_average_logps():
    """IPO on averages: h̄ = ρ_w/|y_w| − ρ_l/|y_l| = [1/4 + 1/2, −1/2 − 0.5/5, 0.5/5 + 0.5/1]
    = [0.75, −0.6, 0.6]; 1/(2β) = 1; (h̄ − 1)² = [0.0625, 2.56, 0.16].
    Rewards β·ρ/|y|: chosen [0.125, −0.25, 0.05], rejected [−0.25, 0.05, −0.25]."""
    out = run("ipo")
    close(out.losses, [0.0625, 2.56, 0.16])
    close(out.chosen_rewards, [0.125, -0.25, 0.05])
    close(out.rejected_rewards, [-0.25, 0.05, -0.25])


def test_robust_by_hand():
    """rDPO, ε = 0.1: [−0.9·log σ(x) + 0.1·log σ(−x)] / 0.8; x = 1: (0.28193 − 0.13133)/0.8 = 0.18826;
    all three = [0.18826, 1.23062, 0.41158]. With ε = 0 it equals DPO."""
    out = run("robust", label_smoothing=0.1)
    close(out.losses, [(-0.9 * log_sigmoid(x) + 0.1 * log_sigmoid(-x)) / 0.8 for x in X])
    torch.testing.assert_close(run("robust").losses, run("sigmoid").losses)


def test_exo_pair_by_hand_default_epsilon():
    """EXO with ε = 1e-3 (label_smoothing 0): σ(x)(log σ(x) − log(1−ε)) + σ(−x)(log σ(−x) − log ε);
    x = 1: 0.73106·(−0.31326 + 0.001) + 0.26894·(−1.31326 + 6.90776) = 1.27631;
    all three = [1.27631, 4.06443, 1.94573]."""
    eps = 1e-3
    expected = [
        sigmoid(x) * (log_sigmoid(x) - math.log(1 - eps)) + sigmoid(-x) * (log_sigmoid(-x) - math.log(eps))
        for x in X
    ]
    close(run("exo_pair").losses, expected)


def test_exo_pair_uses_label_smoothing_as_epsilon():
    """ε = 0.2, x = 1: 0.73106·(−0.31326 + 0.22314) + 0.26894·(−1.31326 + 1.60944) = 0.01377."""
    eps = 0.2
    x = X[0]
    expected = sigmoid(x) * (log_sigmoid(x) - math.log(1 - eps)) + sigmoid(-x) * (
        log_sigmoid(-x) - math.log(eps)
    )
    assert run("exo_pair", label_smoothing=0.2).losses[0].item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.01377, abs=1e-5)


def test_nca_pair_by_hand():
    """NCA: −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l) with r_w = [0.5, −0.5, 0.25],
    r_l = [−0.5, 0.25, −0.25]; pair 1: 0.47408 + ½·0.97408 + ½·0.47408 = 1.19815;
    all three = [1.19815, 1.62409, 1.27688]."""
    expected = [-log_sigmoid(a) - 0.5 * log_sigmoid(-a) - 0.5 * log_sigmoid(-b) for a, b in zip(RW, RL)]
    close(run("nca_pair").losses, expected)


def test_bco_pair_by_hand_with_running_mean_delta():
    """BCO, δ = 0.1: −log σ(r_w − δ) − log σ(−(r_l − δ)); pair 1: −log σ(0.4) − log σ(0.6)
    = 0.51302 + 0.43749 = 0.95050; all three = [0.95050, 1.80844, 1.15434]. δ may be a tensor."""
    expected = [-log_sigmoid(a - 0.1) - log_sigmoid(-(b - 0.1)) for a, b in zip(RW, RL)]
    close(run("bco_pair", params=PreferenceLossParams(bco_delta=0.1)).losses, expected)
    close(run("bco_pair", params=PreferenceLossParams(bco_delta=torch.tensor(0.1))).losses, expected)


def test_sppo_hard_by_hand():
    """SPPO hard: (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))², 1/(2β) = 1, ρ_w = [1, −1, 0.5], ρ_l = [−1, 0.5, −0.5]:
    [0 + 0, 4 + 2.25, 0.25 + 0.25] = [0, 6.25, 0.5]."""
    close(run("sppo_hard").losses, [0.0, 6.25, 0.5])


def test_aot_by_hand_sorted_quantiles():
    """AOT (paired): u = sort(c − r) = sort([2, −1, 1]) = [−1, 1, 2];
    v = sort(ref_c − ref_r) = sort([0, 0.5, 0]) = [0, 0, 0.5]; β(u − v) = [−0.5, 0.5, 0.75];
    −log σ = [0.97408, 0.47408, 0.38687]. Rewards stay per pair (unsorted)."""
    out = run("aot")
    close(out.losses, [-log_sigmoid(x) for x in (-0.5, 0.5, 0.75)])
    close(out.chosen_rewards, RW)


def test_aot_pair_by_hand_sorted_quantiles():
    """AOT (unpaired): u = sort(ρ_w) = [−1, 0.5, 1], v = sort(ρ_l) = [−1, −0.5, 0.5];
    β(u − v) = [0, 0.5, 0.25]; −log σ = [ln 2, 0.47408, 0.57594]."""
    close(run("aot_pair").losses, [math.log(2), -log_sigmoid(0.5), -log_sigmoid(0.25)])


def test_aot_is_invariant_to_batch_order():
    """Sorting makes AOT a function of the batch's distributions: permuting the pairs leaves the
    per-quantile losses unchanged (while DPO's per-pair losses permute)."""
    perm = [2, 0, 1]
    fn = get_preference_loss("aot")
    a = fn(t(C), t(R), t(RC), t(RR), beta=BETA).losses
    b = fn(t(C)[perm], t(R)[perm], t(RC)[perm], t(RR)[perm], beta=BETA).losses
    torch.testing.assert_close(a, b)


def test_aot_label_smoothing_by_hand():
    """ε = 0.2 on the first quantile, x = −0.5: 0.8·0.97408 + 0.2·0.47408 = 0.87408."""
    out = run("aot", label_smoothing=0.2)
    assert out.losses[0].item() == pytest.approx(-0.8 * log_sigmoid(-0.5) - 0.2 * log_sigmoid(0.5), rel=1e-12)


def test_apo_zero_by_hand():
    """APO-zero: 1 − σ(β ρ_w) + σ(β ρ_l); pair 1: 1 − 0.62246 + 0.37754 = 0.75508;
    all three = [0.75508, 1.18464, 0.87565]."""
    close(run("apo_zero").losses, [1 - sigmoid(a) + sigmoid(b) for a, b in zip(RW, RL)])


def test_apo_down_by_hand():
    """APO-down: σ(β ρ_w) + 1 − σ(β h); pair 1: 0.62246 + 1 − 0.73106 = 0.89140;
    all three = [0.89140, 1.05672, 0.93972]."""
    close(run("apo_down").losses, [sigmoid(a) + 1 - sigmoid(x) for a, x in zip(RW, X)])


def test_discopop_by_hand():
    """DiscoPOP, m = σ(x/τ): (1 − m)(−log σ(x)) + m·exp(−x).
    τ = 0.5: pair 1 m = σ(2) = 0.88080: 0.11920·0.31326 + 0.88080·0.36788 = 0.36137;
    all three = [0.36137, 1.31567, 0.57091]. Default τ = 0.05: m ≈ 1, 0, 1 → ≈ [e⁻¹, 1.13687, e^−0.5]."""

    def f(x, tau):
        m = sigmoid(x / tau)
        return (1 - m) * -log_sigmoid(x) + m * math.exp(-x)

    close(run("discopop", params=PreferenceLossParams(discopop_tau=0.5)).losses, [f(x, 0.5) for x in X])
    close(run("discopop").losses, [f(x, 0.05) for x in X])


def test_sft_by_hand():
    """Per-pair NLL of the chosen response, −c/|y_w| = [10/4, 12/2, 8/5] = [2.5, 6, 1.6].
    With reference log-probs its rewards are DPO's β·ρ; without, SimPO's β·avg = [−1.25, −3, −0.8]."""
    out = run("sft")
    close(out.losses, [2.5, 6.0, 1.6])
    close(out.chosen_rewards, RW)
    free = get_preference_loss("sft")(
        t(C), t(R), None, None, beta=BETA, chosen_lengths=t(LC), rejected_lengths=t(LR)
    )
    close(free.chosen_rewards, [-1.25, -3.0, -0.8])
    close(free.rejected_rewards, [-3.0, -1.1, -4.5])


def test_simpo_by_hand():
    """SimPO (reference-free), γ = 0.5: β·avg_w = [−1.25, −3, −0.8], β·avg_l = [−3, −1.1, −4.5];
    x = β·avg_w − β·avg_l − γ = [1.25, −2.4, 3.2]; −log σ(x) = [0.25193, 2.48684, 0.03995].
    Rewards are β·avg. The reference log-probs are ignored (None gives the same)."""
    out = run("simpo")
    close(out.losses, [-log_sigmoid(x) for x in (1.25, -2.4, 3.2)])
    close(out.chosen_rewards, [-1.25, -3.0, -0.8])
    close(out.rejected_rewards, [-3.0, -1.1, -4.5])
    free = get_preference_loss("simpo")(
        t(C), t(R), None, None, beta=BETA, chosen_lengths=t(LC), rejected_lengths=t(LR)
    )
    torch.testing.assert_close(free.losses, out.losses)


def test_simpo_gamma_and_label_smoothing_by_hand():
    """γ = 1: x = [0.75, −2.9, 2.7]; with ε = 0.1 pair 1: 0.9·(−log σ(0.75)) + 0.1·(−log σ(−0.75))
    = 0.9·0.38687 + 0.1·1.13687 = 0.46187."""
    out = run("simpo", params=PreferenceLossParams(simpo_gamma=1.0), label_smoothing=0.1)
    assert out.losses[0].item() == pytest.approx(
        -0.9 * log_sigmoid(0.75) - 0.1 * log_sigmoid(-0.75), rel=1e-12
    )


def test_orpo_by_hand():
    """ORPO odds-ratio term, λ = β = 0.5, on averages p̄_w = [−2.5, −6, −1.6], p̄_l = [−6, −2.2, −9]:
    log odds(p̄) = p̄ − log(1 − e^p̄): pair 1: −2.5 − log(1 − 0.08208) = −2.41435 and
    −6 − log(1 − 0.00248) = −5.99752; −0.5·log σ(3.58317) = 0.01370;
    all three = [0.01370, 1.96735, 0.00024]. Rewards β·p̄ = [−1.25, −3, −0.8]."""

    def log_odds(p):
        return p - math.log(1 - math.exp(p))

    pw, pl = [-2.5, -6.0, -1.6], [-6.0, -2.2, -9.0]
    out = run("orpo")
    close(out.losses, [-0.5 * log_sigmoid(log_odds(a) - log_odds(b)) for a, b in zip(pw, pl)])
    close(out.chosen_rewards, [-1.25, -3.0, -0.8])


def test_orpo_finite_when_average_logp_is_zero():
    """p̄ = 0 (probability 1) would make log(1 − e^p̄) = −inf; the loss and gradient stay finite."""
    c = t([0.0, -1.0], requires_grad=True)
    out = get_preference_loss("orpo")(
        c, t([0.0, -2.0]), None, None, beta=0.1, chosen_lengths=t([3, 3]), rejected_lengths=t([3, 3])
    )
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(c.grad).all()


# ------------------------------------------------------- pitfall 10: policy == reference


REF_BASED = sorted(set(PREFERENCE_LOSSES) - REFERENCE_FREE_LOSSES)

# Value at policy == reference (h = ρ_w = ρ_l = 0), β = 0.5, worked by hand:
AT_EQUALITY = {
    "sigmoid": math.log(2),  # −log σ(0)
    "hinge": 1.0,  # max(0, 1 − 0)
    "ipo": 1.0,  # (0 − 1/(2β))² = 1
    "robust": math.log(2),  # ε = 0 → DPO
    "exo_pair": 0.5 * (math.log(0.5) - math.log(1 - 1e-3)) + 0.5 * (math.log(0.5) - math.log(1e-3)),
    "nca_pair": 2 * math.log(2),  # ln2 + ½ ln2 + ½ ln2
    "bco_pair": 2 * math.log(2),  # δ = 0
    "sppo_hard": 2.0,  # 1² + 1²
    "aot": math.log(2),
    "aot_pair": math.log(2),
    "apo_zero": 1.0,  # 1 − ½ + ½
    "apo_down": 1.0,  # σ(0) + 1 − σ(0) = ½ + ½
    "discopop": 0.5 * math.log(2) + 0.5,  # m = σ(0) = ½: ½ ln2 + ½ e⁰
}


@pytest.mark.parametrize("name", REF_BASED)
def test_pitfall_10_policy_equals_reference_rewards_zero(name):
    """At step 0 policy log-probs == reference log-probs: every implicit reward is exactly 0 and
    the loss takes its closed-form value at h = 0 (DPO: ln 2)."""
    logps_c, logps_r = t([-10.0, -20.0, -3.5]), t([-12.0, -7.0, -30.0])
    out = get_preference_loss(name)(
        logps_c,
        logps_r,
        logps_c.clone(),
        logps_r.clone(),
        beta=BETA,
        chosen_lengths=t([4, 9, 2]),
        rejected_lengths=t([5, 3, 11]),
    )
    assert (out.chosen_rewards == 0).all() and (out.rejected_rewards == 0).all()
    close(out.losses, [AT_EQUALITY[name]] * 3)


def test_pitfall_10_sigmoid_is_ln2_and_rewards_zero():
    """The pure form of pitfall 10: DPO loss == ln 2 exactly-ish and rewards == 0 at π_θ = π_ref."""
    logps = t([-42.0, -3.0])
    out = get_preference_loss("sigmoid")(logps, logps - 5, logps.clone(), logps - 5, beta=0.1)
    close(out.losses, [math.log(2)] * 2)
    assert out.chosen_rewards.abs().max().item() == 0.0 and out.rejected_rewards.abs().max().item() == 0.0


# ------------------------------------------------------------- direction of the gradient


def grads(name: str, c, r, rc, rr, *, beta: float = BETA, label_smoothing: float = 0.0, params=None):
    cg, rg = t(c, True), t(r, True)
    out = get_preference_loss(name)(
        cg,
        rg,
        t(rc),
        t(rr),
        beta=beta,
        chosen_lengths=t(LC[: len(c)]),
        rejected_lengths=t(LR[: len(c)]),
        label_smoothing=label_smoothing,
        params=params,
    )
    out.losses.sum().backward()
    # sft never reads the rejected response: no graph to it, i.e. a zero gradient
    return cg.grad, (rg.grad if rg.grad is not None else torch.zeros_like(rg))


@pytest.mark.parametrize("name", [n for n in PREFERENCE_LOSSES if n != "discopop"])
def test_direction_at_start_of_training(name):
    """At π_θ = π_ref (where every run starts), descending the loss raises log π(y_w)
    (∂L/∂c <= 0) and lowers log π(y_l) (∂L/∂r >= 0), for every variant but discopop (below).
    apo_down's chosen gradient is exactly 0 here (β σ'(0) − β σ'(0)); sft's rejected gradient is 0."""
    gc, gr = grads(name, C, R, C, R)
    assert (gc <= 0).all(), gc
    assert (gr >= 0).all(), gr


@pytest.mark.parametrize(
    "name", ["sigmoid", "hinge", "robust", "bco_pair", "aot", "aot_pair", "apo_zero", "simpo", "orpo", "sft"]
)
def test_direction_everywhere_for_monotone_variants(name):
    """These losses are monotone in the right direction at every point, e.g. the hand batch
    (where one pair has h < 0 and two h > 0)."""
    gc, gr = grads(name, C, R, RC, RR, label_smoothing=0.1 if name == "robust" else 0.0)
    assert (gc <= 0).all(), gc
    assert (gr >= 0).all(), gr


def test_direction_exceptions_targets_past_which_the_gradient_reverses():
    """Variants with a finite target push BACK once the target is passed — by design, not a bug:

    - IPO: (h̄ − 1/(2β))² is minimised at h̄ = 1/(2β) = 1; at h̄ = 3 (ρ_w/|y_w| = 3) ∂L/∂c > 0.
    - SPPO hard: ρ_w is regressed to +1/(2β) and ρ_l to −1/(2β); past them the signs flip.
    - cDPO (ε > 0) and EXO: minimised at σ(βh) = 1 − ε, so for large h ∂L/∂c > 0.
    - NCA: ∂L/∂r_w = −σ(−r_w) + ½σ(r_w) > 0 once r_w > ln 2 (its rejected gradient is always >= 0).
    - APO-down: lowers log π(y_w) whenever the margin term is satisfied (it is meant for chosen
      outputs worse than the model's own).
    """
    gc, _ = grads("ipo", [-4.0 + 12.0], [-2.0], [-4.0], [-2.0])  # ρ_w = 12, |y_w| = 4 → h̄ = 3
    assert gc[0] > 0
    gc, gr = grads("sppo_hard", [3.0], [-3.0], [0.0], [0.0])  # ρ_w = 3 > 1, ρ_l = −3 < −1
    assert gc[0] > 0 and gr[0] < 0
    for name, eps in (("sigmoid", 0.1), ("exo_pair", 0.1)):
        gc, gr = grads(name, [10.0], [-10.0], [0.0], [0.0], label_smoothing=eps)  # βh = 10, σ ≈ 1 > 0.9
        assert gc[0] > 0 and gr[0] < 0, name
    gc, gr = grads("nca_pair", [4.0], [0.0], [0.0], [0.0])  # r_w = 2 > ln 2
    assert gc[0] > 0 and gr[0] >= 0
    gc, _ = grads("apo_down", [2.0], [-8.0], [0.0], [0.0])  # ρ_w = 2, margin already large
    assert gc[0] > 0


def test_direction_discopop_non_monotone_near_zero():
    """DiscoPOP blends −log σ(x) (x < 0) into exp(−x) (x > 0) over a width τ = 0.05, so it rises
    from ln 2 to 1 around x = 0: there (including at π_θ = π_ref, x = 0, slope ≈ +0.78) the
    gradient lowers h. Away from that band it has the DPO direction: at x = ±1."""
    gc, gr = grads("discopop", [0.0], [0.0], [0.0], [0.0])
    assert gc[0] > 0 and gr[0] < 0  # the documented non-monotone region
    for h in (-2.0, 2.0):  # β·h = ±1
        gc, gr = grads("discopop", [h], [0.0], [0.0], [0.0])
        assert gc[0] < 0 and gr[0] > 0


# ------------------------------------------------------------------ pitfall 12: averages


@pytest.mark.parametrize("name", ["ipo", "simpo", "orpo", "sft"])
def test_pitfall_12_average_variants_depend_on_lengths(name):
    """ipo/simpo/orpo/sft divide summed log-probs by the completion lengths: changing only the
    lengths changes the loss (a summed-only implementation would not), and the value with
    lengths L equals the value on pre-averaged log-probs with lengths 1."""
    fn = get_preference_loss(name)
    a = fn(t(C), t(R), t(RC), t(RR), beta=BETA, chosen_lengths=t(LC), rejected_lengths=t(LR)).losses
    b = fn(
        t(C), t(R), t(RC), t(RR), beta=BETA, chosen_lengths=t([1, 1, 1]), rejected_lengths=t([7, 3, 2])
    ).losses
    assert not torch.allclose(a, b)
    avg = [t(C) / t(LC), t(R) / t(LR), t(RC) / t(LC), t(RR) / t(LR)]
    ones = t([1, 1, 1])
    torch.testing.assert_close(fn(*avg, beta=BETA, chosen_lengths=ones, rejected_lengths=ones).losses, a)
    assert name in USES_AVERAGE_LOGPS


def test_pitfall_12_ipo_summed_form_differs_from_averaged():
    """The summed form (h − 1)² at h = [2, −1.5, 1] would be [1, 6.25, 0]; IPO gives [0.0625, 2.56, 0.16]."""
    assert not torch.allclose(run("ipo").losses, t([1.0, 6.25, 0.0]))


@pytest.mark.parametrize("name", sorted(USES_AVERAGE_LOGPS))
def test_pitfall_12_missing_lengths_is_an_error(name):
    with pytest.raises(ValueError, match="chosen_lengths"):
        get_preference_loss(name)(t(C), t(R), t(RC), t(RR), beta=BETA)


@pytest.mark.parametrize("name", sorted(set(PREFERENCE_LOSSES) - USES_AVERAGE_LOGPS))
def test_summed_variants_ignore_lengths(name):
    """Every other variant works on summed log-probs: the lengths do not change it."""
    fn = get_preference_loss(name)
    a = fn(t(C), t(R), t(RC), t(RR), beta=BETA).losses
    b = fn(t(C), t(R), t(RC), t(RR), beta=BETA, chosen_lengths=t(LC), rejected_lengths=t(LR)).losses
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", REF_BASED)
def test_reference_based_variants_require_reference(name):
    with pytest.raises(ValueError, match="reference"):
        get_preference_loss(name)(
            t(C), t(R), None, None, beta=BETA, chosen_lengths=t(LC), rejected_lengths=t(LR)
        )


@pytest.mark.parametrize("name", sorted(set(PREFERENCE_LOSSES) - USES_LABEL_SMOOTHING))
def test_label_smoothing_refused_where_unused(name):
    """A variant that has no use for label_smoothing refuses it instead of silently ignoring it."""
    with pytest.raises(ValueError, match="label_smoothing"):
        run(name, label_smoothing=0.1)


def test_label_smoothing_range():
    with pytest.raises(ValueError, match="label_smoothing"):
        run("robust", label_smoothing=0.5)  # 1/(1 − 2ε) is infinite
    with pytest.raises(ValueError, match="label_smoothing"):
        run("sigmoid", label_smoothing=0.6)
    run("sigmoid", label_smoothing=0.5)


def test_unknown_name_lists_valid_ones_and_shapes_checked():
    with pytest.raises(ValueError, match="sigmoid.*simpo"):
        get_preference_loss("dpo")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        get_preference_loss("sigmoid")(t(C), t(R[:2]), t(RC), t(RR), beta=BETA)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        get_preference_loss("sigmoid")(t([C]), t([R]), t([RC]), t([RR]), beta=BETA)


def test_registry_names():
    assert set(PREFERENCE_LOSSES) == {
        "sigmoid",
        "hinge",
        "ipo",
        "robust",
        "exo_pair",
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_pair",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "simpo",
        "orpo",
    }


# ----------------------------------------------------------------------------- combine


def test_combine_weights_applied_and_per_type_returned():
    """--loss_type sigmoid sft --loss_weights 1 0.5 (RPO): total = DPO + 0.5·NLL;
    pair 1: 0.31326 + 0.5·2.5 = 1.56326. per_type holds the UNweighted terms. Both variants report
    β·ρ, and the weight-normalised reward mean (1·β·ρ + 0.5·β·ρ)/1.5 is β·ρ itself."""
    out = combine_preference_losses(
        ["sigmoid", "sft"],
        [1.0, 0.5],
        t(C),
        t(R),
        t(RC),
        t(RR),
        beta=BETA,
        chosen_lengths=t(LC),
        rejected_lengths=t(LR),
    )
    dpo = [-log_sigmoid(x) for x in X]
    nll = [2.5, 6.0, 1.6]
    close(out.losses, [d + 0.5 * n for d, n in zip(dpo, nll)])
    assert set(out.per_type) == {"sigmoid", "sft"}
    close(out.per_type["sigmoid"], dpo)
    close(out.per_type["sft"], nll)
    close(out.chosen_rewards, RW)
    close(out.rejected_rewards, RL)
    total, per_type, cr, rr = out  # unpacks as the 4-tuple
    assert total is out.losses


def test_combine_default_weights_and_label_smoothing_routing():
    """Weights default to 1 each; ε = 0.1 goes to sigmoid (cDPO) but not to hinge, which would
    refuse it: pair 2: cDPO(−0.75) + hinge = 1.06187 + 1.75 = 2.81187."""
    out = combine_preference_losses(
        ["sigmoid", "hinge"], None, t(C), t(R), t(RC), t(RR), beta=BETA, label_smoothing=0.1
    )
    cdpo = -0.9 * log_sigmoid(-0.75) - 0.1 * log_sigmoid(0.75)
    assert out.losses[1].item() == pytest.approx(cdpo + 1.75, rel=1e-12)
    close(out.chosen_rewards, RW)  # mean of two equal rewards, not their sum (TRL logs 2·β·ρ here)


def test_combine_errors():
    args = (t(C), t(R), t(RC), t(RR))
    with pytest.raises(ValueError, match="2 loss types"):
        combine_preference_losses(["sigmoid", "hinge"], [1.0], *args, beta=BETA)
    with pytest.raises(ValueError, match="valid loss types"):
        combine_preference_losses(["sigmoid", "dpo"], None, *args, beta=BETA)
    with pytest.raises(ValueError, match="label_smoothing"):
        combine_preference_losses(["hinge"], None, *args, beta=BETA, label_smoothing=0.1)
    with pytest.raises(ValueError, match="twice"):
        combine_preference_losses(["sigmoid", "sigmoid"], None, *args, beta=BETA)
    with pytest.raises(ValueError, match="loss_weights"):
        combine_preference_losses(["sigmoid"], [-1.0], *args, beta=BETA)
    with pytest.raises(ValueError, match="empty"):
        combine_preference_losses([], None, *args, beta=BETA)


def test_rewards_are_detached_and_losses_differentiable():
    c = t(C, True)
    for name in PREFERENCE_LOSSES:
        out = get_preference_loss(name)(
            c, t(R), t(RC), t(RR), beta=BETA, chosen_lengths=t(LC), rejected_lengths=t(LR)
        )
        assert out.losses.requires_grad, name
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad, name
        assert out.losses.shape == (3,), name
