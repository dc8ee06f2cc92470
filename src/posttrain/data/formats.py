"""Dataset formats (TRL's names) and their detection from the columns present.

| format                            | columns                                             |
|-----------------------------------|-----------------------------------------------------|
| language_modeling                 | text                                                |
| prompt_completion                 | prompt, completion (strings)                        |
| conversational_prompt_completion  | prompt, completion (lists of messages)              |
| messages                          | messages (or ShareGPT ``conversations``: from/value) |
| preference                        | chosen, rejected, optional prompt (strings or lists)|
| unpaired_preference               | prompt, completion, label (bool) — KTO              |
| prompt_only                       | prompt                                              |
"""

from __future__ import annotations

from enum import Enum


class DataFormat(str, Enum):
    LANGUAGE_MODELING = "language_modeling"
    PROMPT_COMPLETION = "prompt_completion"
    CONVERSATIONAL_PROMPT_COMPLETION = "conversational_prompt_completion"
    MESSAGES = "messages"
    PREFERENCE = "preference"
    UNPAIRED_PREFERENCE = "unpaired_preference"
    PROMPT_ONLY = "prompt_only"


_DESCRIPTIONS = {
    DataFormat.LANGUAGE_MODELING: "language modelling: a 'text' column; every token is trained",
    DataFormat.PROMPT_COMPLETION: "prompt-completion: 'prompt' and 'completion' strings",
    DataFormat.CONVERSATIONAL_PROMPT_COMPLETION: (
        "conversational prompt-completion: 'prompt' and 'completion' message lists, "
        "rendered with the chat template"
    ),
    DataFormat.MESSAGES: "conversations: a 'messages' list of {role, content}, rendered with the chat template",
    DataFormat.PREFERENCE: "preference pairs: 'chosen' and 'rejected' (with an optional 'prompt')",
    DataFormat.UNPAIRED_PREFERENCE: (
        "unpaired preference (KTO): 'prompt', 'completion' and a boolean 'label' "
        "(true = desirable)"
    ),
    DataFormat.PROMPT_ONLY: "prompts only: a 'prompt' column (completions are generated)",
}

# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
}


def describe_format(fmt: DataFormat) -> str:
    """One human line naming the format, printed at the start of training."""
    return f"{DataFormat(fmt).value} ({_DESCRIPTIONS[DataFormat(fmt)]})"


def messages_field(row: dict) -> str:
    """The column holding the conversation: 'messages' or ShareGPT 'conversations'."""
    return "messages" if "messages" in row or "conversations" not in row else "conversations"


def row_messages(row: dict) -> list[dict]:
    """The conversation of a MESSAGES row as [{role, content, ...}], ShareGPT normalised."""
    if "messages" in row or "conversations" not in row:
        return row["messages"]
    return [normalize_sharegpt(m) for m in row["conversations"]]


def normalize_sharegpt(message: dict) -> dict:
    """{'from': 'human', 'value': ...} -> {'role': 'user', 'content': ...}; others unchanged."""
    if "role" in message or "from" not in message:
        return message
    speaker = message["from"]
    role = SHAREGPT_ROLES.get(speaker.lower(), speaker) if isinstance(speaker, str) else speaker
    return {"role": role, "content": message.get("value")}


def _is_conversational(value) -> bool:
    return isinstance(value, list)


def detect_format(rows: list[dict], source: str) -> DataFormat:
    """The format implied by the columns (union over all rows).

    Raises DataValidationError (a ValueError) naming the columns found when none fits.
    """
    from posttrain.data.errors import DataValidationError

    columns: dict[str, None] = {}
    for r in rows:
        if isinstance(r, dict):
            columns.update(dict.fromkeys(r))
    if not columns:
        raise DataValidationError(message=f"{source}: no records found (an empty file, or no JSON objects)")
    if "messages" in columns or "conversations" in columns:
        return DataFormat.MESSAGES
    if "chosen" in columns and "rejected" in columns:
        return DataFormat.PREFERENCE
    if "prompt" in columns and "completion" in columns and "label" in columns:
        return DataFormat.UNPAIRED_PREFERENCE
    if "prompt" in columns and "completion" in columns:
        first = next((r["prompt"] for r in rows if isinstance(r, dict) and r.get("prompt") is not None), "")
        if _is_conversational(first):
            return DataFormat.CONVERSATIONAL_PROMPT_COMPLETION
        return DataFormat.PROMPT_COMPLETION
    if "text" in columns:
        return DataFormat.LANGUAGE_MODELING
    if "prompt" in columns:
        return DataFormat.PROMPT_ONLY
    found = ", ".join(repr(c) for c in columns)
    raise DataValidationError(
        message=f"{source}: cannot tell the data format from the columns found ({found}); expected one of: "
        "'text' | 'prompt' + 'completion' | 'messages' (or 'conversations') | "
        "'chosen' + 'rejected' (+ optional 'prompt') | 'prompt' + 'completion' + 'label' | 'prompt'"
    )


def is_conversational_row(row: dict, fmt: DataFormat) -> bool:
    """Whether a PREFERENCE / UNPAIRED_PREFERENCE / PROMPT_ONLY row holds message lists rather
    than strings."""
    key = "chosen" if fmt == DataFormat.PREFERENCE else "prompt"
    return _is_conversational(row.get(key))
