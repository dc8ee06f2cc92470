"""Preference pairs (reward models, DPO) and unpaired examples (KTO): validated rows -> token ids.

Forms accepted (format ``preference``):

- explicit prompt: ``prompt`` + ``chosen`` + ``rejected``, all strings, or all message lists
  (``chosen``/``rejected`` are then the completion turns);
- implicit prompt: ``chosen`` + ``rejected`` only. Message lists are whole conversations and the
  prompt is their longest shared leading messages (:func:`extract_prompt`); strings share a
  leading text, cut at the last whitespace before they differ (Anthropic HH style);
- an optional numeric ``margin`` (reward modelling with a margin).

Format ``unpaired_preference`` (KTO): ``prompt`` + ``completion`` + boolean ``label``
(true = desirable). Paired data can be used for KTO too: each pair gives a desirable chosen and
an undesirable rejected example.

Prompt and completion are tokenised SEPARATELY and concatenated as ids (pitfall 3) by
:func:`posttrain.data.chat_masks.tokenize_prompt_completion`; chosen and rejected of one pair
share exactly the same prompt ids. A completion's ids are the trained tokens only and end with
the end-of-turn/EOS token (pitfall 1), unless truncation cut them.

Truncation: first the prompt to ``max_prompt_length`` (``keep_end`` keeps its last tokens, TRL's
default; ``keep_start`` its first), then each completion to ``max_length - len(prompt)`` (its
start is kept). A row left with an empty completion is dropped and counted (pitfall 7).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from posttrain.data.chat_masks import tokenize_prompt_completion
from posttrain.data.errors import DataValidationError, RowError
from posttrain.data.formats import DataFormat, normalize_sharegpt
from posttrain.data.loading import LoadedRows
from posttrain.data.prompt_split import (  # noqa: F401 (re-exported)
    PromptSplitError,
    extract_prompt,
    extract_text_prompt,
    split_pair,
)
from posttrain.data.validation import validate_rows

MAX_LISTED_ROWS = 10
TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass
class PreferenceExample:
    """One pair. ``chosen_ids``/``rejected_ids`` are completion tokens only (all trained)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row: int  # the record number errors cite
    margin: float | None = None


