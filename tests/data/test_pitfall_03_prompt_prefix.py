"""Pitfall 3: prompt and completion are tokenised separately, so the prompt's ids are always a
prefix of the example's ids, even when the text join would merge BPE tokens."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.data.chat_masks import tokenize_prompt_completion

TEXT = st.text(
    alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyz ABC.,!?'\n\t0123456789éü中")),
    min_size=1,
    max_size=30,
)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _prompt_ids(tokenizer, prompt):
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def test_merging_join_stays_split(tokenizer):
    """'hel' + 'lo' would tokenise as 'hello' if joined as text."""
    whole = tokenizer("hello", add_special_tokens=False)["input_ids"]
    ids, mask = tokenize_prompt_completion(
        "hel", "lo", tokenizer, conversational=False, completion_only_loss=True
    )
    p = _prompt_ids(tokenizer, "hel")
    assert ids[: len(p)] == p
    assert ids[: len(whole)] != whole
    assert ids[-1] == tokenizer.eos_token_id
    assert mask == [0] * len(p) + [1] * (len(ids) - len(p))


@SETTINGS
@given(prompt=TEXT, completion=TEXT)
def test_prompt_ids_prefix_of_full_standard(tokenizer, prompt, completion):
    for completion_only_loss in (True, False):
        ids, mask = tokenize_prompt_completion(
            prompt, completion, tokenizer, conversational=False, completion_only_loss=completion_only_loss
        )
        p = _prompt_ids(tokenizer, prompt)
        assert ids[: len(p)] == p
        assert len(mask) == len(ids)
        assert mask[len(p) :] == [1] * (len(ids) - len(p))  # completion + EOS all trained
        assert mask[0] == 0


@SETTINGS
@given(prompt=TEXT, completion=TEXT)
def test_prompt_ids_prefix_of_full_conversational(tokenizer, prompt, completion):
    p_msgs = [{"role": "user", "content": prompt}]
    c_msgs = [{"role": "assistant", "content": completion}]
    ids, mask = tokenize_prompt_completion(
        p_msgs, c_msgs, tokenizer, conversational=True, completion_only_loss=True
    )
    p = tokenizer.apply_chat_template(p_msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[: len(p)] == p
    assert not any(mask[: len(p)])
    last = max(t for t, m in enumerate(mask) if m)
    assert ids[last] == tokenizer.eos_token_id
