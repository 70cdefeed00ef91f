"""User-facing errors: one line naming the problem and the fix."""

from __future__ import annotations


class GptTuiError(Exception):
    """An error caused by input the user can fix.

    The CLI prints ``str(err)`` as one line on stderr and exits with ``exit_code`` (2 for bad
    input; 1 for a run that failed, e.g. out of memory or a lost rank; 3 for divergence),
    without a traceback (unless ``--debug``).
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
    """Training diverged (non-finite or spiking loss): exit code 3."""

    def __init__(self, problem: str, fix: str | None = None, exit_code: int = 3) -> None:
        super().__init__(problem, fix, exit_code)


class RankLostError(GptTuiError):
    """Another process of the torchrun job is gone: exit code 1."""

    def __init__(self, problem: str, fix: str | None = None, exit_code: int = 1) -> None:
        super().__init__(problem, fix, exit_code)

    def where(self, step: int, last_checkpoint: str | None, run_dir: str) -> RankLostError:
        """The same error naming the step, the last checkpoint and how to go on."""
        if " at step " in self.problem:
            return self
        return RankLostError(f"{self.problem} at step {step}; last checkpoint: {last_checkpoint or 'none written yet'}",
                             f"see torchrun's report and {run_dir}/rank-*.log, then continue with --resume {run_dir}")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is running out of memory: torch's OutOfMemoryError (GPU), or the CPU allocator's
    RuntimeError (``DefaultCPUAllocator: can't allocate memory``), which torch raises as a plain error."""
    if type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
