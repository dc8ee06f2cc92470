"""Validated rows -> tokenised SFT examples, truncated, with a report of what was cut.

A row left with no training target after truncation (e.g. an over-long prompt) never reaches
the loss (pitfall 7): it is dropped and counted in the TruncationReport.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.data.chat_masks import tokenize_messages, tokenize_prompt_completion, tokenize_text
from posttrain.data.formats import DataFormat, row_messages
from posttrain.data.loading import LoadedRows
from posttrain.data.validation import DataValidationError, validate_rows

MAX_LISTED_ROWS = 10


@dataclass
class TokenizedExample:
    """One training sequence. Both lists have length T; completion_mask[t] == 1 means
    input_ids[t] is a target (predicted from position t - 1); completion_mask[0] == 0."""

    input_ids: list[int]
    completion_mask: list[int]
    row: int  # the record number errors cite

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(self.completion_mask[1:])


@dataclass
class TruncationReport:
    total: int = 0
    truncated: int = 0
    dropped_no_targets: int = 0
    dropped_rows: list[int] = field(default_factory=list)  # the first MAX_LISTED_ROWS
    max_length: int | None = None
    source: str = ""

    def lines(self) -> list[str]:
        """Human summary, printed before training."""
        kept = self.total - self.dropped_no_targets
        limit = "no max_length" if self.max_length is None else f"max_length {self.max_length}"
        out = [f"{self.total} examples, {limit}: {kept} kept, {self.truncated} truncated"]
        if self.dropped_no_targets:
            shown = ", ".join(str(r) for r in self.dropped_rows)
            more = "" if self.dropped_no_targets <= len(self.dropped_rows) else ", ..."
            out.append(
                f"{self.dropped_no_targets} dropped: no training tokens left after truncation "
                f"(rows {shown}{more}); raise max_length or shorten their prompts"
            )
        return out


def _truncate(ids: list[int], mask: list[int], max_length: int, side: str):
    if side == "right":
        return ids[:max_length], mask[:max_length]
    ids, mask = ids[-max_length:], mask[-max_length:]
    return ids, [0] + mask[1:]  # the new first token has nothing predicting it


def tokenize_row(
    row: dict, fmt: DataFormat, tokenizer, *, completion_only_loss: bool, assistant_only_loss: bool
):
    """(input_ids, completion_mask) for one validated row of an SFT format."""
    if fmt == DataFormat.MESSAGES:
        return tokenize_messages(row_messages(row), tokenizer, assistant_only_loss=assistant_only_loss)
    if fmt == DataFormat.LANGUAGE_MODELING:
        return tokenize_text(row["text"], tokenizer)
    if fmt in (DataFormat.PROMPT_COMPLETION, DataFormat.CONVERSATIONAL_PROMPT_COMPLETION):
        return tokenize_prompt_completion(
            row["prompt"],
            row["completion"],
            tokenizer,
            conversational=fmt == DataFormat.CONVERSATIONAL_PROMPT_COMPLETION,
            completion_only_loss=completion_only_loss,
        )
    raise ValueError(f"format {fmt.value} is not an SFT format")


def prepare_sft_examples(
    loaded: LoadedRows,
    fmt: DataFormat,
    tokenizer,
    *,
    max_length: int | None,
    completion_only_loss: bool = True,
    assistant_only_loss: bool = False,
    truncation_side: str = "right",
) -> tuple[list[TokenizedExample], TruncationReport]:
    """Validate (raising DataValidationError with every RowError), tokenise, truncate to
    max_length (keeping the start, or the end with truncation_side='left'), and drop rows with
    zero training targets, counting them in the report."""
    fmt = DataFormat(fmt)
    if truncation_side not in ("right", "left"):
        raise ValueError(f"truncation_side must be 'right' or 'left', got {truncation_side!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    errors = validate_rows(loaded, fmt, "sft")
    if errors:
        raise DataValidationError(errors)
    report = TruncationReport(total=len(loaded.rows), max_length=max_length, source=loaded.source)
    examples = []
    for row, number in zip(loaded.rows, loaded.row_numbers):
        ids, mask = tokenize_row(
            row,
            fmt,
            tokenizer,
            completion_only_loss=completion_only_loss,
            assistant_only_loss=assistant_only_loss,
        )
        if max_length is not None and len(ids) > max_length:
            ids, mask = _truncate(ids, mask, max_length, truncation_side)
            report.truncated += 1
        if not any(mask[1:]):
            report.dropped_no_targets += 1
            if len(report.dropped_rows) < MAX_LISTED_ROWS:
                report.dropped_rows.append(number)
            continue
        examples.append(TokenizedExample(input_ids=ids, completion_mask=mask, row=number))
    return examples, report
