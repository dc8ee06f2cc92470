"""Pitfall 4: never two BOS tokens at the start, when both the template/text and the tokenizer
would add one; later BOS ids (ChatML's <|im_start|> starts every turn) are untouched."""

from __future__ import annotations

import copy

import pytest

from posttrain.data.chat_masks import dedupe_bos, tokenize_messages, tokenize_prompt_completion, tokenize_text
from tests.data.helpers import CONVERSATION


@pytest.fixture()
def bos_adding_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_bos_token = True  # like Llama: tokenizer(text) prepends BOS
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    return tok


def _leading_bos(ids, bos):
    n = 0
    while n < len(ids) and ids[n] == bos:
        n += 1
    return n


def test_pre_rendered_text_starting_with_bos(bos_adding_tokenizer):
    tok = bos_adding_tokenizer
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)  # starts with the BOS string
    ids, mask = tokenize_text(text, tok)
    assert _leading_bos(ids, tok.bos_token_id) == 1
    # Every turn start is kept: the template's <|im_start|> count is unchanged.
    assert ids.count(tok.bos_token_id) == text.count(tok.bos_token)
    assert len(mask) == len(ids)


def test_plain_text_gets_exactly_one_bos(bos_adding_tokenizer):
    ids, _ = tokenize_text("plain text", bos_adding_tokenizer)
    assert _leading_bos(ids, bos_adding_tokenizer.bos_token_id) == 1


def test_prompt_completion_single_bos(bos_adding_tokenizer):
    tok = bos_adding_tokenizer
    ids, _ = tokenize_prompt_completion(
        tok.bos_token + "Q: hi", " A", tok, conversational=False, completion_only_loss=True
    )
    assert _leading_bos(ids, tok.bos_token_id) == 1


def test_template_emitting_bos_with_bos_adding_tokenizer(bos_adding_tokenizer):
    tok = bos_adding_tokenizer
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    for aol in (True, False):
        ids, _ = tokenize_messages(CONVERSATION, tok, assistant_only_loss=aol)
        assert _leading_bos(ids, tok.bos_token_id) == 1
    ids, _ = tokenize_prompt_completion(
        CONVERSATION[:1], CONVERSATION[1:2], tok, conversational=True, completion_only_loss=True
    )
    assert _leading_bos(ids, tok.bos_token_id) == 1


def test_real_template_has_one_leading_bos(tokenizer):
    ids, _ = tokenize_messages(CONVERSATION, tokenizer, assistant_only_loss=True)
    assert _leading_bos(ids, tokenizer.bos_token_id) == 1


def test_dedupe_only_at_position_zero(tokenizer):
    bos = tokenizer.bos_token_id
    assert dedupe_bos([bos, bos, 5, bos, bos], tokenizer) == [bos, 5, bos, bos]
    assert dedupe_bos([5, bos, bos], tokenizer) == [5, bos, bos]
