"""Masked reductions and aggregation modes against numbers worked by hand (pitfalls 12, 14)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from posttrain.losses import aggregate_token_loss, get_loss, masked_mean, masked_sum, sft_nll_loss

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean_by_hand():
    """sum = 1 + 2 + 4 = 7; mean = 7 / 3; row means = [(1+2)/2, 4/1] = [1.5, 4]."""
    assert masked_sum(LOSS, MASK).item() == 7.0
    assert masked_mean(LOSS, MASK).item() == pytest.approx(7 / 3)
    assert masked_mean(LOSS, MASK, dim=-1).tolist() == [1.5, 4.0]


def test_masked_mean_empty_row_is_zero_not_nan():
    """Row 2 has no supervised token: its mean is 0 (count clamped to 1), not 0/0."""
    out = masked_mean(LOSS, torch.tensor([[1, 0, 0], [0, 0, 0]]), dim=-1)
    assert out.tolist() == [1.0, 0.0]


def test_token_mean_by_hand():
    """(1 + 2 + 4) / 3 tokens = 7/3; with the step's normaliser 10: 7/10."""
    assert aggregate_token_loss(LOSS, MASK, mode="token_mean").item() == pytest.approx(7 / 3)
    assert aggregate_token_loss(LOSS, MASK, mode="token_mean", normalizer=10).item() == pytest.approx(0.7)


def test_sequence_mean_by_hand():
    """Row means 1.5 and 4; (1.5 + 4) / 2 sequences = 2.75; over 5 sequences in the step: 1.1."""
    assert aggregate_token_loss(LOSS, MASK, mode="sequence_mean").item() == pytest.approx(2.75)
    assert aggregate_token_loss(LOSS, MASK, mode="sequence_mean", normalizer=5).item() == pytest.approx(1.1)


def test_sum_by_hand():
    """Dr.GRPO style: 7 / 1 by default; 7 / (2 sequences * 3 max tokens) = 7/6."""
    assert aggregate_token_loss(LOSS, MASK, mode="sum").item() == pytest.approx(7.0)
    assert aggregate_token_loss(LOSS, MASK, mode="sum", normalizer=6.0).item() == pytest.approx(7 / 6)


def test_tensor_normalizer_and_unknown_mode():
    out = aggregate_token_loss(LOSS, MASK, mode="token_mean", normalizer=torch.tensor(7))
    assert out.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate_token_loss(LOSS, MASK, mode="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ"):
        aggregate_token_loss(LOSS, MASK[:, :2])


def test_nan_in_masked_position_does_not_leak():
    """A NaN/inf in a padded position (e.g. a log-ratio over padding) must not reach loss or grad."""
    x = LOSS.clone()
    x[0, 2] = float("nan")
    x[1, 1] = float("inf")
    x.requires_grad_(True)
    for mode in ("token_mean", "sequence_mean", "sum"):
        out = aggregate_token_loss(x, MASK, mode=mode)
        (g,) = torch.autograd.grad(out, x)
        assert math.isfinite(out.item()) and torch.isfinite(g).all()
        assert (g[MASK == 0] == 0).all()


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "sum"])
def test_pitfall_14_microbatch_split_invariance(mode):
    """Splitting a batch of 6 into micro-batches of 4 and 2 (uneven, rows of different lengths),
    each reduced with the GLOBAL step normaliser, gives the same summed loss and gradient as
    the whole batch at once."""
    torch.manual_seed(0)
    b, t = 6, 5
    theta = torch.randn(t, requires_grad=True)
    x = torch.randn(b, t)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate([5, 1, 3, 2, 4, 5]):
        mask[i, :n] = 1
    normalizer = {"token_mean": mask.sum(), "sequence_mean": b, "sum": 7.0}[mode]

    def per_token(rows):
        return (x[rows] * theta) ** 2

    whole = aggregate_token_loss(per_token(slice(0, 6)), mask, mode=mode, normalizer=normalizer)
    (g_whole,) = torch.autograd.grad(whole, theta)
    parts = [
        aggregate_token_loss(per_token(s), mask[s], mode=mode, normalizer=normalizer)
        for s in (slice(0, 4), slice(4, 6))
    ]
    split = parts[0] + parts[1]
    (g_split,) = torch.autograd.grad(split, theta)
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(g_split, g_whole)
    if mode != "sum":
        # the per-batch default normaliser is NOT invariant: the reason the caller passes it
        local = sum(
            aggregate_token_loss(per_token(s), mask[s], mode=mode) for s in (slice(0, 4), slice(4, 6))
        )
        assert not torch.allclose(local, whole)


def test_registry_and_clear_error():
    assert get_loss("sft") is sft_nll_loss
    with pytest.raises(ValueError, match="valid losses: .*sft"):
        get_loss("stf")


def test_losses_import_needs_only_torch():
    """`import posttrain.losses` must not pull transformers, peft, accelerate, datasets."""
    code = (
        "import sys, posttrain.losses; "
        "bad = [m for m in ('transformers', 'peft', 'accelerate', 'datasets') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
