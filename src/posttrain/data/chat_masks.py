"""Token ids and training masks, derived by rendering and diffing token ids.

Convention (everyone relies on it): ``completion_mask[t] == 1`` means token ``t`` is a training
target, i.e. the loss uses the logits at ``t - 1`` to predict ``input_ids[t]``. Position 0 is
never a target (nothing predicts it), so ``completion_mask[0] == 0`` always.

Masks never come from pad ids or from matching template strings: an assistant turn's span is
what ``messages[:i+1]`` adds to ``messages[:i]`` rendered with the generation prompt, which works
for any chat template without ``{% generation %}`` tags. The span runs through the end-of-turn
token; whitespace the template prints *after* it (ChatML's ``"\\n"`` after ``<|im_end|>``) is not
trained, since the model stops generating at the end-of-turn token.
"""

from __future__ import annotations


def _as_ids(out) -> list[int]:
    """apply_chat_template's return value (list, nested list or BatchEncoding) -> flat ids."""
    if hasattr(out, "keys"):
        out = out["input_ids"]
    out = list(out)
    if out and isinstance(out[0], list):
        out = out[0]
    return out


def dedupe_bos(ids: list[int], tokenizer) -> list[int]:
    """Drop a duplicated BOS at position 0 only (pitfall 4).

    Later occurrences of the BOS id are legitimate in templates like ChatML, whose BOS is
    ``<|im_start|>`` and starts every turn.
    """
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        return ids[1:]
    return ids


def render_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> list[int]:
    """The chat template's token ids for ``messages`` (BOS deduplicated)."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return dedupe_bos(_as_ids(out), tokenizer)


def render_text(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _is_prefix(a: list[int], b: list[int]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def _strip_trailing_blank(ids: list[int], tokenizer, start: int, end: int) -> int:
    """End of ``ids[start:end]`` without trailing whitespace-only tokens (the template's
    separator after the end-of-turn token)."""
    while end > start and not tokenizer.decode([ids[end - 1]]).strip():
        end -= 1
    return end


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _adds_bos(tokenizer) -> bool:
    """Whether tokenizer(text) (add_special_tokens=True) prepends the BOS token."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos and _encode(tokenizer, "a")[:1] != [bos]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set tokenizer.eos_token so completions can end")
    return tokenizer.eos_token_id


# ---------------------------------------------------------------------------- conversations


