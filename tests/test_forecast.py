"""The target ETA: the val-curve fit on synthetic curves, and the stats pane's target row."""

from __future__ import annotations

import math
import random

import pytest

from engine.config import TrainConfig
from engine.events import ChangeEvent, EvalEvent, RunStarted, StepEvent
from engine.recorder import Recorder
from tui.forecast import fit_log_line, forecast_target, target_eta
from tui.live import target_row
from tui.widgets import RunClock, stats_rows


def curve(f, steps) -> list[tuple[int, float]]:
    return [(s, f(s)) for s in steps]


def test_a_log_linear_curve_is_followed_exactly() -> None:
    evals = curve(lambda s: 3.0 - 0.4 * math.log(s), range(100, 301, 100))
    a, b = fit_log_line(evals)
    assert a == pytest.approx(3.0) and b == pytest.approx(-0.4)
    f, eta = target_eta(evals, 0.5, 1000, step=310, seconds_per_step=0.1)
    assert f.step == pytest.approx(math.exp(2.5 / 0.4))  # 518
    assert eta == pytest.approx((math.exp(2.5 / 0.4) - 310) * 0.1)


def test_an_exponential_decay_is_estimated_near_its_crossing() -> None:
    evals = curve(lambda s: 1.5 + 2.0 * math.exp(-s / 400), range(100, 601, 100))
    truth = 400 * math.log(5)  # 2 e^(-s/400) = 0.4
    f = forecast_target(evals, 1.9, 5000)
    assert f.step == pytest.approx(truth, rel=0.1)


def test_a_flattening_power_law_is_estimated_early_within_a_factor_of_two() -> None:
    """The log fit cannot see a curve flatten faster than log(step): it is optimistic there."""
    evals = curve(lambda s: 1.2 + 8 * s ** -0.5, range(200, 1201, 200))
    f = forecast_target(evals, 1.2 + 8 * 2000 ** -0.5, 10_000)
    assert 1000 < f.step < 2000


def test_only_the_latest_evals_are_fitted() -> None:
    """A run whose lr was cut: the early, steep part no longer says how fast it goes."""
    early = curve(lambda s: 6.0 - 0.8 * math.log(s), range(10, 60, 10))
    late = curve(lambda s: 3.0 - 0.2 * math.log(s), range(100, 700, 100))
    f = forecast_target(early + late, 1.5, 100_000)
    assert f.step == pytest.approx(math.exp(1.5 / 0.2), rel=1e-6)


def test_noisy_falling_curve_gives_a_finite_estimate() -> None:
    rng = random.Random(0)
    evals = curve(lambda s: 3.0 - 0.3 * math.log(s) + rng.gauss(0, 0.01), range(50, 501, 50))
    f = forecast_target(evals, 0.9, 10_000)
    assert f.step == pytest.approx(math.exp(2.1 / 0.3), rel=0.2)


@pytest.mark.parametrize(("evals", "why"), [
    ([], "evals"),
    ([(100, 2.0), (200, 1.9)], "evals"),  # fewer than 3
    ([(100, 1.8), (200, 1.9), (300, 2.0)], "rising"),
    ([(100, 1.8), (200, 1.8), (300, 1.8)], "rising"),  # flat
    (curve(lambda s: 3.0 - 0.4 * math.log(s), range(100, 301, 100)), "beyond the end"),  # 518 > 400 steps
])
def test_no_estimate(evals: list[tuple[int, float]], why: str) -> None:
    f, eta = target_eta(evals, 0.5, 400, step=300, seconds_per_step=0.1)
    assert f.step is None and f.why == why and eta is None


def test_reached_is_said_with_the_first_eval_at_or_below() -> None:
    f, eta = target_eta([(100, 2.0), (200, 1.5), (300, 1.4)], 1.5, 1000, 300, 0.1)
    assert f.reached_at == 200 and eta is None


def test_no_seconds_per_step_no_duration() -> None:
    f, eta = target_eta(curve(lambda s: 3.0 - 0.4 * math.log(s), range(100, 301, 100)), 0.5, 1000, 300, None)
    assert f.step is not None and eta is None


def _snapshot(target: float | None, vals: list[tuple[int, float]], changes: list[tuple[int, float | None]] = ()):
    rec = Recorder()
    cfg = TrainConfig(target_val_loss=target, max_steps=1000)
    rec.emit(RunStarted(run_dir="/r", config=cfg.to_dict(), n_params=1, device="cpu", dtype="fp32",
                        total_steps=1000, steps_per_epoch=100, time=1000.0))
    for i, (s, v) in enumerate(vals):
        rec.emit(StepEvent(step=s, epoch=0, loss=v, lr=1e-3, grad_norm=1.0, tokens_seen=64 * s, tokens_per_sec=1.0,
                           step_time=0.05, time=1000.0 + s * 0.05))
        rec.emit(EvalEvent(step=s, train_loss=v, val_loss=v, time=1000.0 + s * 0.05 + i * 1e-6))
        for at, new in changes:
            if at == s:
                rec.emit(ChangeEvent(step=s, setting="target_val_loss", old=target, new=new, source="shell",
                                     time=1000.0 + s * 0.05 + 1e-3))
    return rec.snapshot()


def test_target_row_follows_live_changes_of_the_target() -> None:
    vals = curve(lambda s: 3.0 - 0.4 * math.log(s), range(100, 301, 100))
    assert target_row(_snapshot(None, vals), 0.05) is None
    label, value = target_row(_snapshot(0.5, vals), 0.05)
    assert label == "target" and value == "0.5 · in 10s (~518)"  # (518 - 300) steps x 0.05 s = 10.9 s
    assert target_row(_snapshot(0.5, vals[:2]), 0.05) == ("target", "0.5 · -")
    assert target_row(_snapshot(0.5, vals, [(200, 1.0)]), 0.05) == ("target", "1 · reached @200")
    assert target_row(_snapshot(0.5, vals, [(200, None)]), 0.05) is None  # target-val-loss=off


def test_stats_pane_shows_the_target_after_the_eta() -> None:
    snap = _snapshot(0.5, curve(lambda s: 3.0 - 0.4 * math.log(s), range(100, 301, 100)))
    clock = RunClock()
    clock.update(snap)
    labels = [label for label, _ in stats_rows(snap, clock)]
    assert labels[labels.index("ETA") + 1] == "target"
