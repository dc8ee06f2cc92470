"""The prompt of an implicit-prompt preference pair: the longest shared leading messages of chosen
and rejected (or, for strings, their shared leading text cut at whitespace). Used by validation
and by preference data, so it imports neither."""

from __future__ import annotations

from posttrain.data.formats import normalize_sharegpt


class PromptSplitError(ValueError):
    """Why chosen/rejected could not be split into a shared prompt and completions.

    ``field`` and ``problem`` are what validation reports as ``file:row: field: problem``.
    """

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")


def extract_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Implicit prompt: ``(prompt, chosen_completion, rejected_completion)``.

    The prompt is the longest shared leading run of messages (ShareGPT messages normalised),
    shortened so that it does not end with an assistant or tool message; the rest of each
    conversation is its completion, which must be assistant turns (an assistant message first
    and last; tool results may sit between). Raises PromptSplitError (a ValueError) when
    nothing is shared or a completion is not assistant turns.
    """
    chosen = [normalize_sharegpt(m) for m in chosen]
    rejected = [normalize_sharegpt(m) for m in rejected]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # The completions start with an assistant turn: give shared assistant/tool messages at the
    # end of the common run back to both completions.
    while n > 0 and chosen[n - 1].get("role") in ("assistant", "tool"):
        n -= 1
    if n == 0:
        raise PromptSplitError(
            "prompt",
            "chosen and rejected share no leading prompt messages (give a 'prompt' field, or start "
            "both conversations with the same messages)",
        )
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        rest = conv[n:]
        for j, m in enumerate(rest):
            role = m.get("role")
            first_or_last = j == 0 or j == len(rest) - 1
            if role != "assistant" and (first_or_last or role != "tool"):
                raise PromptSplitError(
                    f"{key}[{n + j}]",
                    f"after the shared prompt only assistant turns may follow, found {role!r}",
                )
    return chosen[:n], chosen[n:], rejected[n:]


def extract_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Implicit prompt for strings: the shared leading text, cut back to its last whitespace so
    each completion starts at a word (``"Q: 2+2? A: 4"`` / ``"... A: 5"`` -> prompt
    ``"Q: 2+2? A:"``, completions ``" 4"`` / ``" 5"``). PromptSplitError when none is shared."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    while n > 0 and chosen[n - 1].isspace():  # the whitespace starts the completions
        n -= 1
    if n == 0 or n >= min(len(chosen), len(rejected)):
        raise PromptSplitError(
            "prompt",
            "chosen and rejected share no leading prompt text (give a 'prompt' field, or start "
            "both with the same prompt)",
        )
    return chosen[:n], chosen[n:], rejected[n:]


def split_pair(row: dict) -> tuple[object, object, object, bool]:
    """``(prompt, chosen, rejected, conversational)`` of a validated preference row."""
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    conversational = isinstance(chosen, list)
    if conversational:
        chosen = [normalize_sharegpt(m) for m in chosen]
        rejected = [normalize_sharegpt(m) for m in rejected]
        if prompt is None:
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
        else:
            prompt = [normalize_sharegpt(m) for m in prompt]
    elif prompt is None:
        prompt, chosen, rejected = extract_text_prompt(chosen, rejected)
    return prompt, chosen, rejected, conversational


# ---------------------------------------------------------------------------- warnings
