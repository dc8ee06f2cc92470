"""Row-level validation: every problem becomes one ``file:row: field: problem`` line.

Nothing is dropped silently: a row that cannot be trained on is reported here, before any
compute is spent. Nested fields are named like ``messages[2].role``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from posttrain.data.errors import MAX_SHOWN_ERRORS, DataValidationError, RowError  # noqa: F401 (re-exported)
from posttrain.data.formats import SHAREGPT_ROLES, DataFormat, messages_field

if TYPE_CHECKING:
    from posttrain.data.loading import LoadedRows

ALLOWED_ROLES = ("system", "user", "assistant", "tool")

# Which formats each kind of training accepts.
KIND_FORMATS = {
    "sft": (
        DataFormat.LANGUAGE_MODELING,
        DataFormat.PROMPT_COMPLETION,
        DataFormat.CONVERSATIONAL_PROMPT_COMPLETION,
        DataFormat.MESSAGES,
    ),
    "preference": (DataFormat.PREFERENCE,),
    # KTO: unpaired examples, or pairs (each gives a desirable and an undesirable example).
    "unpaired": (DataFormat.UNPAIRED_PREFERENCE, DataFormat.PREFERENCE),
    "prompt": (
        DataFormat.PROMPT_ONLY,
        DataFormat.PROMPT_COMPLETION,
        DataFormat.CONVERSATIONAL_PROMPT_COMPLETION,
        DataFormat.PREFERENCE,
        DataFormat.UNPAIRED_PREFERENCE,
    ),
}
# Other names accepted for a kind.
KIND_ALIASES = {"reward": "preference", "dpo": "preference", "kto": "unpaired"}




def _tname(value) -> str:
    """JSON-ish type names, since users write JSON."""
    if value is None:
        return "null"
    return {
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        list: "list",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _check_string(value, name: str, out: list) -> bool:
    """Append problems with a required non-empty string; True when it is fine."""
    if not isinstance(value, str):
        out.append((name, f"expected a string, got {_tname(value)}"))
        return False
    if not value.strip():
        out.append((name, "empty string"))
        return False
    return True


def _check_messages(
    value, name: str, out: list, *, require_assistant: bool, must_end_with_assistant: bool
) -> bool:
    """Check a list of {role, content} (or ShareGPT {from, value}) messages."""
    if not isinstance(value, list):
        out.append((name, f"expected a list of messages, got {_tname(value)}"))
        return False
    if not value:
        out.append((name, "empty conversation (no messages)"))
        return False
    before = len(out)
    roles = []
    for j, m in enumerate(value):
        f = f"{name}[{j}]"
        if not isinstance(m, dict):
            out.append((f, f"expected a message object with role and content, got {_tname(m)}"))
            roles.append(None)
            continue
        sharegpt = "role" not in m and "from" in m
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        role = m.get(role_key)
        if role_key not in m:
            out.append((f"{f}.{role_key}", "missing field"))
        elif not isinstance(role, str):
            out.append((f"{f}.{role_key}", f"expected a string, got {_tname(role)}"))
            role = None
        else:
            if sharegpt:
                role = SHAREGPT_ROLES.get(role.lower(), role)
            if role not in ALLOWED_ROLES:
                allowed = ", ".join(ALLOWED_ROLES)
                out.append((f"{f}.{role_key}", f"unknown role {m[role_key]!r} (expected one of: {allowed})"))
        roles.append(role)
        # An assistant turn that only calls tools may have no content.
        tool_call = role == "assistant" and bool(m.get("tool_calls"))
        content = m.get(content_key)
        if content_key not in m or content is None:
            if not tool_call:
                out.append((f"{f}.{content_key}", "missing field"))
        elif not isinstance(content, str):
            out.append((f"{f}.{content_key}", f"expected a string, got {_tname(content)}"))
        elif not content.strip() and not tool_call:
            out.append((f"{f}.{content_key}", "empty content"))
    if require_assistant and "assistant" not in roles:
        out.append((name, "no assistant message (nothing to train on)"))
    elif must_end_with_assistant and roles[-1] not in ("assistant", None):
        out.append(
            (
                f"{name}[{len(value) - 1}]",
                f"conversation must end with an assistant message, not {roles[-1]!r}",
            )
        )
    return len(out) == before


def _check_row(row: dict, fmt: DataFormat, kind: str, out: list) -> None:
    def need(key: str) -> bool:
        if key not in row:
            out.append((key, "missing field"))
            return False
        return True

    if fmt == DataFormat.LANGUAGE_MODELING:
        if need("text"):
            _check_string(row["text"], "text", out)
    elif fmt == DataFormat.PROMPT_COMPLETION:
        for key in ("prompt", "completion"):
            if need(key):
                _check_string(row[key], key, out)
    elif fmt == DataFormat.CONVERSATIONAL_PROMPT_COMPLETION:
        if need("prompt"):
            _check_messages(
                row["prompt"], "prompt", out, require_assistant=False, must_end_with_assistant=False
            )
        if need("completion"):
            _check_messages(
                row["completion"], "completion", out, require_assistant=True, must_end_with_assistant=False
            )
    elif fmt == DataFormat.MESSAGES:
        key = messages_field(row)
        if need(key):
            sft = kind == "sft"
            _check_messages(row[key], key, out, require_assistant=sft, must_end_with_assistant=sft)
    elif fmt == DataFormat.PREFERENCE:
        _check_preference(row, out, need)
    elif fmt == DataFormat.UNPAIRED_PREFERENCE:
        _check_unpaired(row, out, need)
    elif fmt == DataFormat.PROMPT_ONLY and need("prompt"):
        if isinstance(row["prompt"], list):
            _check_messages(
                row["prompt"], "prompt", out, require_assistant=False, must_end_with_assistant=False
            )
        else:
            _check_string(row["prompt"], "prompt", out)


def _check_preference(row: dict, out: list, need) -> None:
    has_c, has_r = need("chosen"), need("rejected")
    if not (has_c and has_r):
        return
    chosen, rejected = row["chosen"], row["rejected"]
    has_prompt = row.get("prompt") is not None
    ok = True
    if isinstance(chosen, list) or isinstance(rejected, list):
        # Without a prompt, chosen/rejected are whole conversations ending with the assistant.
        full = not has_prompt
        if has_prompt:
            if not isinstance(row["prompt"], list):
                out.append(
                    ("prompt", f"expected a list of messages (like chosen), got {_tname(row['prompt'])}")
                )
            else:
                _check_messages(
                    row["prompt"], "prompt", out, require_assistant=False, must_end_with_assistant=False
                )
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            ok &= _check_messages(value, key, out, require_assistant=True, must_end_with_assistant=full)
    else:
        if has_prompt:
            _check_string(row["prompt"], "prompt", out)
        ok &= _check_string(chosen, "chosen", out)
        ok &= _check_string(rejected, "rejected", out)
    if ok and chosen == rejected:
        out.append(("rejected", "identical to chosen (the pair carries no preference)"))
    elif ok and not has_prompt:
        # Implicit prompt: chosen and rejected must share it.
        from posttrain.data.prompt_split import PromptSplitError, split_pair

        try:
            split_pair(row)
        except PromptSplitError as e:
            out.append((e.field, e.problem))
    _check_margin(row, out)


def _check_margin(row: dict, out: list) -> None:
    margin = row.get("margin")
    if margin is None:
        return
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        out.append(("margin", f"expected a number, got {_tname(margin)}"))
    elif not math.isfinite(margin):
        out.append(("margin", f"expected a finite number, got {margin}"))


def _check_unpaired(row: dict, out: list, need) -> None:
    has_p, has_c = need("prompt"), need("completion")
    if has_p and has_c and (isinstance(row["prompt"], list) or isinstance(row["completion"], list)):
        for key, assistant in (("prompt", False), ("completion", True)):
            _check_messages(row[key], key, out, require_assistant=assistant, must_end_with_assistant=False)
    else:
        for key, present in (("prompt", has_p), ("completion", has_c)):
            if present:
                _check_string(row[key], key, out)
    if need("label") and not isinstance(row["label"], bool):
        out.append(("label", f"expected true or false, got {_tname(row['label'])}"))


def check_kind(fmt: DataFormat, kind: str, source: str) -> None:
    """Raise DataValidationError when a dataset's format cannot be used for this kind of training."""
    kind = KIND_ALIASES.get(kind, kind)
    if kind not in KIND_FORMATS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of: {', '.join(KIND_FORMATS)}")
    if fmt not in KIND_FORMATS[kind]:
        accepted = ", ".join(f.value for f in KIND_FORMATS[kind])
        raise DataValidationError(
            message=f"{source}: {kind} training needs data in one of the formats {accepted}; found {fmt.value}"
        )


