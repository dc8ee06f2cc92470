"""Pitfall 2: assistant masks derived by prefix rendering + token diffing are exact for every
template family — the supervised tokens decode to each assistant content plus end-of-turn."""

from __future__ import annotations

import copy

import pytest

from posttrain.data.chat_masks import tokenize_messages
from tests.data.helpers import CONVERSATION, supervised_spans

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama-3.1 style: a default system prompt is injected when the conversation has none.
LLAMA3_DEFAULT_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma: 'model' role, system folded into the first user turn.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Mistral v1: no generation prompt; the assistant turn follows [/INST] after a space, ends with eos.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

FAMILIES = {
    # name: (template or None for the real ChatML one, extra special tokens, (before, after) content)
    "chatml_default_system": (None, [], ("", "<|im_end|>")),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], ("", "<|eot_id|>")),
    "llama3_default_system": (
        LLAMA3_DEFAULT_SYSTEM,
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        ("", "<|eot_id|>"),
    ),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], ("", "<end_of_turn>")),
    "mistral": (MISTRAL, ["[INST]", "[/INST]"], (" ", "<|im_end|>")),
}


def family_tokenizer(tokenizer, name):
    template, specials, _ = FAMILIES[name]
    tok = copy.deepcopy(tokenizer)
    if template is not None:
        tok.chat_template = template
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def assistant_contents(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("with_system", [False, True])
def test_supervised_tokens_are_exactly_assistant_turns(tokenizer, family, with_system):
    tok = family_tokenizer(tokenizer, family)
    before, after = FAMILIES[family][2]
    messages = list(CONVERSATION)
    if with_system:
        messages = [{"role": "system", "content": "You are terse."}] + messages
    ids, mask = tokenize_messages(messages, tok, assistant_only_loss=True)
    assert len(ids) == len(mask)
    spans = supervised_spans(ids, mask)
    decoded = [tok.decode(s) for s in spans]
    assert decoded == [before + c + after for c in assistant_contents(messages)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_assistant_only_mask_is_subset_of_full_mask(tokenizer, family):
    tok = family_tokenizer(tokenizer, family)
    ids_a, mask_a = tokenize_messages(CONVERSATION, tok, assistant_only_loss=True)
    ids_f, mask_f = tokenize_messages(CONVERSATION, tok, assistant_only_loss=False)
    assert ids_a == ids_f
    assert all(f >= a for a, f in zip(mask_a, mask_f))
    # Without assistant_only_loss everything is trained except position 0 and the whitespace
    # the template prints after the final end-of-turn token.
    last = max(t for t, m in enumerate(mask_f) if m)
    assert mask_f == [0] + [1] * last + [0] * (len(ids_f) - 1 - last)
    assert tok.decode(ids_f[last + 1 :]).strip() == ""


# A template that rewrites history (Qwen3-like): reasoning is stripped from earlier assistant
# turns, so prefix renderings are not prefixes of the full one; the fallback locates the spans.
THINK_STRIPPING = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_history_rewriting_template_falls_back_to_locating_spans(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = THINK_STRIPPING
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>greet back</think>Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "<think>say bye</think>Goodbye!"},
    ]
    ids, mask = tokenize_messages(messages, tok, assistant_only_loss=True)
    decoded = [tok.decode(s) for s in supervised_spans(ids, mask)]
    assert decoded == ["Hello!<|im_end|>", "<think>say bye</think>Goodbye!<|im_end|>"]


def test_identical_assistant_turns_each_get_their_own_span(tokenizer):
    messages = [
        {"role": "user", "content": "Say ok"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "ok"},
    ]
    ids, mask = tokenize_messages(messages, tokenizer, assistant_only_loss=True)
    assert [tokenizer.decode(s) for s in supervised_spans(ids, mask)] == ["ok<|im_end|>", "ok<|im_end|>"]
