"""When will the val loss reach the target? An estimate from the evals so far.

The val loss of a language model falls roughly linearly in log(step) over a stretch of training,
so the last few evals are fitted with least squares to ``loss = a + b * ln(step)`` and the line is
followed down to the target. No estimate (None) while it cannot be made honestly: fewer than
:data:`MIN_EVALS` evals, a curve that is not falling (``b >= 0``), or a crossing beyond the run's
last step. The step found becomes a duration at the run's current seconds per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_EVALS = 3
"""Evals needed before an estimate."""
FIT_EVALS = 6
"""How many of the latest evals the line is fitted to (the recent slope is what continues)."""


@dataclass(frozen=True)
class TargetForecast:
    """Where the fitted val curve meets the target."""

    reached_at: int | None = None
    """The step of the first eval at or below the target (then nothing is estimated)."""
    step: float | None = None
    """The estimated step at which the val loss reaches the target (None: no estimate)."""
    why: str = ""
    """Why there is no estimate: 'evals' (too few), 'rising', 'beyond the end'."""


def fit_log_line(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares ``(a, b)`` of ``y = a + b * ln(x)`` through ``(x, y)`` points with x > 0."""
    pts = [(math.log(x), y) for x, y in points if x > 0 and math.isfinite(y)]
    n = len(pts)
    if n < 2:
        return None
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx <= 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return my - b * mx, b


def forecast_target(evals: Sequence[tuple[int, float]], target: float, total_steps: int) -> TargetForecast:
    """Where ``evals`` ((step, val loss), in step order) will reach ``target`` before ``total_steps``."""
    for step, loss in evals:
        if loss <= target:
            return TargetForecast(reached_at=step)
    recent = [(s, v) for s, v in evals if s > 0][-FIT_EVALS:]
    if len(recent) < MIN_EVALS:
        return TargetForecast(why="evals")
    fit = fit_log_line(recent)
    if fit is None or fit[1] >= 0:
        return TargetForecast(why="rising")
    a, b = fit
    exponent = (target - a) / b
    if exponent > math.log(max(total_steps, 1)):  # also keeps exp() from overflowing
        return TargetForecast(why="beyond the end")
    return TargetForecast(step=max(math.exp(exponent), float(recent[-1][0])))


def target_eta(evals: Sequence[tuple[int, float]], target: float, total_steps: int, step: int,
               seconds_per_step: float | None) -> tuple[TargetForecast, float | None]:
    """The forecast and the seconds from ``step`` until it (None when either is unknown)."""
    f = forecast_target(evals, target, total_steps)
    if f.step is None or seconds_per_step is None or seconds_per_step <= 0:
        return f, None
    return f, max(0.0, f.step - step) * seconds_per_step
