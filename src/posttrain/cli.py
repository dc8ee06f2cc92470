"""`posttrain <command>`: parse flags and YAML into config dataclasses, then call a recipe.

Heavy packages are imported only once a command is chosen, so `posttrain --help` is instant.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from posttrain.commands import TOOL_COMMANDS, TRAIN_COMMANDS, parse_config  # noqa: F401 (re-exported)
from posttrain.config import ConfigError


def _usage() -> str:
    lines = ["usage: posttrain <command> [--config run.yaml] [--flag value ...]", "", "commands:"]
    for name, (*_, desc) in TRAIN_COMMANDS.items():
        lines.append(f"  {name:<14}{desc}")
    for name, desc in TOOL_COMMANDS.items():
        lines.append(f"  {name:<14}{desc}")
    lines += ["", "`posttrain <command> --help` lists that command's flags."]
    return "\n".join(lines)


@dataclass
class ValidateArgs:
    path: str = ""
    kind: str = "sft"
    dataset_split: str = "train"
    tokenizer_name_or_path: str | None = None
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"


@dataclass
class MaskPreviewArgs:
    path: str = ""
    rows: int = 3
    tokenizer_name_or_path: str | None = None
    assistant_only_loss: bool = False
    completion_only_loss: bool = True
    max_length: int | None = None


def _positional_path(argv: list[str]) -> list[str]:
    """`posttrain validate FILE ...` → `--path FILE ...`."""
    if argv and not argv[0].startswith("-"):
        return ["--path", argv[0], *argv[1:]]
    return argv


def _run_validate(argv: list[str]) -> int:
    args = parse_config(ValidateArgs, _positional_path(argv), prog="posttrain validate")
    if not args.path:
        raise ConfigError("posttrain validate: give the data file, e.g. `posttrain validate data.jsonl`")
    from posttrain.data.commands import run_validate

    return run_validate(args.path, kind=args.kind, split=args.dataset_split,
                        tokenizer_name_or_path=args.tokenizer_name_or_path, max_length=args.max_length,
                        max_prompt_length=args.max_prompt_length, truncation_mode=args.truncation_mode)


def _run_mask_preview(argv: list[str]) -> int:
    args = parse_config(MaskPreviewArgs, _positional_path(argv), prog="posttrain mask-preview")
    if not args.path:
        raise ConfigError("posttrain mask-preview: give the data file")
    from posttrain.data.commands import run_mask_preview

    return run_mask_preview(args.path, rows=args.rows, tokenizer_name_or_path=args.tokenizer_name_or_path,
                            assistant_only_loss=args.assistant_only_loss,
                            completion_only_loss=args.completion_only_loss, max_length=args.max_length)


@dataclass
class PipelineArgs:
    path: str = field(default="", metadata={"help": "The pipeline YAML (also the first positional argument)."})
    force: str | None = field(default=None, metadata={"help": "Rerun this stage and every later one."})
    dry_run: bool = field(default=False, metadata={"help": "Print the plan (what runs, what is cached) and stop."})
    output_dir: str | None = field(default=None, metadata={"help": "Overrides the file's output_dir."})


def _run_pipeline(argv: list[str]) -> int:
    args = parse_config(PipelineArgs, _positional_path(argv), prog="posttrain pipeline")
    if not args.path:
        raise ConfigError("posttrain pipeline: give the pipeline file, e.g. `posttrain pipeline run.yaml`")
    from posttrain.pipeline import run_pipeline

    result = run_pipeline(args.path, force=args.force, dry_run=args.dry_run, output_dir=args.output_dir)
    return 130 if result.stopped_at else 0


@dataclass
class ReportArgs:
    path: str = ""  # a run or pipeline directory (also the first positional argument)


def _run_report(argv: list[str]) -> int:
    args = parse_config(ReportArgs, _positional_path(argv), prog="posttrain report")
    if not args.path:
        raise ConfigError("posttrain report: give the run directory, e.g. `posttrain report runs/sft`")
    from posttrain.report.html_report import rebuild

    print(f"report: {rebuild(args.path)}")
    return 0


def _run_demo(argv: list[str]) -> int:
    from posttrain.demo.run import main as demo_main

    return demo_main(argv)


TOOL_RUNNERS: dict[str, Callable[[list[str]], int]] = {
    "validate": _run_validate,
    "mask-preview": _run_mask_preview,
    "report": _run_report,
    "pipeline": _run_pipeline,
    "demo": _run_demo,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command in TRAIN_COMMANDS:
            module_name, config_name, fn_name, _ = TRAIN_COMMANDS[command]
            module = importlib.import_module(module_name)
            config_cls = getattr(importlib.import_module("posttrain.config"), config_name)
            config = parse_config(config_cls, rest, prog=f"posttrain {command}")
            getattr(module, fn_name)(config)
            return 0
        if command in TOOL_RUNNERS:
            return TOOL_RUNNERS[command](rest)
        valid = list(TRAIN_COMMANDS) + list(TOOL_RUNNERS)
        from posttrain.config import closest_key

        guess = closest_key(command, valid)
        print(f"posttrain: unknown command {command!r}" + (f"; did you mean {guess}?" if guess else ""),
              file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 — known user-facing errors print one line
        from posttrain.errors import user_errors

        if isinstance(exc, user_errors()):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
