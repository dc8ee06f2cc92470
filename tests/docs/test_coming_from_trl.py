"""docs/coming-from-trl.md names posttrain flags; each must exist, so the page cannot drift."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

from posttrain.cli import TRAIN_COMMANDS
from posttrain.config import FLAG_ALIASES

PAGE = Path(__file__).resolve().parents[2] / "docs" / "coming-from-trl.md"


def _all_fields() -> set[str]:
    names: set[str] = set()
    for module, config_cls, *_ in TRAIN_COMMANDS.values():
        cls = getattr(importlib.import_module("posttrain.config"), config_cls, None)
        if cls is None:  # a command whose config lives in its own module
            cls = getattr(importlib.import_module(module), config_cls)
        names |= {f.name for f in dataclasses.fields(cls)}
    return names


def _section(text: str, heading: str) -> str:
    start = text.index(f"## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_every_posttrain_flag_on_the_page_exists():
    text = PAGE.read_text()
    fields = _all_fields()
    same = re.findall(r"`--([a-z_]+)`", _section(text, "Flags that are the same"))
    differ_rows = [line.split("|") for line in _section(text, "Flags that differ").splitlines()
                   if line.startswith("| `")]
    ours = [flag for row in differ_rows if "not " not in row[2] for flag in re.findall(r"`--([a-z_]+)", row[2])]
    trl_aliases = [flag for row in differ_rows for flag in re.findall(r"`--([a-z_]+)", row[1]) if flag in FLAG_ALIASES]
    assert len(same) > 40 and len(ours) > 10
    missing = sorted({f for f in same + ours if f not in fields})
    assert not missing, f"docs/coming-from-trl.md names flags no command has: {missing}"
    assert set(trl_aliases) == set(FLAG_ALIASES), "every TRL alias the CLI accepts is on the page"


def test_every_command_on_the_page_exists():
    text = _section(PAGE.read_text(), "Commands")
    named = set(re.findall(r"`posttrain ([a-z-]+)", text))
    from posttrain.cli import TOOL_COMMANDS

    assert named <= set(TRAIN_COMMANDS) | set(TOOL_COMMANDS), named - set(TRAIN_COMMANDS) - set(TOOL_COMMANDS)
