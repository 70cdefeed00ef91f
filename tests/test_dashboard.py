"""The training dashboard, driven with Textual's Pilot against a real tiny Trainer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.events import StepEvent
from engine.recorder import Recorder
from engine.trainer import EngineOptions, Trainer
from tests.conftest import tiny_config
from tui.app import DashboardApp
from tui.launch import EngineThread
from tui.sample_panel import SamplePanel
from tui.widgets import (
    HelpScreen,
    LossChart,
    LRChart,
    RunClock,
    SamplesPane,
    StatsPane,
    StatusLine,
    downsample,
    ema,
    stats_rows,
)


def make_app(cfg: Any, trainer_cls: type = Trainer, **kw: Any) -> tuple[DashboardApp, Trainer, EngineThread]:
    rec = Recorder()
    trainer = trainer_cls(cfg, rec, options=EngineOptions.interactive())
    engine = EngineThread(trainer, rec)
    app = DashboardApp(trainer, rec, run_dir=cfg.out, engine=engine, **kw)
    return app, trainer, engine


async def until(pilot: Any, cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Let the app run until ``cond()`` holds."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await pilot.pause(0.05)


def text_of(app: DashboardApp, cls: type) -> str:
    return app.query_one(cls).text.plain


def long_run(corpus: Path, tmp_path: Path, **kw: Any) -> Any:
    base = dict(max_steps=100_000, eval_every=0)
    base.update(kw)
    return tiny_config(corpus, tmp_path / "run", **base)


@pytest.fixture
def stop_engine() -> Any:
    """Make sure no engine thread outlives its test, whatever happened in it."""
    started: list[tuple[Trainer, EngineThread]] = []
    yield started.append
    for trainer, engine in started:
        trainer.stop(save=False)
        engine.join(30)
        assert not engine.is_alive()


async def test_pause_stops_stepping_and_resume_continues(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: "RUNNING" in text_of(app, StatusLine) and trainer.step > 2, what="first steps")
        await until(pilot, lambda: "loss       -" not in text_of(app, StatsPane), what="a loss in the stats")

        await pilot.press("p")
        await until(pilot, lambda: trainer.state == "paused", what="paused")
        step = trainer.step
        await until(pilot, lambda: "PAUSED" in text_of(app, StatusLine), what="PAUSED shown")
        await asyncio.sleep(0.4)
        assert trainer.step == step, "the engine stepped while paused"

        await pilot.press("p")
        await until(pilot, lambda: trainer.step > step + 2, what="steps after resume")
        await until(pilot, lambda: "RUNNING" in text_of(app, StatusLine), what="RUNNING shown")


async def test_checkpoint_and_eval_keys(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    ckdir = tmp_path / "run" / "checkpoints"
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 1, what="first steps")
        assert not list(ckdir.glob("*.pt"))
        assert "val loss   -" in text_of(app, StatsPane)

        await pilot.press("c")
        await until(pilot, lambda: list(ckdir.glob("*.pt")), what="checkpoint file")
        saved = list(ckdir.glob("*.pt"))[0]
        await until(pilot, lambda: f"saved checkpoints/{saved.name}" in text_of(app, StatusLine),
                    what="checkpoint path in the status line")

        await pilot.press("e")
        await until(pilot, lambda: app.recorder.snapshot().evals, what="eval event")
        ev = app.recorder.snapshot().evals[-1]
        await until(pilot, lambda: f"@{ev.step}" in text_of(app, StatsPane), what="val loss in stats")
        assert f"{ev.val_loss:.4f}" in text_of(app, StatsPane)


async def test_generate_streams_into_samples_pane(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 1, what="first steps")
        await pilot.press("g")
        assert isinstance(app.screen, SamplePanel), "g opens the sampling panel on the live weights"
        assert app.focused is app.screen.query_one("#sp-prompt")
        app.screen.query_one("#sp-max_new_tokens").value = "12"
        await pilot.press(*"It had", "enter")
        assert isinstance(app.screen, SamplePanel), "Enter generates; only Esc closes"
        step_before = trainer.step
        pane = app.query_one(SamplesPane)
        await until(pilot, lambda: not app.screen.generating, what="generation done in the panel")
        await until(pilot, lambda: "chars" in pane.plain(), what="finished generation in the samples pane")
        entry = pane.plain()
        assert "generate #1" in entry and "It had" in entry and "12 chars" in entry
        generated = entry.split("It had", 1)[1]
        assert len(generated) == 12
        await until(pilot, lambda: trainer.step > step_before, what="training goes on around the generation")

        await pilot.press("escape")
        assert not isinstance(app.screen, SamplePanel)
        assert "It had" in pane.plain(), "prompt and output stay after the prompt closes"

        # while paused too
        await pilot.press("p")
        await until(pilot, lambda: trainer.state == "paused", what="paused")
        paused_at = trainer.step
        await pilot.press("g")
        await pilot.press(*"what", "enter")
        await until(pilot, lambda: not app.screen.generating, what="second generation done")
        await pilot.press("escape")
        await until(pilot, lambda: "generate #2" in pane.plain() and pane.plain().count("chars") == 2,
                    what="second generation while paused")
        assert trainer.step == paused_at
        assert trainer.model.training, "training mode restored after generating"


async def test_generate_rejects_bad_settings(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 0, what="first step")
        await pilot.press("g")
        app.screen.query_one("#sp-temperature").value = "hot"
        await pilot.press(*"It", "enter")
        await pilot.pause(0.2)
        assert "temperature" in app.screen.query_one("#sp-status").content.plain
        assert not app.generations


async def test_help_screen_and_axis_toggle(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    async with app.run_test(size=(120, 40)) as pilot:
        engine.start()
        await until(pilot, lambda: app.query_one(LossChart).steps, what="chart data")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        help_text = app.screen.query_one("#help-box").content.plain
        for key in ("p", "c", "g", "e", "q ", "ctrl+c / ctrl+q", "save a checkpoint and quit"):
            assert key in help_text
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("tab")
        assert isinstance(app.focused, SamplesPane)

        chart = app.query_one(LossChart)
        assert chart.axis == "steps"
        await pilot.press("x")
        assert chart.axis == "tokens" and app.query_one(LRChart).axis == "tokens"
        await pilot.pause(0.1)
        assert "tokens" in str(chart.border_subtitle)
        before = chart.render()
        await pilot.press("y")
        assert chart.log_y
        await pilot.pause(0.1)
        assert "log y" in str(chart.border_subtitle) and str(chart.render()) != str(before)
        await pilot.press("y")
        assert not chart.log_y
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.3)
        assert chart.size.width < 60 and app.query_one(StatsPane).size.height >= 13


@pytest.mark.parametrize("key", ["q", "ctrl+c"])
async def test_quit_saves_a_checkpoint_and_ends_the_thread(key: str, corpus: Path, tmp_path: Path,
                                                           stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 2, what="first steps")
        await pilot.press(key)
        await until(pilot, lambda: not app.is_running, what="app exit")
    engine.join(30)
    assert not engine.is_alive()
    assert app.return_code == 0 and not app.forced
    assert engine.result == "stopped" and engine.error is None
    ckpts = list((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert [p.name for p in ckpts] == [f"step-{trainer.step:08d}.pt"]


async def test_finished_run_stays_open_until_q(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(tiny_config(corpus, tmp_path / "run", max_steps=6))
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: "FINISHED" in text_of(app, StatusLine), what="finished")
        assert "q exits" in text_of(app, StatusLine)
        assert "6/6 (100%)" in text_of(app, StatsPane)
        await pilot.press("p")  # nothing to pause
        assert not trainer.paused
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running, what="app exit")
    engine.join(30)
    assert engine.result == "finished" and app.return_code == 0


class FailingTrainer(Trainer):
    def train_step(self) -> tuple[float, float, bool]:
        if self.step == 3:
            raise RuntimeError("boom in the engine")
        return super().train_step()


async def test_engine_exception_shows_failed_and_q_exits(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    cfg = long_run(corpus, tmp_path, checkpoint_every=2)
    app, trainer, engine = make_app(cfg, FailingTrainer)
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: "FAILED" in text_of(app, StatusLine), what="failed state")
        assert "boom in the engine" in text_of(app, StatusLine)
        pane = app.query_one(SamplesPane).plain()
        assert "run failed at step 3: RuntimeError: boom in the engine" in pane
        assert "step-00000002.pt" in pane, "the last checkpoint is named"
        await pilot.press("c")  # refused: the engine is gone
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running, what="app exit")
    assert isinstance(engine.error, RuntimeError)
    assert (tmp_path / "run" / "checkpoints" / "step-00000002.pt").exists()


async def test_setup_error_closes_the_app(tmp_path: Path, stop_engine: Any) -> None:
    cfg = tiny_config(tmp_path / "missing.txt", tmp_path / "run")
    app, trainer, engine = make_app(cfg)
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: not app.is_running, what="app exit on a setup error")
    assert app.return_code == 1
    assert "does not exist" in str(engine.error)


async def test_viewer_quit_leaves_the_run_going(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    rec = Recorder()
    trainer = Trainer(long_run(corpus, tmp_path), rec, options=EngineOptions.interactive())
    engine = EngineThread(trainer, rec)
    stop_engine((trainer, engine))
    engine.start()
    app = DashboardApp(trainer, rec, owns_engine=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: trainer.step > 1, what="first steps")
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running, what="viewer exit")
    step = trainer.step
    time.sleep(0.3)
    assert engine.is_alive() and not trainer.stopping and trainer.step > step


async def test_read_only_view_sends_no_commands(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path), read_only=True)
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 1, what="first steps")
        await pilot.press("p", "c", "e", "g")
        await pilot.pause(0.3)
        assert not trainer.paused and not isinstance(app.screen, SamplePanel)
        assert trainer.commands.take() == []
        assert "read-only" in text_of(app, StatusLine)


# ---------------------------------------------------------------- pieces


def test_downsample_bounds_points_and_keeps_shape() -> None:
    xs = list(range(100_000))
    ys = [1.0 / (1 + x) for x in xs]
    dx, dy = downsample(xs, ys, 70)
    assert len(dx) == len(dy) == 70
    assert dx[0] < 1000 and dx[-1] > 99_000
    assert all(a >= b for a, b in zip(dy, dy[1:], strict=False))
    assert downsample([1, 2], [3, 4], 70) == ([1, 2], [3, 4])


def test_downsample_keeps_a_spike_and_a_dip() -> None:
    xs = list(range(50_000))
    ys = [2.0] * 50_000
    ys[12_345] = 9.5
    ys[40_001] = 0.25
    dx, dy = downsample(xs, ys, 60)
    assert len(dx) <= 60
    assert max(dy) == 9.5 and dx[dy.index(9.5)] == 12_345
    assert min(dy) == 0.25 and dx[dy.index(0.25)] == 40_001
    assert dx == sorted(dx)


def test_ema_skips_non_finite() -> None:
    out = ema([2.0, float("nan"), 2.0], 0.9)
    assert out == [pytest.approx(2.0)] * 3


async def test_chart_draws_about_its_width_for_a_long_run() -> None:
    """A 100,000-step run is drawn with about one point per column, about as fast as a 100-step one."""
    from textual.app import App

    class One(App):
        def compose(self):  # noqa: ANN202
            yield LossChart("loss", id="loss-chart")

    def history(n: int) -> list[tuple[int, int, float, float]]:
        rec = Recorder()
        for i in range(1, n + 1):
            rec.emit(StepEvent(step=i, epoch=0, loss=4.0 - i / n, lr=1e-3, grad_norm=1.0, tokens_seen=512 * i,
                               tokens_per_sec=1.0, step_time=0.1))
        return rec.snapshot().steps

    long, short = history(100_000), history(100)
    assert len(long) <= rec_points()
    app = One()
    async with app.run_test(size=(80, 20)) as pilot:
        chart = app.query_one(LossChart)
        times = {}
        for name, steps in (("long", long), ("short", short)):
            chart.set_data(steps, [], "steps")
            await pilot.pause(0.05)
            assert len(chart.series(1.0)[0][0]) <= chart.size.width
            t0 = time.perf_counter()
            for _ in range(3):
                chart.render()
            times[name] = (time.perf_counter() - t0) / 3
        assert times["long"] < 3 * times["short"] + 0.03, times


def rec_points() -> int:
    return Recorder().max_points


def test_stats_rows_from_a_snapshot() -> None:
    rec = Recorder()
    clock = RunClock()
    now = time.time()
    for i in range(1, 11):
        rec.emit(StepEvent(step=i, epoch=0, loss=3.0, lr=1e-3, grad_norm=1.0, tokens_seen=i * 100,
                           tokens_per_sec=1000.0, step_time=0.1, time=now + i * 0.1))
        clock.update(rec.snapshot())
    snap = rec.snapshot()
    rows = dict(stats_rows(snap, clock))
    assert rows["loss"].startswith("3.0000")
    assert rows["perplexity"] == "20.1"
    assert rows["step time"] == "100 ms"
    assert rows["tok/s"].startswith("1,000 · avg 1,000")
