"""PPO/GRPO policy loss, its aggregation, the value loss and RL metrics, worked by hand
(pitfalls 13, 14, 18).

Clip, ε_low = ε_high = 0.2 (clip range [0.8, 1.2]), loss ℓ = −min(ρA, clip(ρ)A):
    ρ = 1.5, A = +1: −min(1.5, 1.2)   = −1.2   clipped high (gradient cut)
    ρ = 1.5, A = −1: −min(−1.5, −1.2) = +1.5   not clipped (the pessimistic term is ρA)
    ρ = 0.5, A = −1: −min(−0.5, −0.8) = +0.8   clipped low (gradient cut)
    ρ = 0.5, A = +1: −min(0.5, 0.8)   = −0.5   not clipped

Aggregation, per-token losses with row lengths n = [4, 2, 1, 3] (10 tokens, 4 completions):
    rows [1 2 3 4], [5 6], [7], [8 9 10]: row sums 10, 11, 7, 27 (total 55), row means 2.5, 5.5, 7, 9
    grpo    = (2.5 + 5.5 + 7 + 9) / 4 = 6
    bnpo    = dapo = 55 / 10 = 5.5
    dr_grpo = 55 / (4 · 5) = 2.75        (max_completion_length 5)
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses import (
    POLICY_LOSS_TYPES,
    aggregate_policy_loss,
    clipped_policy_loss,
    explained_variance,
    get_loss,
    group_advantages,
    masked_entropy_mean,
    value_loss,
)


def t(values, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


AGG_LOSS = [[1, 2, 3, 4], [5, 6, 99, 99], [7, 99, 99, 99], [8, 9, 10, 99]]  # 99 = padding garbage
AGG_MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]


def test_pitfall13_ratio_is_exactly_one_and_loss_is_minus_advantage():
    """First pass of a rollout: old_logp = logp.detach() → ρ == 1 exactly (not approximately), the
    loss on every valid token is −A, 0 on padding (where old_logp is −inf garbage), nothing clipped,
    and ∂ℓ/∂logp = −A on valid tokens, 0 on padding."""
    logp = t([[-1.3, -0.2, -2.0], [-0.7, -5.0, -0.1]], True)
    old = logp.detach().clone()
    old[1, 2] = -math.inf
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    for adv, per_token in ((t([0.5, -2.0]), [[0.5] * 3, [-2.0] * 3]), (t([[1, 2, 3], [4, 5, 6]]), None)):
        loss, stats = clipped_policy_loss(logp, old, adv, mask, epsilon_low=0.2)
        a = t(per_token) if per_token is not None else adv
        assert (stats["ratio"] == 1).all()
        expected = torch.where(mask.bool(), -a, torch.zeros_like(a))
        assert torch.equal(loss.detach(), expected)
        assert not stats["clipped"].any()
        (grad,) = torch.autograd.grad(loss.sum(), logp)
        assert torch.equal(grad, expected)


def test_pitfall18_clip_by_hand_both_sides_counted():
    """See the module docstring: losses [−1.2, 1.5, 0.8, −0.5]; clipped_low marks token 3, clipped_high
    token 1 (pitfall 18: both sides); the clipped tokens get no gradient, the others −A·ρ."""
    ratio = [1.5, 1.5, 0.5, 0.5]
    logp = t([[math.log(r) for r in ratio]], True)
    old = t([[0.0, 0.0, 0.0, 0.0]])
    adv = t([[1.0, -1.0, -1.0, 1.0]])
    loss, stats = clipped_policy_loss(logp, old, adv, torch.ones(1, 4), epsilon_low=0.2)
    torch.testing.assert_close(loss, t([[-1.2, 1.5, 0.8, -0.5]]))
    assert stats["clipped_high"].tolist() == [[True, False, False, False]]
    assert stats["clipped_low"].tolist() == [[False, False, True, False]]
    assert stats["clipped"].tolist() == [[True, False, True, False]]
    # TRL's region fraction: 2 of 4 valid tokens
    assert stats["clipped"].double().mean().item() == 0.5
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    # d(−ρA)/dlogp = −ρA: token 2 → −1.5·(−1) = 1.5, token 4 → −0.5·1 = −0.5
    torch.testing.assert_close(grad, t([[0.0, 1.5, 0.0, -0.5]]))


def test_clip_higher_is_asymmetric():
    """DAPO clip-higher, ε_low = 0.2, ε_high = 0.28: ρ = 1.25, A = +1 → −1.25 (inside 1.28, not
    clipped); symmetric ε = 0.2 → −1.2 (clipped high). ρ = 0.75, A = −1 → 0.8 either way (low side 0.8)."""
    logp = t([[math.log(1.25), math.log(0.75)]])
    adv, mask, old = t([[1.0, -1.0]]), torch.ones(1, 2), t([[0.0, 0.0]])
    loss, stats = clipped_policy_loss(logp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28)
    torch.testing.assert_close(loss, t([[-1.25, 0.8]]))
    assert stats["clipped_high"].tolist() == [[False, False]] and stats["clipped_low"].tolist() == [
        [False, True]
    ]
    loss, stats = clipped_policy_loss(logp, old, adv, mask, epsilon_low=0.2)
    torch.testing.assert_close(loss, t([[-1.2, 0.8]]))
    assert stats["clipped_high"].tolist() == [[True, False]]


def test_padding_never_counts_as_clipped():
    """A padded token whose ratio would be huge (garbage log-probs) is neither clipped nor in the loss."""
    logp = t([[0.0, 50.0]])
    loss, stats = clipped_policy_loss(logp, t([[0.0, 0.0]]), t([1.0]), torch.tensor([[1, 0]]))
    assert loss.tolist() == [[-1.0, 0.0]] and not stats["clipped"].any() and stats["ratio"][0, 1] == 1


@pytest.mark.parametrize(
    ("loss_type", "expected", "kwargs"),
    [
        ("grpo", 6.0, {}),
        ("bnpo", 5.5, {}),
        ("dapo", 5.5, {}),
        ("dr_grpo", 2.75, {"max_completion_length": 5}),
    ],
)
def test_aggregation_closed_forms(loss_type, expected, kwargs):
    """See the module docstring; the padded 99s never enter."""
    out = aggregate_policy_loss(t(AGG_LOSS), torch.tensor(AGG_MASK), loss_type=loss_type, **kwargs)
    assert out.item() == pytest.approx(expected)


def test_aggregation_with_step_normalisers():
    """dapo with N = 20 tokens in the step: 55/20 = 2.75; grpo with S = 8 sequences: 24/8 = 3;
    dr_grpo with S = 8, L = 5: 55/40 = 1.375."""
    loss, mask = t(AGG_LOSS), torch.tensor(AGG_MASK)
    assert aggregate_policy_loss(loss, mask, loss_type="dapo", num_items_in_batch=20).item() == pytest.approx(
        2.75
    )
    assert aggregate_policy_loss(
        loss, mask, loss_type="grpo", num_sequences_in_batch=8
    ).item() == pytest.approx(3)
    out = aggregate_policy_loss(
        loss, mask, loss_type="dr_grpo", max_completion_length=5, num_sequences_in_batch=8
    )
    assert out.item() == pytest.approx(1.375)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_pitfall14_split_into_micro_batches_is_invariant(loss_type):
    """Rows [0, 1] and [2, 3] as two micro-batches with the step's N = 10 tokens and S = 4 sequences:
    the micro-batch losses sum to the whole-batch loss, and so do their gradients.
    dapo: 21/10 + 34/10 = 5.5; dr_grpo: 21/20 + 34/20 = 2.75; grpo: (2.5 + 5.5)/4 + (7 + 9)/4 = 6.
    bnpo (local by definition) is not: 21/6 + 34/4 = 12 over 2 steps = 6 ≠ 5.5."""
    kw = {
        "loss_type": loss_type,
        "max_completion_length": 5,
        "num_items_in_batch": 10,
        "num_sequences_in_batch": 4,
    }
    whole = t(AGG_LOSS, True)
    mask = torch.tensor(AGG_MASK)
    full = aggregate_policy_loss(whole, mask, **kw)
    (g_full,) = torch.autograd.grad(full, whole)
    parts = [t(AGG_LOSS[:2], True), t(AGG_LOSS[2:], True)]
    split = sum(aggregate_policy_loss(p, m, **kw) for p, m in zip(parts, (mask[:2], mask[2:])))
    g_split = torch.cat(torch.autograd.grad(split, parts))
    assert split.item() == pytest.approx(full.item())
    assert split.item() == pytest.approx({"grpo": 6.0, "dapo": 5.5, "dr_grpo": 2.75}[loss_type])
    torch.testing.assert_close(g_split, g_full)
    bnpo = sum(aggregate_policy_loss(p, m, loss_type="bnpo") for p, m in zip(parts, (mask[:2], mask[2:])))
    assert bnpo.item() / 2 == pytest.approx(6.0)


@pytest.mark.parametrize(
    ("loss_type", "expected"), [("grpo", 6.0), ("bnpo", 5.5), ("dapo", 5.5), ("dr_grpo", 2.75)]
)
def test_pitfall16_fully_masked_completion_leaves_the_denominator(loss_type, expected):
    """A 5th completion masked out entirely (truncated, mask_truncated_completions) changes nothing:
    grpo stays 24/4 = 6 (not 24/5), dr_grpo 55/(4·5) (not 55/(5·5)), bnpo/dapo 55/10."""
    loss = t(AGG_LOSS + [[50, 50, 50, 50]])
    mask = torch.tensor(AGG_MASK + [[0, 0, 0, 0]])
    out = aggregate_policy_loss(loss, mask, loss_type=loss_type, max_completion_length=5)
    assert out.item() == pytest.approx(expected)


def test_aggregation_errors():
    with pytest.raises(ValueError, match="grpo, dr_grpo, dapo, bnpo"):
        aggregate_policy_loss(t(AGG_LOSS), torch.tensor(AGG_MASK), loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_policy_loss(t(AGG_LOSS), torch.tensor(AGG_MASK), loss_type="dr_grpo")
    assert set(POLICY_LOSS_TYPES) == {"grpo", "dr_grpo", "dapo", "bnpo"}


# --- GRPO with β = 0 and one iteration is REINFORCE with the group-mean baseline -------------------
# Toy policy: one logit vector θ over V = 3 tokens, every token drawn from p = softmax(θ), so
# log π(y_t) = θ_{y_t} − logsumexp θ and ∇_θ log π(y_t) = e_{y_t} − p  (computed below with math).
THETA = [0.3, -0.5, 1.1]
COMPLETIONS = [[0, 2], [1], [2, 2, 0]]  # G = 3 completions of one prompt, lengths 2, 1, 3
REWARDS = [1.0, 0.0, 0.2]  # mean 0.4 → A = r − mean = [0.6, −0.4, −0.2]


def _probs() -> list[float]:
    z = sum(math.exp(x) for x in THETA)
    return [math.exp(x) / z for x in THETA]


def _grad_log_pi(token: int) -> list[float]:
    p = _probs()
    return [(1.0 if v == token else 0.0) - p[v] for v in range(3)]


def _grpo_loss_grad(loss_type: str) -> torch.Tensor:
    theta = t(THETA, True)
    logp_all = torch.log_softmax(theta, dim=0)
    T = max(len(c) for c in COMPLETIONS)
    rows, mask = [], []
    for c in COMPLETIONS:
        rows.append(torch.stack([logp_all[y] for y in c] + [logp_all.new_zeros(())] * (T - len(c))))
        mask.append([1] * len(c) + [0] * (T - len(c)))
    logp, mask = torch.stack(rows), torch.tensor(mask)
    adv = group_advantages(t(REWARDS), 3, scale="none")
    per_token, stats = clipped_policy_loss(logp, logp.detach(), adv, mask, epsilon_low=0.2)
    assert (stats["ratio"] == 1).all()
    loss = aggregate_policy_loss(per_token, mask, loss_type=loss_type, max_completion_length=4)
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


def test_grpo_gradient_equals_reinforce_with_group_mean_baseline():
    """Dr. GRPO (sum / (G·L), L = 4): ∇L = −1/(G·L) · sum_i (r_i − r̄) ∇log π(y_i), exactly the
    REINFORCE estimator with the group-mean baseline (∇log π(y_i) = sum_t (e_{y_it} − p)), scaled."""
    mean = sum(REWARDS) / 3
    reinforce = [0.0, 0.0, 0.0]
    for r, c in zip(REWARDS, COMPLETIONS):
        for y in c:
            reinforce = [acc + (r - mean) * g for acc, g in zip(reinforce, _grad_log_pi(y))]
    torch.testing.assert_close(_grpo_loss_grad("dr_grpo"), t([-x / (3 * 4) for x in reinforce]))


def test_grpo_loss_type_gradient_is_length_normalised_reinforce():
    """loss_type grpo: ∇L = −1/G · sum_i (r_i − r̄) · (1/n_i) sum_t ∇log π(y_it) (each completion's
    token mean — the length bias Dr. GRPO removes); dapo: the same with 1/(total tokens = 6) instead."""
    mean = sum(REWARDS) / 3
    grpo, dapo = [0.0] * 3, [0.0] * 3
    for r, c in zip(REWARDS, COMPLETIONS):
        for y in c:
            g = _grad_log_pi(y)
            grpo = [acc + (r - mean) * gi / len(c) for acc, gi in zip(grpo, g)]
            dapo = [acc + (r - mean) * gi for acc, gi in zip(dapo, g)]
    torch.testing.assert_close(_grpo_loss_grad("grpo"), t([-x / 3 for x in grpo]))
    torch.testing.assert_close(_grpo_loss_grad("dapo"), t([-x / 6 for x in dapo]))


# --- value loss and metrics ------------------------------------------------------------------------


def test_value_loss_clip_by_hand():
    """c = 0.2, V_old = 1 (clip range [0.8, 1.2]):
        V = 1.5, R = 2: max((−0.5)², (1.2 − 2)²) = 0.64 → ½ → 0.32 (clipped term larger: counted)
        V = 1.5, R = 1: max(0.25, (1.2 − 1)² = 0.04) = 0.25 → 0.125
        V = 0.9, R = 1: inside the range, both 0.01 → 0.005 (equal: not counted)
        V = 0.5, R = 0: max(0.25, 0.8² = 0.64) → 0.32 (counted)
    a 5th, padded token holds garbage. clipfrac = 2/4. ∂ℓ/∂V = V − R where the unclipped term wins
    (0.5, −0.1) and 0 where the clamped V wins (its clamp has no gradient)."""
    values = t([[1.5, 1.5, 0.9, 0.5, 1e6]], True)
    old = t([[1.0, 1.0, 1.0, 1.0, 0.0]])
    returns = t([[2.0, 1.0, 1.0, 0.0, -1e6]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    per_token, clipfrac = value_loss(values, old, returns, mask, clip_range_value=0.2)
    torch.testing.assert_close(per_token, t([[0.32, 0.125, 0.005, 0.32, 0.0]]))
    assert clipfrac.item() == pytest.approx(0.5) and not clipfrac.requires_grad
    (grad,) = torch.autograd.grad(per_token.sum(), values)
    torch.testing.assert_close(grad, t([[0.0, 0.5, -0.1, 0.0, 0.0]]))
    unclipped, frac = value_loss(values, old, returns, mask, clip_range_value=None)
    torch.testing.assert_close(unclipped, t([[0.125, 0.125, 0.005, 0.125, 0.0]]))
    assert frac.item() == 0.0


def test_pitfall18_entropy_mean_ignores_padding():
    """Valid entropies 1.0, 0.5, 0.2 → 1.7/3; padding holds −3, NaN and inf, none of which enters —
    the logged entropy stays >= 0 and finite. Nothing valid → 0."""
    ent = t([[1.0, 0.5, -3.0], [0.2, math.nan, math.inf]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_entropy_mean(ent, mask).item() == pytest.approx(1.7 / 3)
    assert masked_entropy_mean(ent, torch.zeros(2, 3)).item() == 0.0


def test_entropy_from_a_softmax_by_hand():
    """p = (½, ¼, ¼): H = ½ ln 2 + 2·¼ ln 4 = 1.5 ln 2 = 1.039721; uniform over 4: ln 4. Mean over
    the two valid tokens = (1.5 + 2)/2 · ln 2."""

    def h(p):
        return -sum(x * math.log(x) for x in p)

    ent = t([[h([0.5, 0.25, 0.25]), h([0.25] * 4), -1.0]])
    assert ent[0, 0].item() == pytest.approx(1.039721, abs=1e-6)
    assert masked_entropy_mean(ent, torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.75 * math.log(2))


def test_explained_variance_by_hand():
    """R = [1, 2, 3, 4] (Var 1.25): V = R → 1; V ≡ 2.5 → 0; V = [1, 2, 3, 5] → R − V = [0, 0, 0, −1],
    Var = 0.25 − 0.0625 = 0.1875 → 1 − 0.15 = 0.85. Padding garbage ignored; Var R = 0 → NaN."""
    R = t([[1, 2, 99], [3, 4, -99]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert explained_variance(R, R, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(R, 2.5), R, mask).item() == pytest.approx(0.0)
    assert explained_variance(t([[1, 2, 0], [3, 5, 0]]), R, mask).item() == pytest.approx(0.85)
    assert math.isnan(explained_variance(R, torch.ones_like(R), mask).item())


def test_registry_names():
    assert get_loss("ppo_clip") is clipped_policy_loss and get_loss("ppo_value") is value_loss
