"""The divergence guard: non-finite steps and loss spikes, with the state a checkpoint keeps."""

from __future__ import annotations

from collections import deque
from typing import Any

from .config import TrainConfig


class DivergenceGuard:
    """Watches each step's loss; :meth:`check` says why a run diverged (None while it has not).

    A non-finite step is skipped by the trainer before the weights change; ``max_bad_steps`` of
    them in a row count as divergence. With ``spike_factor`` > 0, a loss above that many times
    the mean of the last 50 does too (once 20 are known).
    """

    def __init__(self) -> None:
        self.recent: deque[float] = deque(maxlen=50)
        self.bad_steps = 0

    def check(self, step: int, loss: float, skipped: bool, cfg: TrainConfig) -> str | None:
        """The reason the run diverged at ``step`` under ``cfg``'s limits (they may change live), or None."""
        if skipped:
            self.bad_steps += 1
            if self.bad_steps >= cfg.max_bad_steps:
                return f"{self.bad_steps} non-finite steps in a row at step {step}"
            return None
        self.bad_steps = 0
        reason = None
        if cfg.spike_factor > 0 and len(self.recent) >= 20:
            mean = sum(self.recent) / len(self.recent)
            if loss > cfg.spike_factor * mean:
                reason = f"loss {loss:.3f} at step {step} is over {cfg.spike_factor:g}x its recent mean {mean:.3f}"
        self.recent.append(loss)
        return reason

    @property
    def last_loss(self) -> float | None:
        return self.recent[-1] if self.recent else None

    def state(self) -> dict[str, Any]:
        return {"recent_losses": list(self.recent), "bad_steps": self.bad_steps}

    def load(self, state: dict[str, Any]) -> None:
        self.recent.extend(state.get("recent_losses", []))
        self.bad_steps = int(state.get("bad_steps", 0))


def target_reached(target: float | None, val_loss: float, step: int, total_steps: int) -> str | None:
    """What to say when an eval reaches ``--target-val-loss`` before the run's end (None: it has not)."""
    if target is None or val_loss > target or step >= total_steps:
        return None
    return f"target val loss {target:g} reached at step {step} (val loss {val_loss:.4f})"
