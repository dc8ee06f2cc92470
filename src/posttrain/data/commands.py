"""`posttrain validate` and `posttrain mask-preview`: check data before spending compute.

Each returns the process exit code (0 clean, 1 problems found).
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from posttrain.data.chat_masks import visible
from posttrain.data.formats import DataFormat, describe_format, detect_format
from posttrain.data.loading import load_rows
from posttrain.data.prepare import prepare_sft_examples
from posttrain.data.validation import KIND_ALIASES, check_kind, validate_rows

TRAINED_STYLE = "black on green"
UNTRAINED_STYLE = "dim"


def _console() -> Console:
    # Built per call so output goes to the current sys.stdout (captured in tests, piped in CI).
    return Console(highlight=False, soft_wrap=True)


def load_tokenizer(tokenizer_name_or_path: str | None):
    """The tokenizer at a hub id / local dir / .gguf, or the embedded default model's."""
    from posttrain.models.loading import load_tokenizer as load

    return load(tokenizer_name_or_path)


def _load_and_detect(console: Console, path: str, split: str, kind: str | None):
    """(loaded, fmt) or None after printing why not."""
    try:
        loaded = load_rows(path, split=split)
        fmt = detect_format(loaded.rows, loaded.source)
        if kind is not None:
            check_kind(fmt, kind, loaded.source)
    except (ValueError, OSError) as e:  # DataValidationError is a ValueError
        console.print(f"[red]error:[/red] {escape(str(e))}")
        return None
    console.print(f"data format: {escape(describe_format(fmt))}")
    console.print(f"{len(loaded.rows)} rows from {escape(loaded.source)}")
    return loaded, fmt


def run_validate(
    path: str,
    kind: str = "sft",
    split: str = "train",
    tokenizer_name_or_path: str | None = None,
    max_length: int | None = None,
    assistant_only_loss: bool = False,
    completion_only_loss: bool = True,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> int:
    """Print the detected format, row count, every error as ``file:row: field: problem`` and a
    summary; with a tokenizer (or a max_length / max_prompt_length: then the default tokenizer)
    also tokenise and print the truncation report (masks as in training: assistant_only_loss,
    completion_only_loss). kind 'preference' (reward/dpo) and 'unpaired' (kto) also print
    warnings (duplicate rows, near-duplicate pairs) and, when tokenising, the prompt/completion
    truncation with max_prompt_length and truncation_mode. Exit code 0 when clean, else 1
    (warnings do not fail)."""
    console = _console()
    got = _load_and_detect(console, path, split, kind)
    if got is None:
        return 1
    loaded, fmt = got
    kind = KIND_ALIASES.get(kind, kind)
    if kind in ("preference", "unpaired"):
        from posttrain.data.preference import validate_preference_rows

        errors = validate_preference_rows(loaded, fmt, kind)
    else:
        errors = validate_rows(loaded, fmt, kind)
    for e in errors:
        console.print(escape(str(e)))
    if errors:
        bad = len({(e.source, e.row) for e in errors})
        console.print(f"[red]{len(errors)} error(s) in {bad} row(s)[/red]; fix them before training")
        return 1
    console.print(f"[green]no errors[/green] in {len(loaded.rows)} rows")
    want_tokens = tokenizer_name_or_path is not None or max_length is not None
    if kind in ("preference", "unpaired"):
        return _validate_preference(
            console,
            loaded,
            fmt,
            kind,
            want_tokens,
            tokenizer_name_or_path,
            max_length,
            max_prompt_length,
            truncation_mode,
        )
    if want_tokens and kind == "sft":
        tokenizer = load_tokenizer(tokenizer_name_or_path)
        _, report = prepare_sft_examples(
            loaded,
            fmt,
            tokenizer,
            max_length=max_length,
            assistant_only_loss=assistant_only_loss,
            completion_only_loss=completion_only_loss,
        )
        for line in report.lines():
            console.print(escape(line))
    return 0


def _validate_preference(
    console,
    loaded,
    fmt,
    kind,
    want_tokens,
    tokenizer_name_or_path,
    max_length,
    max_prompt_length,
    truncation_mode,
) -> int:
    from posttrain.data import preference

    if not (want_tokens or max_prompt_length is not None):
        for w in preference.preference_warnings(loaded, fmt):
            console.print(f"[yellow]warning:[/yellow] {escape(w)}")
        return 0
    tokenizer = load_tokenizer(tokenizer_name_or_path)
    prepare = (
        preference.prepare_preference_examples
        if kind == "preference"
        else preference.prepare_unpaired_examples
    )
    try:
        _, report = prepare(
            loaded,
            fmt,
            tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation_mode=truncation_mode,
        )
    except ValueError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        return 1
    for line in report.lines():
        console.print(escape(line))
    return 0


def _render_example(tokenizer, ids: list[int], mask: list[int]) -> Text:
    text = Text()
    for tid, m in zip(ids, mask):
        piece = visible(tokenizer.decode([tid]))
        text.append(piece, style=TRAINED_STYLE if m else UNTRAINED_STYLE)
    return text


def run_mask_preview(
    path: str,
    rows: int = 3,
    tokenizer_name_or_path: str | None = None,
    assistant_only_loss: bool = False,
    completion_only_loss: bool = True,
    max_length: int | None = None,
    split: str = "train",
) -> int:
    """Print the first ``rows`` examples token by token, trained tokens highlighted (green
    background) and the rest dim, with token counts. Exit code 0, or 1 on bad data."""
    console = _console()
    got = _load_and_detect(console, path, split, "sft")
    if got is None:
        return 1
    loaded, fmt = got
    subset = loaded.subset(list(range(min(rows, len(loaded.rows)))))
    tokenizer = load_tokenizer(tokenizer_name_or_path)
    try:
        examples, report = prepare_sft_examples(
            subset,
            DataFormat(fmt),
            tokenizer,
            max_length=max_length,
            completion_only_loss=completion_only_loss,
            assistant_only_loss=assistant_only_loss,
        )
    except ValueError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        return 1
    console.print(
        Text.assemble("legend: ", ("trained", TRAINED_STYLE), " ", ("not trained", UNTRAINED_STYLE))
    )
    for ex in examples:
        console.rule(f"row {ex.row}")
        console.print(_render_example(tokenizer, ex.input_ids, ex.completion_mask))
        console.print(f"[bold]{len(ex.input_ids)} tokens, {ex.num_targets} trained[/bold]")
    for line in report.lines():
        console.print(escape(line))
    return 0
