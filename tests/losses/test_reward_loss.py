"""Bradley-Terry reward-model loss and its metrics against numbers worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses import bradley_terry_loss, get_loss, reward_accuracy, reward_margin

CHOSEN = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
REJECTED = torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64)


def softplus(x: float) -> float:
    """−log σ(x) = log(1 + e^−x)."""
    return math.log1p(math.exp(-x))


def test_bradley_terry_by_hand():
    """−log σ(r_c − r_r): differences [1.5, −0.5, 0] → [0.20141, 0.97408, ln 2 = 0.69315]."""
    out = bradley_terry_loss(CHOSEN, REJECTED)
    expected = [softplus(1.5), softplus(-0.5), math.log(2)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    assert expected[0] == pytest.approx(0.20141, abs=1e-5)


def test_bradley_terry_margin_by_hand():
    """Llama-2 margin m = [1, 0, 0.5]: −log σ(1.5 − 1) = 0.47408, −log σ(−0.5) = 0.97408,
    −log σ(0 − 0.5) = 0.97408."""
    out = bradley_terry_loss(CHOSEN, REJECTED, margin=torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(
        out, torch.tensor([softplus(0.5), softplus(-0.5), softplus(-0.5)], dtype=torch.float64)
    )


def test_bradley_terry_center_rewards_by_hand():
    """η = 0.01 adds η·(r_c + r_r)²: sums [2.5, 1.5, 2] → +[0.0625, 0.0225, 0.04]:
    [0.20141 + 0.0625, 0.97408 + 0.0225, 0.69315 + 0.04]."""
    out = bradley_terry_loss(CHOSEN, REJECTED, center_rewards_coefficient=0.01)
    expected = [softplus(1.5) + 0.0625, softplus(-0.5) + 0.0225, math.log(2) + 0.04]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


def test_bradley_terry_gradient_direction_and_value():
    """∂L/∂r_c = −σ(−(r_c − r_r)) < 0 and ∂L/∂r_r = +σ(−(r_c − r_r)) > 0; for the tie, ∓½."""
    c, r = CHOSEN.clone().requires_grad_(True), REJECTED.clone().requires_grad_(True)
    bradley_terry_loss(c, r).sum().backward()
    expected = torch.tensor([1 / (1 + math.exp(1.5)), 1 / (1 + math.exp(-0.5)), 0.5], dtype=torch.float64)
    torch.testing.assert_close(c.grad, -expected)
    torch.testing.assert_close(r.grad, expected)


def test_bradley_terry_center_term_pulls_sum_to_zero():
    """With equal scores the BT term's gradient on the sum is 0, and η(r_c + r_r)² pulls a shifted
    pair (3, 3) down: ∂/∂r_c = −½ + 2η·6 = −0.5 + 0.12 for η = 0.01; at (−3, −3) it is −0.5 − 0.12."""
    for s, expected in ((3.0, -0.38), (-3.0, -0.62)):
        c = torch.tensor([s], dtype=torch.float64, requires_grad=True)
        bradley_terry_loss(
            c, torch.tensor([s], dtype=torch.float64), center_rewards_coefficient=0.01
        ).sum().backward()
        assert c.grad.item() == pytest.approx(expected)


def test_reward_accuracy_ties_count_half():
    """Pairs: 2 > 0.5 (1), 0.5 < 1 (0), 1 = 1 (½) → (1 + 0 + 0.5)/3 = 0.5.
    A constant reward model (all ties) reads 0.5, chance."""
    assert reward_accuracy(CHOSEN, REJECTED).item() == pytest.approx(0.5)
    assert reward_accuracy(torch.ones(4), torch.ones(4)).item() == 0.5
    assert reward_accuracy(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 0.0])).item() == 1.0


def test_reward_margin_by_hand():
    """mean([1.5, −0.5, 0]) = 1/3; fp32, no gradient."""
    c = CHOSEN.clone().requires_grad_(True)
    m = reward_margin(c, REJECTED)
    assert m.item() == pytest.approx(1 / 3, rel=1e-6) and m.dtype == torch.float32 and not m.requires_grad


def test_bradley_terry_registered_and_shape_errors():
    assert get_loss("bradley_terry") is bradley_terry_loss
    with pytest.raises(ValueError, match="differ"):
        bradley_terry_loss(CHOSEN, REJECTED[:2])
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(CHOSEN, REJECTED, margin=torch.zeros(2, dtype=torch.float64))
