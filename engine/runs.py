"""Where a run's files are: the one resolver from a run directory, a checkpoint or a config to paths.

A run directory holds ``config.json`` (the settings), ``metrics.jsonl`` (every event),
``checkpoints/`` and, while a process trains it, ``control.json`` (and usually ``control.sock``).
This module imports neither torch nor NumPy, so shell commands that only look answer at once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

RUNS_ROOT = "runs"
"""Where runs go by default: ``runs/<timestamp>`` under the working directory."""
FINAL_STATES = ("finished", "stopped", "failed")
"""States after which a run's process has ended on its own terms."""

METRICS = "metrics.jsonl"
CONFIG = "config.json"
CONTROL_INFO = "control.json"
SOCKET = "control.sock"
TRAIN_LOG = "train.log"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory."""

    path: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.path.abspath(self.path))

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def metrics(self) -> str:
        return os.path.join(self.path, METRICS)

    @property
    def config(self) -> str:
        return os.path.join(self.path, CONFIG)

    @property
    def control_info(self) -> str:
        return os.path.join(self.path, CONTROL_INFO)

    @property
    def socket(self) -> str:
        return os.path.join(self.path, SOCKET)

    @property
    def train_log(self) -> str:
        return os.path.join(self.path, TRAIN_LOG)

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.path, CHECKPOINTS)

    def file(self, name: str) -> str:
        """Another file of the run (test_responses.json, rank-1.log, tensorboard/ ...)."""
        return os.path.join(self.path, name)

    def is_run(self) -> bool:
        """Whether gpt-tui has written a run here (its metrics or its settings)."""
        return os.path.isdir(self.path) and (os.path.exists(self.metrics) or os.path.exists(self.config))

    def saved_config(self) -> dict[str, Any]:
        """The whole ``config.json`` ({} when absent or unreadable)."""
        try:
            with open(self.config, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError):
            return {}
        return d if isinstance(d, dict) else {}

    def train_settings(self) -> dict[str, Any]:
        """The ``train`` settings the run saved ({} when absent)."""
        train = self.saved_config().get("train")
        return train if isinstance(train, dict) else {}

    def last_state(self) -> tuple[str | None, int]:
        """The last recorded state of the run (from metrics.jsonl) and its last step."""
        from .events import read_metrics

        state, step = None, 0
        for rec in read_metrics(self.metrics):
            t = rec.get("type")
            if t == "state":
                state = rec.get("state")
            elif t == "failed":
                state = "failed"
            elif t == "start":
                state = "ready"
            if isinstance(rec.get("step"), int) and t in ("step", "state"):
                step = rec["step"]
        return state, step


def new_run_path(root: str = RUNS_ROOT) -> str:
    """A fresh ``runs/<timestamp>`` path (absolute)."""
    return os.path.abspath(os.path.join(root, time.strftime("%Y%m%d-%H%M%S")))


def run_dir_of(source: str) -> str | None:
    """The run directory of a run directory, or of a checkpoint inside ``RUN/checkpoints/`` (else None)."""
    path = os.path.abspath(source)
    if os.path.isdir(path):
        return path
    parent = os.path.dirname(path)
    if os.path.basename(parent) == CHECKPOINTS:
        return os.path.dirname(parent)
    return None


def run_dir_of_config(out: str | None, resume: str | None) -> str | None:
    """The run directory a training run writes to, when known before setup: ``--out``, else the run
    of the ``--resume`` checkpoint (the folder of a loose ``.pt``), None for a new run without ``--out``."""
    if out:
        return os.path.abspath(out)
    if resume:
        from .checkpoint import resolve_checkpoint

        pt = resolve_checkpoint(resume)
        return run_dir_of(pt) or os.path.dirname(os.path.abspath(pt))
    return None


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of several (torchrun sets WORLD_SIZE); torch-free, so a
    launcher can decide before importing torch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this id exists (ours or another user's)."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
