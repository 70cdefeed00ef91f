"""Live changes as the dashboard shows them: the settings now, chart markers, the history, the
recent window of the charts, and the target row of the stats pane. All from a snapshot."""

from __future__ import annotations

import bisect
from typing import Any

from engine.config import LIVE_SETTINGS, TrainConfig
from engine.events import ChangeEvent
from engine.recorder import Snapshot, StepPoint

from .forecast import target_eta
from .format import fmt_duration, fmt_value

WINDOW_SHARE = 0.2
"""``w``: the charts show the last this share of the steps done so far ..."""
WINDOW_MIN_STEPS = 50
"""... and at least this many steps."""

SHORT = {"lr": "lr", "eval_every": "eval", "sample_every": "sample", "grad_clip": "clip",
         "spike_factor": "spike", "max_bad_steps": "bad", "target_val_loss": "target"}


def changes_since_start(snap: Snapshot) -> list[ChangeEvent]:
    """The changes of the run since it (last) started: later than its start event."""
    start = snap.start
    if start is None:
        return list(snap.changes)
    return [c for c in snap.changes if c.time >= start.time]


def current_config(snap: Snapshot) -> TrainConfig | None:
    """The run's settings now: its start config (which holds the changes a resumed checkpoint
    carried) with the changes since applied in order; None before the run has started."""
    if snap.start is None:
        return None
    cfg = TrainConfig.from_dict(snap.start.config)
    for c in changes_since_start(snap):
        if hasattr(cfg, c.setting):
            setattr(cfg, c.setting, c.new)
    return cfg


def current_settings(snap: Snapshot) -> dict[str, Any]:
    """Each live setting's value now (lr: the peak in use, the preset's when none was given)."""
    cfg = current_config(snap)
    if cfg is None:
        return {}
    out = {name: getattr(cfg, name) for name in LIVE_SETTINGS}
    out["lr"] = cfg.peak_lr()
    return out


def marker_label(c: ChangeEvent, lr_chart: bool = False) -> str:
    """A chart marker's label: ``lr↓`` on the loss chart, the new value (``3e-4``) on the LR chart,
    ``eval 50``, ``clip 0.5``, ``target off`` ..."""
    if c.setting == "lr":
        if lr_chart:
            return fmt_value(c.new)
        try:
            arrow = "↑" if float(c.new) > float(c.old) else "↓"
        except (TypeError, ValueError):
            arrow = ""
        return "lr" + arrow
    return f"{SHORT.get(c.setting, c.setting)} {fmt_value(c.new)}"


def markers(snap: Snapshot, lr_chart: bool = False) -> list[tuple[int, str]]:
    """(step, label) of the changes to mark on a chart (the LR chart marks only lr changes)."""
    return [(c.step, marker_label(c, lr_chart)) for c in changes_since_start(snap)
            if not lr_chart or c.setting == "lr"]


def history_rows(snap: Snapshot) -> list[tuple[str, str, str, str]]:
    """(step, setting, old -> new, source) of every change recorded, oldest first."""
    return [(f"{c.step:,}", c.setting.replace("_", "-"), f"{fmt_value(c.old)} -> {fmt_value(c.new)}", c.source)
            for c in snap.changes]


def window_start(steps: list[StepPoint]) -> int:
    """The first step of the recent window: the last :data:`WINDOW_SHARE` of the steps done
    (at least :data:`WINDOW_MIN_STEPS`)."""
    if not steps:
        return 0
    last = steps[-1].step
    return max(0, last - max(WINDOW_MIN_STEPS, int(WINDOW_SHARE * last)))


def in_window(steps: list[StepPoint], evals: list[Any], marks: list[tuple[int, str]],
              first: int) -> tuple[list[StepPoint], list[Any], list[tuple[int, str]]]:
    """The steps, evals and markers from step ``first`` on."""
    i = bisect.bisect_left([p.step for p in steps], first)
    return steps[i:], [e for e in evals if e.step >= first], [m for m in marks if m[0] >= first]


def target_row(snap: Snapshot, seconds_per_step: float | None) -> tuple[str, str] | None:
    """The stats pane's target row (None when no target is set): the target, then when the
    fitted val curve reaches it, ``reached @step``, or ``-`` (see :mod:`tui.forecast`)."""
    cfg = current_config(snap)
    target = cfg.target_val_loss if cfg is not None else None
    if target is None:
        return None
    start = snap.start
    total = start.total_steps if start is not None else 0
    evals = [(e.step, e.val_loss) for e in snap.evals if start is None or e.time >= start.time or
             e.step <= start.resumed_step]
    f, eta = target_eta(evals, target, total, snap.step, seconds_per_step)
    if f.reached_at is not None:
        when = f"reached @{f.reached_at:,}"
    elif eta is not None and f.step is not None:
        when = f"in {fmt_duration(eta)} (~{f.step:,.0f})"
    else:
        when = "-"
    return "target", f"{target:g} · {when}"
