"""User-facing errors: one line naming the problem and the fix."""

from __future__ import annotations


class GptTuiError(Exception):
    """An error caused by input the user can fix.

    The CLI prints ``str(err)`` as one line on stderr and exits non-zero, without a
    traceback (unless ``--debug``).
    """

    def __init__(self, problem: str, fix: str | None = None, exit_code: int = 2) -> None:
        self.problem = problem
        self.fix = fix
        self.exit_code = exit_code
        super().__init__(f"{problem}: {fix}" if fix else problem)


class CheckpointError(GptTuiError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the model."""


class DataError(GptTuiError):
    """Training data is missing, empty, unreadable or too short."""


class DivergenceError(GptTuiError):
    """Training diverged (non-finite or spiking loss)."""
