"""Data errors shared by loading, format detection, validation and preference data (a leaf module:
imports nothing of posttrain's, so those modules never import each other back for them)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_SHOWN_ERRORS = 20


@dataclass(frozen=True)
class RowError:
    source: str
    row: int
    field: str
    problem: str

    def __str__(self) -> str:
        return f"{self.source}:{self.row}: {self.field}: {self.problem}"


class DataValidationError(ValueError):
    """Raised with every RowError found; str() shows the count and the first 20.

    Problems with the data as a whole (no such file, unknown columns, a format that does not
    suit the method) carry a ``message`` and no row errors, so the CLI prints them the same way.
    """

    def __init__(self, errors: list[RowError] = (), message: str | None = None):
        self.errors = list(errors)
        self.message = message
        super().__init__(self._render())

    def _render(self) -> str:
        if self.message is not None:
            return self.message
        n = len(self.errors)
        rows = len({(e.source, e.row) for e in self.errors})
        lines = [f"{n} data error{'s' if n != 1 else ''} in {rows} row{'s' if rows != 1 else ''}:"]
        lines += [f"  {e}" for e in self.errors[:MAX_SHOWN_ERRORS]]
        if n > MAX_SHOWN_ERRORS:
            lines.append(f"  ... and {n - MAX_SHOWN_ERRORS} more (run `posttrain validate` to see all)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._render()
