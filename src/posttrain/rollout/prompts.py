"""Prompts for the online methods: validated rows -> prompt token ids (+ the row's other columns).

A prompt is tokenised exactly as the offline methods tokenise the prompt part of a pair
(:mod:`posttrain.data.chat_masks`), so the policy sees the same ids in SFT, DPO and RL:
conversational prompts through the chat template with the generation prompt, string prompts as
the tokenizer encodes them (one BOS if it adds one). A conversation whose last message is the
assistant's is continued (``continue_final_message``), TRL's convention for pre-filled replies.

Every row keeps its number, so problems are reported as ``file:row: field: problem`` before any
compute is spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.data.chat_masks import _adds_bos, _as_ids, _encode, dedupe_bos, render_ids
from posttrain.data.formats import DataFormat
from posttrain.data.loading import LoadedRows
from posttrain.data.validation import DataValidationError, RowError, validate_rows

TRUNCATION_MODES = ("keep_end", "keep_start")
# Columns that are not passed to reward functions: the prompt itself (passed as `prompts`) and a
# dataset completion (the generated one is passed as `completions`), as TRL does.
NOT_COLUMNS = ("prompt", "completion")


@dataclass
class PromptExample:
    """One prompt, ready to generate from.

    prompt_ids: the ids generation starts from (after truncation).
    prompt: the row's prompt as written (a string or a list of messages), for reward functions.
    columns: the row's other fields (e.g. ``answer``), passed to reward functions.
    row: the row number errors cite. truncated: whether max_prompt_length cut the prompt.
    """

    prompt_ids: list[int]
    prompt: Any
    columns: dict[str, Any] = field(default_factory=dict)
    row: int = 0
    truncated: bool = False

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def row_prompt(row: dict, fmt: DataFormat):
    """The prompt of a validated row of any prompt-bearing format (a preference pair without an
    explicit prompt gives the shared prefix of chosen and rejected)."""
    if fmt == DataFormat.PREFERENCE and row.get("prompt") is None:
        from posttrain.data.preference import split_pair

        return split_pair(row)[0]
    return row["prompt"]


def tokenize_prompt(prompt, tokenizer) -> list[int]:
    """Prompt ids as the offline methods produce them for the prompt part of a pair."""
    if isinstance(prompt, list):
        if prompt and prompt[-1].get("role") == "assistant":
            out = tokenizer.apply_chat_template(
                prompt, tokenize=True, continue_final_message=True, return_dict=False
            )
            return dedupe_bos(_as_ids(out), tokenizer)
        return render_ids(tokenizer, prompt, add_generation_prompt=True)
    ids = _encode(tokenizer, prompt)
    if _adds_bos(tokenizer):
        ids = dedupe_bos([tokenizer.bos_token_id] + ids, tokenizer)
    return ids


def prepare_prompts(
    loaded: LoadedRows,
    fmt: DataFormat,
    tokenizer,
    *,
    max_prompt_length: int | None,
    truncation_mode: str = "keep_end",
) -> list[PromptExample]:
    """Validate every row (all problems reported at once, row-numbered), then tokenise.

    Accepts prompt-only rows and any format with a prompt (prompt-completion, preference,
    unpaired preference); extra columns (``answer``, ...) are kept in ``columns``.
    ``max_prompt_length`` (tokens): longer prompts keep their end (``keep_end``, the default: the
    generation prompt stays) or their start (``keep_start``).
    Raises DataValidationError.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(
            f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {truncation_mode!r}"
        )
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    fmt = DataFormat(fmt)
    errors = validate_rows(loaded, fmt, kind="prompt")
    if errors:
        raise DataValidationError(errors)

    examples: list[PromptExample] = []
    late: list[RowError] = []
    for i, row in enumerate(loaded.rows):
        number = loaded.row_numbers[i]
        prompt = row_prompt(row, fmt)
        try:
            ids = tokenize_prompt(prompt, tokenizer)
        except Exception as e:  # a template that rejects this conversation
            late.append(RowError(loaded.source_of(i), number, "prompt", f"cannot render the prompt: {e}"))
            continue
        if not ids:
            late.append(RowError(loaded.source_of(i), number, "prompt", "tokenises to no tokens"))
            continue
        truncated = max_prompt_length is not None and len(ids) > max_prompt_length
        if truncated:
            ids = ids[-max_prompt_length:] if truncation_mode == "keep_end" else ids[:max_prompt_length]
        columns = {k: v for k, v in row.items() if k not in NOT_COLUMNS}
        examples.append(
            PromptExample(prompt_ids=ids, prompt=prompt, columns=columns, row=number, truncated=truncated)
        )
    if late:
        raise DataValidationError(late)
    return examples


def load_prompts(config, dataset, tokenizer, log) -> list[PromptExample]:
    """An online method's prompts: `dataset` (rows or a datasets.Dataset) or ``config.dataset_name``,
    format detected and logged, every row validated, tokenised (``config.max_prompt_length``,
    ``config.truncation_mode``)."""
    from posttrain.data.formats import describe_format, detect_format
    from posttrain.data.in_memory import as_loaded_rows

    loaded = as_loaded_rows(dataset, config.dataset_name, config.dataset_split, config.dataset_config)
    fmt = detect_format(loaded.rows, loaded.source)
    log(f"data: {loaded.source}: {len(loaded.rows)} rows, format {describe_format(fmt)}")
    return prepare_prompts(loaded, fmt, tokenizer, max_prompt_length=config.max_prompt_length,
                           truncation_mode=config.truncation_mode)
