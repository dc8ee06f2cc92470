"""SFT negative log-likelihood and token accuracy against numbers worked by hand."""

from __future__ import annotations

import pytest
import torch

from posttrain.losses import sft_nll_loss, token_accuracy

LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -4.0, -5.0]])
MASK = torch.tensor([[1, 1, 0], [0, 1, 1]])


def test_sft_nll_by_hand():
    """Supervised log-probs: -1, -2, -4, -5 -> NLL sum 12 over 4 tokens = 3.0;
    with the step's normaliser 6 (other micro-batches hold 2 more tokens): 12/6 = 2.0."""
    assert sft_nll_loss(LOGPS, MASK).item() == pytest.approx(3.0)
    assert sft_nll_loss(LOGPS, MASK, normalizer=6).item() == pytest.approx(2.0)
    assert sft_nll_loss(LOGPS, MASK, normalizer=torch.tensor(6.0)).item() == pytest.approx(2.0)


def test_sft_gradient_by_hand():
    """dL/dlogp = -m / N: -1/4 on the 4 supervised tokens, 0 elsewhere."""
    x = LOGPS.clone().requires_grad_(True)
    sft_nll_loss(x, MASK).backward()
    torch.testing.assert_close(x.grad, -MASK.float() / 4)


def test_pitfall_08_sft_loss_invariant_to_accumulation_split():
    """Batch of 2 at once == two micro-batches of 1 with the global token count (4)."""
    whole = sft_nll_loss(LOGPS, MASK, normalizer=4)
    split = sft_nll_loss(LOGPS[:1], MASK[:1], normalizer=4) + sft_nll_loss(LOGPS[1:], MASK[1:], normalizer=4)
    torch.testing.assert_close(split, whole)


def test_token_accuracy_by_hand():
    """Supervised positions: (0,0) T, (0,1) F, (1,1) T, (1,2) F -> 2/4 = 0.5; (0,2), (1,0) ignored."""
    correct = torch.tensor([[True, False, True], [True, True, False]])
    assert token_accuracy(correct, MASK).item() == pytest.approx(0.5)
    assert token_accuracy(correct, torch.zeros_like(MASK)).item() == 0.0
