"""Advantage estimators against numbers worked by hand and plain Python loops.

GAE hand trajectory (Schulman et al. 2016), γ = 0.9, λ = 0.8, rewards [0, 0, 1], values
[0.5, 0.6, 0.7], episode ends after token 3 (V = 0 there):
    δ₂ = 1 + 0.9·0   − 0.7 = 0.30          A₂ = 0.30
    δ₁ = 0 + 0.9·0.7 − 0.6 = 0.03          A₁ = 0.03 + 0.72·0.30  = 0.246
    δ₀ = 0 + 0.9·0.6 − 0.5 = 0.04          A₀ = 0.04 + 0.72·0.246 = 0.21712
    returns = A + V = [0.71712, 0.846, 1.0]
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from posttrain.losses import (
    gae,
    group_advantages,
    kl_penalized_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)

GAE_ADV = [0.21712, 0.246, 0.30]
GAE_RET = [0.71712, 0.846, 1.0]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def loop_group_advantages(rewards: list[float], g: int, scale: str, eps: float = 1e-4) -> list[float]:
    """The definition, one group at a time with the statistics module's unbiased std."""
    import statistics

    out = []
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    for k in range(0, len(rewards), g):
        group = rewards[k : k + g]
        mean = sum(group) / g
        std = statistics.stdev(group) if g > 1 else 0.0
        for r in group:
            if scale == "group":
                out.append((r - mean) / (std + eps))
            elif scale == "batch":
                out.append((r - mean) / (batch_std + eps))
            else:
                out.append(r - mean)
    return out


