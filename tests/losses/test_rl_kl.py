"""KL(π_θ ‖ π_ref) estimators k1, k2, k3 (Schulman 2020) against numbers worked by hand.

Tokens sampled from π_θ; log r = log π_ref − log π_θ. Hand pair: logp = log 0.5, ref_logp = log 0.25
→ r = ½, log r = −ln 2 = −0.693147:
    k1 = −log r           = 0.693147
    k2 = ½ (log r)²        = 0.240227
    k3 = (r − 1) − log r   = −0.5 + 0.693147 = 0.193147
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses import KL_ESTIMATORS, kl_estimate

LN2 = math.log(2)


def t(values, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def test_each_estimator_by_hand():
    """See the module docstring; second token has π_ref > π_θ (r = 2): k1 = −ln 2 (negative: k1 is
    unbiased, not pointwise >= 0), k2 = ½ ln²2, k3 = 1 − ln 2 = 0.306853."""
    logp = t([[math.log(0.5), math.log(0.25)]])
    ref = t([[math.log(0.25), math.log(0.5)]])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), t([[LN2, -LN2]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), t([[0.5 * LN2**2, 0.5 * LN2**2]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), t([[-0.5 + LN2, 1 - LN2]]))
    assert kl_estimate(logp, ref, "k3")[0, 0].item() == pytest.approx(0.193147, abs=1e-6)


def test_k1_k3_expectations_are_the_exact_kl():
    """Two-outcome policy q = (0.7, 0.3), reference p = (0.4, 0.6). Exact KL(q‖p) =
    0.7·0.559616 − 0.3·0.693147 = 0.183787. The q-weighted average of k1 and of k3 over
    both outcomes equals it (E_q[r] = 1 so k3's extra term has mean 0); k2's does not (biased)."""
    q, p = [0.7, 0.3], [0.4, 0.6]
    exact = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))
    assert exact == pytest.approx(0.183787, abs=1e-6)
    logp, ref = t([[math.log(x) for x in q]]), t([[math.log(x) for x in p]])
    weights = t([q])
    for est in ("k1", "k3"):
        assert (kl_estimate(logp, ref, est) * weights).sum().item() == pytest.approx(exact, rel=1e-12)
    assert (kl_estimate(logp, ref, "k2") * weights).sum().item() != pytest.approx(exact, rel=1e-3)


def test_pitfall13_kl_zero_at_reference_and_k2_k3_never_negative():
    """k3 = (r − 1) − log r >= 0 because log r <= r − 1; k2 is a square. All three are exactly 0 when
    π_θ == π_ref (KL == 0 at step 0, pitfall 13)."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, 50, generator=g, dtype=torch.float64) * 10
    ref = -torch.rand(64, 50, generator=g, dtype=torch.float64) * 10
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        assert (kl_estimate(logp.to(dtype), ref.to(dtype), "k3") >= 0).all()
        assert (kl_estimate(logp.to(dtype), ref.to(dtype), "k2") >= 0).all()
        tiny = logp.to(dtype) + 1e-6  # near-equal log-probs: no negative rounding
        assert (kl_estimate(tiny, logp.to(dtype), "k3") >= 0).all()
    for est in KL_ESTIMATORS:
        assert (kl_estimate(logp, logp.clone(), est) == 0).all()


def test_k3_gradient_by_hand():
    """d k3 / d logp = d/dlogp [exp(ref − logp) − 1 − (ref − logp)] = 1 − r. At r = ½: ½; the
    reference gets no gradient."""
    logp = t([math.log(0.5)], True)
    ref = t([math.log(0.25)], True)
    kl_estimate(logp, ref, "k3").sum().backward()
    assert logp.grad.item() == pytest.approx(0.5)
    assert ref.grad is None


def test_mask_zeroes_padding_without_nan_gradients():
    """A padded position with logp = −inf (ratio exp(+inf)) gives estimate 0 and a finite (zero)
    gradient there when the mask is passed."""
    logp = t([[math.log(0.5), -math.inf]], True)
    ref = t([[math.log(0.25), 0.0]])
    mask = torch.tensor([[1, 0]])
    for est in KL_ESTIMATORS:
        out = kl_estimate(logp, ref, est, mask=mask)
        assert out[0, 1].item() == 0.0
        out.sum().backward()
        assert torch.isfinite(logp.grad).all() and logp.grad[0, 1].item() == 0.0
        logp.grad = None


def test_unknown_estimator_and_shapes():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(t([0.0]), t([0.0]), "k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ"):
        kl_estimate(t([0.0]), t([0.0, 1.0]))


# -- pitfall 26: what each estimator's gradient estimates, exactly, on a categorical -------------

Q26 = [0.1, 0.2, 0.3, 0.4]  # q = softmax(theta) with theta = log q (sums to 1)
P26 = [0.25, 0.25, 0.25, 0.25]
# float64, 4 outcomes, O(1) terms: rounding is a few eps (2.2e-16) per term; 1e-12 is far above it
# and far below the smallest hand-worked difference (1e-7 printed digits aside, values are >= 0.02)
EXACT = {"atol": 1e-12, "rtol": 0.0}


def _expected_pathwise_gradient(estimator: str) -> torch.Tensor:
    """sum_x q(x) * d/dtheta kl_estimate(log q(x), log p(x)): the estimator differentiated through
    the sampled outcome's logp only (ref detached, no score-function term), averaged exactly over q."""
    theta = t([math.log(x) for x in Q26], requires_grad=True)
    ref = t([math.log(x) for x in P26])
    q = torch.softmax(theta, 0).detach()
    total = torch.zeros(4, dtype=torch.float64)
    for x in range(4):
        logp = torch.log_softmax(theta, 0)[x].view(1, 1)
        value = kl_estimate(logp, ref[x].view(1, 1), estimator).sum()
        (grad,) = torch.autograd.grad(value, theta)
        total += q[x] * grad
    return total


def _exact_kl_gradient(direction: str) -> torch.Tensor:
    """Autograd of the closed form: reverse KL(q || p) or forward KL(p || q), q = softmax(theta)."""
    theta = t([math.log(x) for x in Q26], requires_grad=True)
    logq, logp = torch.log_softmax(theta, 0), t([math.log(x) for x in P26])
    kl = (logq.exp() * (logq - logp)).sum() if direction == "reverse" else (logp.exp() * (logp - logq)).sum()
    (grad,) = torch.autograd.grad(kl, theta)
    return grad


def test_pitfall_26_expected_gradients_of_the_estimators():
    """q = (0.1, 0.2, 0.3, 0.4), p uniform, d log q(x)/d theta_j = [x = j] − q_j. By hand:

    k1: E_q[∇ log q] = sum_x q_x (e_x − q) = q − q = 0: a k1 loss term trains nothing.
    k2: E_q[u ∇log q]_j = q_j (u_j − KL(q‖p)), u = log(q/p) = (−0.916291, −0.223144, 0.182322,
        0.470004), KL(q‖p) = 0.106440 → (−0.102273, −0.065917, 0.022764, 0.145425) = ∇ KL(q‖p).
    k3: E_q[(1 − p/q) ∇log q]_j = sum_x (q_x − p_x)([x = j] − q_j) = q_j − p_j
        → (−0.15, −0.05, 0.05, 0.15) = ∇ KL(p‖q) = −sum_x p_x ([x = j] − q_j); NOT ∇ KL(q‖p).
    """
    torch.testing.assert_close(_expected_pathwise_gradient("k1"), torch.zeros(4, dtype=torch.float64), **EXACT)

    k2 = _expected_pathwise_gradient("k2")
    torch.testing.assert_close(k2, _exact_kl_gradient("reverse"), **EXACT)
    torch.testing.assert_close(k2, t([-0.102273, -0.065917, 0.022764, 0.145425]), atol=5e-7, rtol=0)  # 6 digits

    k3 = _expected_pathwise_gradient("k3")
    torch.testing.assert_close(k3, _exact_kl_gradient("forward"), **EXACT)
    torch.testing.assert_close(k3, t([-0.15, -0.05, 0.05, 0.15]), **EXACT)
    assert (k3 - _exact_kl_gradient("reverse")).abs().max() > 0.01  # k3's gradient is the other KL's


def test_pitfall_26_only_k2_and_k3_may_be_a_loss_term():
    from posttrain.losses.kl import LOSS_KL_ESTIMATORS

    assert set(LOSS_KL_ESTIMATORS) == {"k2", "k3"} and set(LOSS_KL_ESTIMATORS) < set(KL_ESTIMATORS)
