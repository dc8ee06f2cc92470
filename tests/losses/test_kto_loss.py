"""KTO loss and its KL reference point against numbers worked by hand (Ethayarajh et al. 2024).

Hand batch, β = 0.5, z₀ = 0.1:
    policy_logps = [-5, -6, -7, -4],  ref_logps = [-5.5, -5, -7, -4.2]
    r = policy − ref = [0.5, -1, 0, 0.2],  is_desirable = [T, F, T, F]
    row 0 (desirable):   1 − σ(0.5·(0.5 − 0.1))  = 1 − σ(0.2)   = 0.45017
    row 1 (undesirable): 1 − σ(0.5·(0.1 − (−1))) = 1 − σ(0.55)  = 0.36586
    row 2 (desirable):   1 − σ(0.5·(0 − 0.1))    = 1 − σ(−0.05) = 0.51250
    row 3 (undesirable): 1 − σ(0.5·(0.1 − 0.2))  = 1 − σ(−0.05) = 0.51250
    rewards β·r = [0.25, -0.5, 0, 0.1]
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses import kto_kl_reference, kto_loss

BETA = 0.5
POLICY = [-5.0, -6.0, -7.0, -4.0]
REF = [-5.5, -5.0, -7.0, -4.2]
DESIRABLE = [True, False, True, False]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(values, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def mask(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def test_kto_by_hand():
    """See the module docstring: losses [0.45017, 0.36586, 0.51250, 0.51250], rewards β·r."""
    losses, rewards = kto_loss(t(POLICY), t(REF), mask(DESIRABLE), torch.tensor(0.1), beta=BETA)
    expected = [
        1 - sigmoid(0.5 * 0.4),
        1 - sigmoid(0.5 * 1.1),
        1 - sigmoid(0.5 * -0.1),
        1 - sigmoid(0.5 * -0.1),
    ]
    torch.testing.assert_close(losses, t(expected))
    assert expected[0] == pytest.approx(0.45017, abs=1e-5)
    torch.testing.assert_close(rewards, t([0.25, -0.5, 0.0, 0.1]))
    assert not rewards.requires_grad


def test_kto_weights_by_hand():
    """λ_D = 1.33, λ_U = 0.5 scale each kind: row 0 → 1.33·0.45017 = 0.59873, row 1 → 0.5·0.36586 = 0.18293."""
    losses, _ = kto_loss(
        t(POLICY), t(REF), mask(DESIRABLE), 0.1, beta=BETA, desirable_weight=1.33, undesirable_weight=0.5
    )
    assert losses[0].item() == pytest.approx(1.33 * (1 - sigmoid(0.2)), rel=1e-12)
    assert losses[1].item() == pytest.approx(0.5 * (1 - sigmoid(0.55)), rel=1e-12)
    assert losses[3].item() == pytest.approx(0.5 * (1 - sigmoid(-0.05)), rel=1e-12)


def test_kto_only_desirable_batch():
    """All rows desirable (no undesirable example in the batch): each is 1 − σ(β(r − z₀)):
    r = [0.5, −1, 0, 0.2] → [1 − σ(0.2), 1 − σ(−0.55), 1 − σ(−0.05), 1 − σ(0.05)]."""
    losses, _ = kto_loss(t(POLICY), t(REF), mask([True] * 4), torch.tensor(0.1), beta=BETA)
    torch.testing.assert_close(losses, t([1 - sigmoid(0.5 * (r - 0.1)) for r in (0.5, -1.0, 0.0, 0.2)]))


def test_kto_only_undesirable_batch():
    """All rows undesirable: each is 1 − σ(β(z₀ − r)) → [1 − σ(−0.2), 1 − σ(0.55), 1 − σ(0.05), 1 − σ(−0.05)]."""
    losses, _ = kto_loss(t(POLICY), t(REF), mask([False] * 4), torch.tensor(0.1), beta=BETA)
    torch.testing.assert_close(losses, t([1 - sigmoid(0.5 * (0.1 - r)) for r in (0.5, -1.0, 0.0, 0.2)]))


def test_kto_unequal_counts_keep_row_order():
    """3 undesirable rows and 1 desirable, in any order: each row gets its own kind's loss in place."""
    kinds = [False, False, True, False]
    losses, _ = kto_loss(t(POLICY), t(REF), mask(kinds), 0.0, beta=BETA)
    r = [0.5, -1.0, 0.0, 0.2]
    expected = [1 - sigmoid(0.5 * ri) if d else 1 - sigmoid(-0.5 * ri) for ri, d in zip(r, kinds)]
    torch.testing.assert_close(losses, t(expected))


def test_kto_at_reference_is_half_and_direction():
    """π_θ = π_ref and z₀ = 0: every loss is 1 − σ(0) = ½ and every reward 0. The gradient raises
    desirable log-probs (∂L/∂logπ = −β σ'(·) λ_D < 0) and lowers undesirable ones (> 0)."""
    p = t(POLICY, True)
    losses, rewards = kto_loss(
        p, t(POLICY), mask(DESIRABLE), kto_kl_reference(t(POLICY), t(POLICY)), beta=BETA
    )
    torch.testing.assert_close(losses, t([0.5] * 4))
    assert (rewards == 0).all()
    losses.sum().backward()
    d = mask(DESIRABLE)
    assert (p.grad[d] < 0).all() and (p.grad[~d] > 0).all()
    # at r = z₀: ∂/∂logπ [1 − σ(β(r − z₀))] = −β·σ(0)·(1 − σ(0)) = −0.125
    torch.testing.assert_close(p.grad, t([-0.125, 0.125, -0.125, 0.125]))


def test_kto_kl_reference_is_not_differentiated():
    """z₀ is a constant in the loss: a z₀ that requires grad gets no gradient."""
    z = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    losses, _ = kto_loss(t(POLICY, True), t(REF), mask(DESIRABLE), z, beta=BETA)
    losses.sum().backward()
    assert z.grad is None


def test_kto_kl_reference_by_hand_and_clamp():
    """mean([−5 − (−6), −3 − (−3.5)]) = mean([1, 0.5]) = 0.75; a negative mean
    mean([−0.5, −1.5]) = −1 is clamped to 0 (a KL is >= 0). Detached either way."""
    pol = t([-5.0, -3.0], True)
    z = kto_kl_reference(pol, t([-6.0, -3.5]))
    assert z.item() == pytest.approx(0.75) and z.dim() == 0 and not z.requires_grad
    z = kto_kl_reference(t([-5.0, -4.0], True), t([-4.5, -2.5]))
    assert z.item() == 0.0 and not z.requires_grad


def test_kto_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="bool"):
        kto_loss(t(POLICY), t(REF), torch.tensor([1, 0, 1, 0]), 0.0, beta=BETA)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        kto_loss(t(POLICY), t(REF[:3]), mask(DESIRABLE), 0.0, beta=BETA)
    with pytest.raises(ValueError, match="scalar"):
        kto_loss(t(POLICY), t(REF), mask(DESIRABLE), t([0.1, 0.2]), beta=BETA)
