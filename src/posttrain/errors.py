"""Errors a user can fix: the CLI prints their one-line message instead of a traceback."""

from __future__ import annotations


class PosttrainError(Exception):
    """Base of posttrain's user-facing errors."""


class NonFiniteLossError(PosttrainError):
    """The loss or gradient norm became NaN/inf; the step was not applied."""


class CheckpointError(PosttrainError):
    """A checkpoint is missing, incomplete or does not fit the run."""


class LaunchError(PosttrainError):
    """The processes that were launched are not the run accelerate sees (e.g. 2 ranks that each
    think they are alone)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Every error class whose message alone tells the user what to fix."""
    from posttrain.config import ConfigError
    from posttrain.data.validation import DataValidationError

    return (PosttrainError, ConfigError, DataValidationError)