@dataclass
class UnpairedExample:
    """One KTO example; ``label`` True = desirable."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    row: int


@dataclass
class PreferenceReport:
    total: int = 0
    truncated: int = 0
    dropped_no_completion: int = 0
    dropped_rows: list[int] = field(default_factory=list)  # the first MAX_LISTED_ROWS
    warnings: list[str] = field(default_factory=list)
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"
    source: str = ""
    unit: str = "pairs"  # "pairs" or "examples" (unpaired)
    desirable: int = 0  # unpaired only: kept examples with label True / False
    undesirable: int = 0

    def lines(self) -> list[str]:
        """Human summary, printed before training."""
        kept = self.total - self.dropped_no_completion
        limits = []
        if self.max_prompt_length is not None:
            limits.append(f"max_prompt_length {self.max_prompt_length} ({self.truncation_mode})")
        if self.max_length is not None:
            limits.append(f"max_length {self.max_length}")
        limit = ", ".join(limits) or "no max_length"
        out = [f"{self.total} {self.unit}, {limit}: {kept} kept, {self.truncated} truncated"]
        if self.unit == "examples":
            out.append(
                f"{self.desirable} desirable (label true), {self.undesirable} undesirable (label false)"
            )
        if self.dropped_no_completion:
            shown = ", ".join(str(r) for r in self.dropped_rows)
            more = "" if self.dropped_no_completion <= len(self.dropped_rows) else ", ..."
            what = "a chosen or rejected completion" if self.unit == "pairs" else "the completion"
            out.append(
                f"{self.dropped_no_completion} dropped: {what} was empty after truncation "
                f"(rows {shown}{more}); raise max_length or lower max_prompt_length"
            )
        out += [f"warning: {w}" for w in self.warnings]
        return out


# ---------------------------------------------------------------------------- implicit prompts


def _norm(value) -> str:
    if isinstance(value, list):
        value = "\n".join(
            f"{m.get('role')}: {m.get('content')}"
            for m in map(normalize_sharegpt, value)
            if isinstance(m, dict)
        )
    return " ".join(str(value).split()).lower()


def _cite(loaded: LoadedRows, idx: list[int]) -> str:
    multi = loaded.row_sources is not None
    shown = [
        f"{loaded.source_of(i)}:{loaded.row_numbers[i]}" if multi else str(loaded.row_numbers[i]) for i in idx
    ]
    more = ", ..." if len(idx) > MAX_LISTED_ROWS else ""
    return ", ".join(shown[:MAX_LISTED_ROWS]) + more


def preference_warnings(loaded: LoadedRows, fmt: DataFormat) -> list[str]:
    """Warnings (not errors) about validated preference / unpaired rows, with counts:
    exact duplicate rows; pairs whose chosen and rejected differ only in whitespace or case;
    unpaired data whose labels are all one value."""
    fmt = DataFormat(fmt)
    out = []
    seen: set[str] = set()
    dup = []
    for i, row in enumerate(loaded.rows):
        key = json.dumps(row, sort_keys=True, default=str)
        if key in seen:
            dup.append(i)
        seen.add(key)
    if dup:
        n = len(dup)
        out.append(
            f"{loaded.source}: {n} duplicate row{'s' if n != 1 else ''} (exact repeats of an earlier "
            f"row; they weigh double): rows {_cite(loaded, dup)}"
        )
    if fmt == DataFormat.PREFERENCE:
        near = [
            i
            for i, r in enumerate(loaded.rows)
            if r["chosen"] != r["rejected"] and _norm(r["chosen"]) == _norm(r["rejected"])
        ]
        if near:
            n = len(near)
            out.append(
                f"{loaded.source}: {n} near-duplicate pair{'s' if n != 1 else ''} (chosen and rejected "
                f"differ only in whitespace or case; little preference signal): rows {_cite(loaded, near)}"
            )
    if fmt == DataFormat.UNPAIRED_PREFERENCE and loaded.rows:
        labels = {r["label"] for r in loaded.rows}
        if len(labels) == 1:
            value = "true" if labels.pop() else "false"
            out.append(
                f"{loaded.source}: all {len(loaded.rows)} labels are {value}; KTO learns from both "
                "desirable (true) and undesirable (false) examples"
            )
    return out


def validate_preference_rows(loaded: LoadedRows, fmt: DataFormat, kind: str = "preference") -> list[RowError]:
    """validate_rows plus the checks across rows: a ``margin`` on some pairs needs one on all."""
    errors = validate_rows(loaded, fmt, kind)
    if DataFormat(fmt) == DataFormat.PREFERENCE and kind in ("preference", "reward"):
        has = [isinstance(r, dict) and r.get("margin") is not None for r in loaded.rows]
        if any(has) and not all(has):
            errors += [
                RowError(
                    loaded.source_of(i),
                    loaded.row_numbers[i],
                    "margin",
                    "missing field (other rows have a margin)",
                )
                for i, h in enumerate(has)
                if not h and isinstance(loaded.rows[i], dict)
            ]
            order = {s: k for k, s in enumerate(dict.fromkeys(loaded.row_sources or [loaded.source]))}
            errors.sort(key=lambda e: (order.get(e.source, 0), e.row))
    return errors


# ---------------------------------------------------------------------------- tokenising


def _check_args(max_length, max_prompt_length, truncation_mode) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(
            f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {truncation_mode!r}"
        )
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")


def _tokenize(prompt, completion, tokenizer, conversational: bool) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids): the completion's trained tokens only (through EOS)."""
    ids, mask = tokenize_prompt_completion(
        prompt, completion, tokenizer, conversational=conversational, completion_only_loss=True
    )
    first = mask.index(1)  # the first completion token (prompts are never empty)
    last = len(mask) - mask[::-1].index(1)
    return ids[:first], ids[first:last]


def _truncate_prompt(prompt_ids: list[int], max_prompt_length: int | None, mode: str) -> list[int]:
    if max_prompt_length is None or len(prompt_ids) <= max_prompt_length:
        return prompt_ids
    return prompt_ids[-max_prompt_length:] if mode == "keep_end" else prompt_ids[:max_prompt_length]


def _truncate_completion(prompt_len: int, ids: list[int], max_length: int | None) -> list[int]:
    if max_length is None:
        return ids
    return ids[: max(0, max_length - prompt_len)]


def _raise_if_invalid(loaded: LoadedRows, fmt: DataFormat, kind: str) -> None:
    errors = validate_preference_rows(loaded, fmt, kind)
    if errors:
        raise DataValidationError(errors)


