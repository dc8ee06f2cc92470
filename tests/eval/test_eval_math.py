"""Win rate and KL-to-baseline formulas, checked on numbers worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.eval.kl_to_baseline import completion_logps, sequence_kl
from posttrain.eval.win_rate import (
    JudgeError,
    debiased_judge_preference,
    judge_preferences,
    win_rate_from_scores,
)
from tests.conftest import make_tiny_llama
from tests.eval import scorers


def test_win_rate_counts_ties_half():
    """Pairs (1 vs 0) win, (2 vs 2) tie, (3 vs 5) loss, (0 vs -1) win: (1 + 0.5 + 0 + 1) / 4 = 0.625."""
    a = torch.tensor([1.0, 2.0, 3.0, 0.0])
    b = torch.tensor([0.0, 2.0, 5.0, -1.0])
    assert win_rate_from_scores(a, b).item() == 0.625
    assert win_rate_from_scores(a, a).item() == 0.5
    assert win_rate_from_scores(b, a).item() == 1 - 0.625


def test_win_rate_rejects_mismatched_or_empty_scores():
    with pytest.raises(ValueError, match="must be equal"):
        win_rate_from_scores(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="no pairs"):
        win_rate_from_scores(torch.zeros(0), torch.zeros(0))


def test_judge_asked_both_ways_cancels_position_bias():
    """p_ab = 0.9, p_ba = 0.3: 1/2 + 1/2 (0.9 - 0.3) = 0.8. A judge that always says 0.7 (prefers
    whatever is shown first) gives 1/2 + 1/2 (0.7 - 0.7) = 0.5: no preference, as it should."""
    out = debiased_judge_preference(torch.tensor([0.9, 0.7], dtype=torch.float64),
                                    torch.tensor([0.3, 0.7], dtype=torch.float64))
    assert out.tolist() == pytest.approx([0.8, 0.5], abs=1e-12)
    assert out[1].item() == 0.5


def test_judge_preferences_against_itself_is_exactly_half_and_bad_values_name_the_pair():
    prompts, texts = ["p1", "p2", "p3"], ["short", "a longer one", "mid size"]
    assert judge_preferences(scorers.first_shown_bias_longer, prompts, texts, texts).tolist() == [0.5] * 3
    # "a longer one" vs "short": the judge says 1.0 shown first, 0.5 shown second -> 0.75
    prefs = judge_preferences(scorers.first_shown_bias_longer, ["p"], ["a longer one"], ["short"])
    assert prefs.tolist() == [0.75]
    with pytest.raises(JudgeError, match=r"out_of_range_judge.*1\.5 for pair 0"):
        judge_preferences(scorers.out_of_range_judge, prompts, texts, texts)


def test_sequence_kl_by_hand():
    """Tokens 1, 2 real, token 3 padding. log pA = (-1, -2), log pB = (-1.5, -1):
    k1 = (-1 + 1.5) + (-2 + 1) = -0.5;
    log r = log pB - log pA = (-0.5, 1): k3 = (e^-0.5 - 1 + 0.5) + (e^1 - 1 - 1) = 0.106531 + 0.718282 = 0.824812.
    The padded position holds -inf and must not leak in."""
    a = torch.tensor([[-1.0, -2.0, float("-inf")]])
    b = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    k1, k3 = sequence_kl(a, b, mask)
    assert k1.item() == pytest.approx(-0.5)
    assert k3.item() == pytest.approx(math.exp(-0.5) - 0.5 + math.e - 2, rel=1e-6)
    k1, k3 = sequence_kl(a, a.clone(), mask)
    assert k1.item() == 0.0 and k3.item() == 0.0


def test_completion_logps_match_a_full_forward_and_ignore_batching():
    """Each completion token's log-prob equals log_softmax of a plain forward on prompt + completion,
    whatever the batch it is scored in."""
    model = make_tiny_llama(hidden_size=16)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    completions = [[20, 21], [22, 23, 24], [25]]
    logps, mask = completion_logps(model, prompts, completions, pad_token_id=2, batch_size=2)
    one_by_one, _ = completion_logps(model, prompts, completions, pad_token_id=2, batch_size=1)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    torch.testing.assert_close(logps, one_by_one, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompts[1] + completions[1]])).logits.float(), -1)[0]
    expected = [full[1 + t, tok].item() for t, tok in enumerate(completions[1])]
    assert logps[1].tolist() == pytest.approx(expected, abs=1e-5)