def _locate_in_text(messages: list[dict], i: int, tokenizer, full: list[int], cursor: int):
    """Fallback when prefix renderings do not extend each other (the template rewrites history,
    e.g. strips reasoning from earlier turns): find assistant turn ``i``'s content in the full
    rendered text, at or after token ``cursor``, and map its characters (plus the end-of-turn
    marker) to token positions. Returns (token_start, token_end).
    """
    content = messages[i].get("content")
    where = f"assistant message {i}"
    if not isinstance(content, str) or not content.strip():
        raise ValueError(
            f"cannot locate {where} in the chat template's rendering (it has no text content and "
            "the template does not render conversations prefix by prefix)"
        )
    text = render_text(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = dedupe_bos(list(enc["input_ids"]), tokenizer)
    offsets = enc["offset_mapping"][len(enc["input_ids"]) - len(ids) :]
    if ids != full:
        raise ValueError(
            f"cannot locate {where}: re-tokenising the rendered text does not give the template's ids"
        )
    # The end-of-turn marker: what the template prints right after this turn's content.
    upto = render_text(tokenizer, messages[: i + 1])
    for cand in dict.fromkeys([content, content.split("</think>")[-1].strip()]):
        tail = upto[upto.rfind(cand) + len(cand) :].rstrip() if cand and cand in upto else ""
        pos = text.find(cand) if cand else -1
        while pos >= 0:
            c_end = pos + len(cand)
            if tail and text.startswith(tail, c_end):
                c_end += len(tail)
            tokens = [t for t, (a, b) in enumerate(offsets) if b > pos and a < c_end]
            if tokens and tokens[0] >= cursor:
                return tokens[0], tokens[-1] + 1
            pos = text.find(cand, pos + 1)
    raise ValueError(
        f"cannot locate {where} in the chat template's rendering: the template changes its text "
        "(and does not render conversations prefix by prefix); check the template or use a "
        "prompt-completion dataset"
    )


def tokenize_messages(
    messages: list[dict], tokenizer, *, assistant_only_loss: bool
) -> tuple[list[int], list[int]]:
    """Render a conversation with the chat template.

    Returns ``(input_ids, completion_mask)``, both length T.
    assistant_only_loss=True: mask 1 on each assistant turn's tokens after the generation prompt
    through its end-of-turn token. False (TRL semantics): every token is trained, except
    position 0 and the whitespace after the final end-of-turn token.
    """
    full = render_ids(tokenizer, messages)
    n = len(full)
    if not assistant_only_loss:
        end = _strip_trailing_blank(full, tokenizer, 1, n)
        return full, [0] + [1] * (end - 1) + [0] * (n - end) if n else []
    mask = [0] * n
    cursor = 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        span = None
        upto = full if i == len(messages) - 1 else render_ids(tokenizer, messages[: i + 1])
        if i > 0 and _is_prefix(upto, full):
            prompt = render_ids(tokenizer, messages[:i], add_generation_prompt=True)
            if _is_prefix(prompt, upto) and len(prompt) >= cursor:
                end = _strip_trailing_blank(upto, tokenizer, len(prompt), len(upto))
                if end > len(prompt):
                    span = (len(prompt), end)
        if span is None:
            span = _locate_in_text(messages, i, tokenizer, full, cursor)
        mask[span[0] : span[1]] = [1] * (span[1] - span[0])
        cursor = span[1]
    if mask:
        mask[0] = 0
    return full, mask


# ---------------------------------------------------------------------------- prompt-completion


def tokenize_prompt_completion(
    prompt, completion, tokenizer, *, conversational: bool, completion_only_loss: bool
) -> tuple[list[int], list[int]]:
    """Prompt and completion tokenised SEPARATELY and concatenated as ids (pitfall 3).

    Returns ``(input_ids, completion_mask)``; ``input_ids[:P]`` are exactly the prompt's ids.
    Conversational (message lists): prompt = template with the generation prompt, completion =
    what the full rendering adds after it. Standard (strings): the prompt as the tokenizer encodes
    it (with its BOS if it adds one), the completion without special tokens plus EOS, which is
    trained (pitfall 1). completion_only_loss=False also trains the prompt (except position 0).
    """
    if conversational:
        prompt_ids = render_ids(tokenizer, prompt, add_generation_prompt=True)
        full = render_ids(tokenizer, list(prompt) + list(completion))
        if _is_prefix(prompt_ids, full):
            completion_ids = full[len(prompt_ids) :]
        else:
            p_text = render_text(tokenizer, prompt, add_generation_prompt=True)
            f_text = render_text(tokenizer, list(prompt) + list(completion))
            if not f_text.startswith(p_text):
                raise ValueError(
                    "the chat template renders the prompt differently when a completion follows; "
                    "cannot split prompt and completion"
                )
            completion_ids = _encode(tokenizer, f_text[len(p_text) :])
        trained = _strip_trailing_blank(completion_ids, tokenizer, 0, len(completion_ids))
    else:
        prompt_ids = _encode(tokenizer, prompt)
        if _adds_bos(tokenizer):
            prompt_ids = dedupe_bos([tokenizer.bos_token_id] + prompt_ids, tokenizer)
        completion_ids = _encode(tokenizer, completion)
        eos = _eos_id(tokenizer)
        if not completion_ids or completion_ids[-1] != eos:
            completion_ids.append(eos)
        trained = len(completion_ids)
    p, c = len(prompt_ids), len(completion_ids)
    mask = [0 if completion_only_loss else 1] * p + [1] * trained + [0] * (c - trained)
    if mask:
        mask[0] = 0
    return prompt_ids + completion_ids, mask


def tokenize_text(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """Language modelling: ids (BOS if the tokenizer adds one, never two) + EOS; all trained
    except position 0."""
    ids = _encode(tokenizer, text)
    if _adds_bos(tokenizer):
        ids = dedupe_bos([tokenizer.bos_token_id] + ids, tokenizer)
    eos = _eos_id(tokenizer)
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids, [0] + [1] * (len(ids) - 1)


def visible(token_text: str) -> str:
    """Token text with whitespace made visible, for mask previews."""
    return token_text.replace("\n", "↵\n").replace("\t", "→")