def test_group_advantages_by_hand():
    """Group [1, 0, 0, 1]: mean ½, unbiased std sqrt((4·¼)/3) = 0.57735 → ±0.5/(0.57735 + 1e-4) = ±0.86588.
    Group [2, 2, 2, 2]: all equal → 0 (not NaN)."""
    adv = group_advantages(t([1, 0, 0, 1, 2, 2, 2, 2]), 4, scale="group")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert a == pytest.approx(0.86588, abs=1e-5)
    torch.testing.assert_close(adv, t([a, -a, -a, a, 0, 0, 0, 0]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_python_loop(scale):
    """Random rewards in 5 groups of 3 against the loop above."""
    rng = random.Random(0)
    rewards = [rng.uniform(-2, 2) for _ in range(15)]
    adv = group_advantages(t(rewards), 3, scale=scale)
    torch.testing.assert_close(adv, t(loop_group_advantages(rewards, 3, scale)))


def test_group_advantages_dr_grpo_and_batch_by_hand():
    """none: [1, 0 | 3, 5] → [½, −½ | −1, 1]. batch: mean per group, std over all 4 rewards
    (mean 9/4, squares (1.5625 + 5.0625 + 0.5625 + 7.5625) = 14.75, /3 → std 2.21736)."""
    r = t([1, 0, 3, 5])
    torch.testing.assert_close(group_advantages(r, 2, scale="none"), t([0.5, -0.5, -1, 1]))
    s = math.sqrt(14.75 / 3) + 1e-4
    torch.testing.assert_close(group_advantages(r, 2, scale="batch"), t([0.5 / s, -0.5 / s, -1 / s, 1 / s]))


def test_group_advantages_errors_and_detached():
    with pytest.raises(ValueError, match="divide"):
        group_advantages(t([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(t([1, 2]), 2, scale="std")  # type: ignore[arg-type]
    r = t([1.0, 2.0]).requires_grad_()
    assert not group_advantages(r, 2).requires_grad
    # group of one: advantage 0, not NaN
    assert group_advantages(t([3.0, 4.0]), 1).tolist() == [0.0, 0.0]


def test_rloo_by_hand():
    """Group [1, 2, 6]: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 → A = [−3, −1.5, 4.5];
    group [0, 1]: baselines 1, 0 → [−1, 1]. Also A = G/(G−1)·(r − mean): 3/2·(1 − 3) = −3."""
    adv = rloo_advantages(t([1, 2, 6]), 3)
    torch.testing.assert_close(adv, t([-3.0, -1.5, 4.5]))
    torch.testing.assert_close(rloo_advantages(t([0, 1, 5, 5]), 2), t([-1, 1, 0, 0]))
    torch.testing.assert_close(adv, 1.5 * group_advantages(t([1, 2, 6]), 3, scale="none"))
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(t([1.0, 2.0]), 1)


def test_gae_hand_trajectory():
    """See the module docstring; row 2 is the same trajectory right-padded with garbage (100)
    in the padding, which must not enter; row 3 left-padded."""
    rewards = t([[0, 0, 1, 100], [0, 0, 1, 100], [100, 0, 0, 1]])
    values = t([[0.5, 0.6, 0.7, 100], [0.5, 0.6, 0.7, 100], [100, 0.5, 0.6, 0.7]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1]])
    rewards[0, 3], values[0, 3] = 0.0, 0.0  # row 1: zeros in the padding
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[0, :3], t(GAE_ADV))
    torch.testing.assert_close(ret[0, :3], t(GAE_RET))
    torch.testing.assert_close(adv[1], adv[0])
    torch.testing.assert_close(ret[1], ret[0])
    torch.testing.assert_close(adv[2, 1:], t(GAE_ADV))
    torch.testing.assert_close(ret[2, 1:], t(GAE_RET))
    assert adv[:, 3][:2].tolist() == [0, 0] and adv[2, 0] == 0 and ret[2, 0] == 0


def test_gae_skips_a_hole():
    """A masked position inside the row is skipped: [v, hole, v, v] equals the 3-step trajectory."""
    rewards = t([[0, 7, 0, 1]])
    values = t([[0.5, -3, 0.6, 0.7]])
    adv, ret = gae(rewards, values, torch.tensor([[1, 0, 1, 1]]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[0], t([GAE_ADV[0], 0, GAE_ADV[1], GAE_ADV[2]]))
    torch.testing.assert_close(ret[0], t([GAE_RET[0], 0, GAE_RET[1], GAE_RET[2]]))


def test_gae_gamma_lambda_one_is_return_minus_value():
    """γ = λ = 1: A_t = sum_{s>=t} r_s − V_t (Monte-Carlo return minus baseline): rewards
    [1, 2, 3], V [1, 1, 1] → returns-to-go [6, 5, 3], A = [5, 4, 2]; λ = 0: A_t = δ_t."""
    r, v, m = t([[1, 2, 3]]), t([[1, 1, 1]]), torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert adv.tolist() == [[5, 4, 2]] and ret.tolist() == [[6, 5, 3]]
    adv0, _ = gae(r, v, m, gamma=1.0, lam=0.0)
    assert adv0.tolist() == [[1 + 1 - 1, 2 + 1 - 1, 3 - 1]]


def test_whiten_by_hand():
    """Valid [1, 2, 3, 6]: mean 3, unbiased var (4 + 1 + 0 + 9)/3 = 14/3 → (x − 3)/sqrt(14/3 + 1e-8);
    the padded 100 is ignored and returned as 0. shift_mean=False adds the mean back."""
    x = t([[1, 2, 100], [3, 6, 100]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    s = math.sqrt(14 / 3 + 1e-8)
    torch.testing.assert_close(whiten(x, m), t([[-2 / s, -1 / s, 0], [0, 3 / s, 0]]))
    torch.testing.assert_close(
        whiten(x, m, shift_mean=False), t([[3 - 2 / s, 3 - 1 / s, 0], [3, 3 + 3 / s, 0]])
    )
    # one valid entry: 0, not NaN
    assert whiten(t([5.0, 1.0]), torch.tensor([1, 0])).tolist() == [0.0, 0.0]


def test_kl_penalized_rewards_by_hand():
    """β = 0.1, kl [[1, 2, 3], [4, 5, 6]], row 1 valid to t = 1, row 2 all valid, scores [10, 20]:
    [[−0.1, −0.2 + 10, 0], [−0.4, −0.5, −0.6 + 20]]. A row with no valid token gets nothing."""
    kl = t([[1, 2, 3], [4, 5, 6], [1, 1, 1]])
    out = kl_penalized_rewards(t([10, 20, 30]), kl, torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]]), beta=0.1)
    torch.testing.assert_close(out, t([[-0.1, 9.8, 0], [-0.4, -0.5, 19.4], [0, 0, 0]]))


def test_reinforce_pp_by_hand():
    """γ = 1, token rewards [[0, 1], [0, pad 3]]: returns-to-go [[0+1, 1], [0]] (the padded 3 is
    not a reward). Valid G = [1, 1, 0]: mean ⅔, unbiased var
    ((⅓)² + (⅓)² + (⅔)²)/2 = ⅓ → A = [(⅓)/s, (⅓)/s, (−⅔)/s], s = sqrt(⅓ + 1e-8)."""
    r = t([[0, 1], [0, 3]])
    m = torch.tensor([[1, 1], [1, 0]])
    s = math.sqrt(1 / 3 + 1e-8)
    torch.testing.assert_close(reinforce_pp_advantages(r, m), t([[1 / 3 / s, 1 / 3 / s], [-2 / 3 / s, 0]]))


def test_pitfall_31_group_advantages_leave_rewardless_samples_out_of_the_baseline():
    """Groups of 4 with sample 3 (reward placeholder 9) having no reward at all (valid False):
    group [1, 0, 9*, 1] is the group [1, 0, 1] for mean and std: mean 2/3, squares
    (1/9 + 4/9 + 1/9) = 2/3, /(3 − 1) → std sqrt(1/3) = 0.57735; A = [1/3, −2/3, 1/3]/(std + 1e-4)
    and 0 for the invalid one. Group [2*, 5, 2*, 7]: valid [5, 7], mean 6, std sqrt(2) → ±1/(sqrt 2 + eps).
    Old behaviour (no mask) would use 9 in the mean: A_0 = (1 − 2.75)/..., negative."""
    r = t([1, 0, 9, 1, 2, 5, 2, 7])
    valid = torch.tensor([True, True, False, True, False, True, False, True])
    s1, s2 = math.sqrt(1 / 3) + 1e-4, math.sqrt(2) + 1e-4
    expected = t([1 / 3 / s1, -2 / 3 / s1, 0, 1 / 3 / s1, 0, -1 / s2, 0, 1 / s2])
    torch.testing.assert_close(group_advantages(r, 4, scale="group", valid=valid), expected)
    torch.testing.assert_close(group_advantages(r, 4, scale="none", valid=valid), t([1 / 3, -2 / 3, 0, 1 / 3, 0, -1, 0, 1]))
    # batch: std over the 5 valid rewards [1, 0, 1, 5, 7] (mean 2.8; squares 3.24 + 7.84 + 3.24 + 4.84
    # + 17.64 = 36.8; /4 → 9.2), the mean still per group
    sb = math.sqrt(9.2) + 1e-4
    torch.testing.assert_close(group_advantages(r, 4, scale="batch", valid=valid),
                               t([1 / 3 / sb, -2 / 3 / sb, 0, 1 / 3 / sb, 0, -1 / sb, 0, 1 / sb]))
    # all valid: bit-identical to no mask (the TRL-matching path)
    assert torch.equal(group_advantages(r, 4, valid=torch.ones(8, dtype=torch.bool)), group_advantages(r, 4))
    # a group with no valid sample, or one: advantage 0, never NaN
    out = group_advantages(t([1, 2, 3, 4]), 2, valid=torch.tensor([False, False, True, False]))
    assert out.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_pitfall_31_rloo_leaves_rewardless_samples_out_of_the_baseline():
    """Group [1, 2, 9*, 6] (third invalid) is RLOO on [1, 2, 6]: [−3, −1.5, 0, 4.5]. Groups of 3:
    [1, 9*, 6] → baselines 6 and 1 → [−5, 0, 5]; [4, 8*, 2*]: the valid one has no other valid
    sample, so no baseline → 0."""
    valid = torch.tensor([True, False, True, True, False, False])
    torch.testing.assert_close(rloo_advantages(t([1, 9, 6, 4, 8, 2]), 3, valid=valid),
                               t([-5.0, 0.0, 5.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(rloo_advantages(t([1, 2, 9, 6]), 4, valid=torch.tensor([True, True, False, True])),
                               t([-3.0, -1.5, 0.0, 4.5]))
    with pytest.raises(ValueError, match="valid"):
        rloo_advantages(t([1, 2]), 2, valid=torch.tensor([True]))
