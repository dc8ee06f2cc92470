"""An exact, lexicon-based sentiment score for the ppo_sentiment example: a reward function
(`--reward_funcs sentiment.py:positivity`) and the yardstick its eval stage reports, independent
of the reward model the policy is trained against.

positivity = (positive words - negative words) / max(1, positive words + negative words), in [-1, 1].
"""

from __future__ import annotations

import re

# The words the training pairs use, plus common ones they do not (so the score is not just "the
# training words came back").
POSITIVE_WORDS = ["wonderful", "delightful", "excellent", "lovely", "fantastic", "brilliant", "charming",
                  "superb"]
NEGATIVE_WORDS = ["disappointing", "dreadful", "awful", "terrible", "dull", "miserable", "shabby", "annoying"]
_EXTRA_POSITIVE = ["great", "good", "nice", "enjoyed", "happy", "love", "loved", "amazing", "pleasant",
                   "worth it", "made my day", "happily"]
_EXTRA_NEGATIVE = ["bad", "poor", "hate", "hated", "boring", "not worth", "ruined", "would not", "never",
                   "worst", "sad"]
_POS = [re.compile(rf"\b{re.escape(w)}\b") for w in POSITIVE_WORDS + _EXTRA_POSITIVE]
_NEG = [re.compile(rf"\b{re.escape(w)}\b") for w in NEGATIVE_WORDS + _EXTRA_NEGATIVE]


def score_text(text: str) -> float:
    low = text.lower()
    pos = sum(len(p.findall(low)) for p in _POS)
    neg = sum(len(p.findall(low)) for p in _NEG)
    return (pos - neg) / max(1, pos + neg)


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def positivity(prompts, completions, **columns) -> list[float]:
    """Reward function (TRL convention): one score in [-1, 1] per completion."""
    return [score_text(_text(c)) for c in completions]