def _drop(report: PreferenceReport, number: int) -> None:
    report.dropped_no_completion += 1
    if len(report.dropped_rows) < MAX_LISTED_ROWS:
        report.dropped_rows.append(number)


def _pair_ids(row: dict, tokenizer, max_length, max_prompt_length, truncation_mode):
    """(prompt_ids, chosen_ids, rejected_ids, truncated) for one validated preference row."""
    prompt, chosen, rejected, conv = split_pair(row)
    p_c, c_ids = _tokenize(prompt, chosen, tokenizer, conv)
    p_r, r_ids = _tokenize(prompt, rejected, tokenizer, conv)
    if p_c != p_r:  # cannot happen with a deterministic template; never train on a mismatch
        raise ValueError("chosen and rejected tokenised to different prompt ids")
    p = _truncate_prompt(p_c, max_prompt_length, truncation_mode)
    c = _truncate_completion(len(p), c_ids, max_length)
    r = _truncate_completion(len(p), r_ids, max_length)
    truncated = (len(p), len(c), len(r)) != (len(p_c), len(c_ids), len(r_ids))
    return p, c, r, truncated


def prepare_preference_examples(
    loaded: LoadedRows,
    fmt: DataFormat,
    tokenizer,
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str = "keep_end",
) -> tuple[list[PreferenceExample], PreferenceReport]:
    """Validate (DataValidationError with every RowError, before tokenising), tokenise each pair,
    truncate, and drop pairs left with an empty chosen or rejected completion (counted)."""
    fmt = DataFormat(fmt)
    _check_args(max_length, max_prompt_length, truncation_mode)
    _raise_if_invalid(loaded, fmt, "preference")
    report = PreferenceReport(
        total=len(loaded.rows),
        warnings=preference_warnings(loaded, fmt),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        source=loaded.source,
    )
    examples = []
    for row, number in zip(loaded.rows, loaded.row_numbers):
        p, c, r, truncated = _pair_ids(row, tokenizer, max_length, max_prompt_length, truncation_mode)
        report.truncated += truncated
        if not c or not r:
            _drop(report, number)
            continue
        margin = row.get("margin")
        examples.append(
            PreferenceExample(
                prompt_ids=p,
                chosen_ids=c,
                rejected_ids=r,
                row=number,
                margin=None if margin is None else float(margin),
            )
        )
    return examples, report


def prepare_unpaired_examples(
    loaded: LoadedRows,
    fmt: DataFormat,
    tokenizer,
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str = "keep_end",
) -> tuple[list[UnpairedExample], PreferenceReport]:
    """KTO examples from ``unpaired_preference`` rows, or from ``preference`` pairs (each pair
    gives chosen with label True, then rejected with label False). Validated first; an example
    whose completion is empty after truncation is dropped and counted."""
    fmt = DataFormat(fmt)
    _check_args(max_length, max_prompt_length, truncation_mode)
    _raise_if_invalid(loaded, fmt, "unpaired")
    paired = fmt == DataFormat.PREFERENCE
    report = PreferenceReport(
        total=len(loaded.rows) * (2 if paired else 1),
        warnings=preference_warnings(loaded, fmt),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        source=loaded.source,
        unit="examples",
    )
    examples = []
    for row, number in zip(loaded.rows, loaded.row_numbers):
        if paired:
            p, c, r, _ = _pair_ids(row, tokenizer, None, None, truncation_mode)
            items = [(p, c, True), (p, r, False)]
        else:
            conv = isinstance(row["prompt"], list)
            prompt, completion = row["prompt"], row["completion"]
            if conv:
                prompt = [normalize_sharegpt(m) for m in prompt]
                completion = [normalize_sharegpt(m) for m in completion]
            p, c = _tokenize(prompt, completion, tokenizer, conv)
            items = [(p, c, row["label"])]
        for p_full, c_full, label in items:
            p = _truncate_prompt(p_full, max_prompt_length, truncation_mode)
            c = _truncate_completion(len(p), c_full, max_length)
            report.truncated += (len(p), len(c)) != (len(p_full), len(c_full))
            if not c:
                _drop(report, number)
                continue
            if label:
                report.desirable += 1
            else:
                report.undesirable += 1
            examples.append(UnpairedExample(prompt_ids=p, completion_ids=c, label=bool(label), row=number))
    return examples, report