def validate_rows(loaded: LoadedRows, fmt: DataFormat, kind: str = "sft") -> list[RowError]:
    """Every problem in ``loaded`` (including JSON parse errors) as RowErrors, in file order.

    kind: 'sft' (conversations must contain and end with an assistant turn), 'preference'
    (aliases 'reward', 'dpo'), 'unpaired' (alias 'kto'), or 'prompt' (prompts for online
    methods). Raises ValueError when the
    format does not suit the kind at all (a DataValidationError with a message).
    """
    fmt = DataFormat(fmt)
    check_kind(fmt, kind, loaded.source)
    kind = KIND_ALIASES.get(kind, kind)
    errors = list(loaded.errors)
    for i, row in enumerate(loaded.rows):
        out: list[tuple[str, str]] = []
        if not isinstance(row, dict):
            out.append(("<row>", f"expected a JSON object, got {_tname(row)}"))
        else:
            _check_row(row, fmt, kind, out)
        src, num = loaded.source_of(i), loaded.row_numbers[i]
        errors += [RowError(src, num, field, problem) for field, problem in out]
    order = {s: k for k, s in enumerate(dict.fromkeys(loaded.row_sources or [loaded.source]))}
    errors.sort(key=lambda e: (order.get(e.source, 0), e.row))
    return errors


def raise_if_invalid(loaded: LoadedRows, fmt: DataFormat, kind: str = "sft") -> None:
    """validate_rows, raising DataValidationError when anything is wrong."""
    errors = validate_rows(loaded, fmt, kind)
    if errors:
        raise DataValidationError(errors)
