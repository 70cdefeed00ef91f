"""What the dashboard shows a newcomer: the footer's keys as they are now, status notes that end,
numbers that agree (epochs, ETA, axes), and a terminal that is too small. Pilot against real parts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from engine.events import RunStarted, StateEvent, StepEvent
from engine.recorder import Recorder
from engine.trainer import EngineOptions, Trainer
from tests import test_dashboard
from tests.conftest import tiny_config
from tests.test_dashboard import long_run, make_app, text_of, until
from tui.app import MIN_SIZE, DashboardApp
from tui.widgets import LossChart, RunClock, StatsPane, StatusLine, epoch_text, stats_rows

stop_engine = test_dashboard.stop_engine  # the fixture that stops every engine thread a test starts


def footer_keys(app: DashboardApp) -> dict[str, str]:
    """What the footer offers now: key -> its word."""
    return {k: b.binding.description for k, b in app.screen.active_bindings.items() if b.binding.show and b.enabled}


async def test_footer_says_resume_while_paused(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 1, what="first steps")
        assert footer_keys(app)["p"] == "pause"
        await pilot.press("p")
        await until(pilot, lambda: trainer.state == "paused", what="paused")
        await until(pilot, lambda: footer_keys(app).get("p") == "resume", what="p resume in the footer")
        await until(pilot, lambda: "(paused)" in text_of(app, StatsPane), what="the ETA marked as paused")
        eta = next(v for k, v in stats_rows(app.snap, app.clock) if k == "ETA")
        await pilot.pause(1.2)
        assert next(v for k, v in stats_rows(app.snap, app.clock) if k == "ETA") == eta, "the ETA stands still"
        await pilot.press("p")  # the footer's resume
        await until(pilot, lambda: trainer.state == "running" and footer_keys(app).get("p") == "pause",
                    what="p pause again")


async def test_a_finished_run_offers_no_pause(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(tiny_config(corpus, tmp_path / "run", max_steps=4))
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: "FINISHED" in text_of(app, StatusLine), what="finished")
        await until(pilot, lambda: "p" not in footer_keys(app), what="no p in the footer")
        assert {"c", "e", "g", "q"} <= set(footer_keys(app))


async def test_read_only_viewer_footer_has_no_commands(corpus: Path, tmp_path: Path) -> None:
    from engine.control import open_run

    t = Trainer(tiny_config(corpus, tmp_path / "run", max_steps=4), None)
    t.setup()
    t.fit()
    controller, rec, read_only = open_run(str(tmp_path / "run"))
    assert read_only
    app = DashboardApp(controller, rec, run_dir=str(tmp_path / "run"), read_only=True, owns_engine=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: "FINISHED" in text_of(app, StatusLine), what="the finished run")
        keys = footer_keys(app)
        assert not {"p", "c", "e", "g"} & set(keys), keys
        assert "q" in keys and "question_mark" in keys
        await pilot.press("question_mark")
        help_text = app.screen.query_one("#help-box").content.plain
        assert "close the viewer (the run goes on)" in help_text
        assert "save a checkpoint" not in help_text and "pause" not in help_text


async def test_viewer_help_shows_the_viewers_keys(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    rec = Recorder()
    trainer = Trainer(long_run(corpus, tmp_path), rec, options=EngineOptions.interactive())
    from tui.launch import EngineThread

    engine = EngineThread(trainer, rec)
    stop_engine((trainer, engine))
    engine.start()
    app = DashboardApp(trainer, rec, owns_engine=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: trainer.step > 1, what="first steps")
        await pilot.press("question_mark")
        await pilot.pause()
        help_text = app.screen.query_one("#help-box").content.plain
        assert "close the viewer (the run goes on)" in help_text
        assert "save a checkpoint and quit" not in help_text
        assert "pause / resume" in help_text  # a live viewer commands the run
        assert max(len(line) for line in help_text.splitlines()) <= 76, "no row cut at 80 columns"
        scroll = app.screen.query_one("#help-scroll")
        assert scroll.region.bottom <= 24 and scroll.max_scroll_y == 0, "the whole key table is on an 80x24 screen"


async def test_status_notes_end_when_the_thing_is_done(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 1, what="first steps")
        await pilot.press("e")  # "eval requested", then its result
        await until(pilot, lambda: "eval step" in text_of(app, StatusLine), what="the eval's result")
        ev = app.recorder.snapshot().evals[-1]
        assert f"val {ev.val_loss:.4f}" in text_of(app, StatusLine)
        await pilot.press("c")
        await until(pilot, lambda: "saved checkpoints/" in text_of(app, StatusLine), what="saved")
        app._note_until = time.monotonic() - 1  # as if NOTE_SECONDS had passed
        await until(pilot, lambda: "saved" not in text_of(app, StatusLine), what="the note leaves")
        await pilot.press("q")
        await until(pilot, lambda: "STOPPING" in text_of(app, StatusLine) or not app.is_running, what="stopping")


def test_quit_notes_fit_80_columns() -> None:
    from tui.widgets import StatusLine as SL

    for state, start in (("running", True), ("finishing", True), ("starting", False)):
        snap = Recorder().snapshot()
        snap.state = state
        if start:
            snap.start = RunStarted(run_dir="runs/20260101-120000", config={}, n_params=1, n_trainable=1,
                                    device="cpu", dtype="fp32", total_steps=10, steps_per_epoch=5)
        line = SL()
        line.show("stopping", "runs/20260101-120000", DashboardApp.quit_note(snap))
        assert len(line.text.plain) <= 80, line.text.plain


async def test_too_small_terminal_shows_a_notice(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 1, what="first steps")
        notice = app.query_one("#too-small")
        assert not notice.display or notice.region.area == 0
        for pane in ("#loss-chart", "#lr-chart", "#stats", "#samples"):
            region = app.query_one(pane).region
            assert region.area and region.right <= 80 and region.bottom <= 24, pane
        for size in ((70, 24), (80, 20), (60, 15)):
            await pilot.resize_terminal(*size)
            await pilot.pause(0.3)
            assert app.query_one("#too-small").region.area, size
            assert f"need {MIN_SIZE[0]}x{MIN_SIZE[1]}" in str(app.query_one("#too-small").render())
            assert not app.query_one("#samples").region.area
            assert not app.screen.vertical_scrollbar.display or not app.screen.show_vertical_scrollbar
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.3)
        assert not app.query_one("#too-small").region.area and app.query_one("#samples").region.area


async def test_first_frame_shows_no_epoch_and_tokens_axis_unit_once(corpus: Path, tmp_path: Path,
                                                                    stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    async with app.run_test(size=(120, 40)) as pilot:
        rows = dict(stats_rows(app.recorder.snapshot(), RunClock()))
        assert rows["epoch"] == "-" and rows["ETA"] == "-"
        engine.start()
        await until(pilot, lambda: trainer.step > 30, what="steps")
        await pilot.press("x")
        await pilot.pause(1.2)
        chart = app.query_one(LossChart)
        chart.render()
        assert "x: tokens" in str(chart.border_subtitle) and "k tokens" not in str(chart.border_subtitle)


def _snap(rec: Recorder, step: int, total: int = 30, spe: int = 10, end_phase_s: float = 0.0) -> Any:
    rec.emit(StepEvent(step=step, epoch=(step - 1) // spe, loss=1.0, lr=1e-3, grad_norm=1.0, tokens_seen=step * 100,
                       tokens_per_sec=100.0, step_time=0.1, end_phase_s=end_phase_s))
    return rec.snapshot()


def test_eta_counts_the_end_phase_and_counts_it_down() -> None:
    rec = Recorder()
    rec.emit(RunStarted(run_dir="r", config={}, n_params=1, n_trainable=1, device="cpu", dtype="fp32", total_steps=30,
                        steps_per_epoch=10))
    rec.emit(StateEvent(state="running"))
    clock = RunClock()
    s1 = _snap(rec, 1)
    object.__setattr__(s1.last_step, "time", 1000.0)
    clock.update(s1, now=1000.0)
    s2 = _snap(rec, 11, end_phase_s=50.0)
    object.__setattr__(s2.last_step, "time", 1010.0)
    clock.update(s2, now=1010.0)
    assert clock.eta(s2) == 19 * 1.0 + 50.0  # 10 steps took 10 s: 19 to go, then the end phase
    rec.emit(StateEvent(state="finishing"))
    s3 = rec.snapshot()
    clock.update(s3, now=1030.0)
    clock.update(s3, now=1040.0)
    assert clock.eta(s3) == 40.0 and "end of run" in clock.eta_text(s3)


def test_epochs_agree_between_events_stats_and_timeline(corpus: Path, tmp_path: Path) -> None:
    from engine.inspect_tokens import recorded_samples
    from tui.sample_views import _entry_widget
    from tui.widgets import sample_text

    rec = Recorder()
    t = Trainer(tiny_config(corpus, tmp_path / "run", epochs=2, max_steps=None, sample_every="epoch",
                            checkpoint_every=7, keep_last=10), rec)
    t.setup()
    t.fit()
    snap = rec.snapshot()
    spe = t.steps_per_epoch
    assert [s.step for s in snap.samples][:2] == [spe, 2 * spe] or snap.samples[-1].step == 2 * spe
    for s in snap.samples:
        shown = epoch_text(s.step, spe, t.total_steps).split("/")[0]
        assert s.epoch == t.epoch_of_step(s.step) and int(shown) == s.epoch + 1
        assert f"epoch {shown}" in sample_text(s.step, s.epoch, s.prompt, s.text).plain
    rows = dict(stats_rows(snap, RunClock()))
    assert rows["epoch"] == "2/2"
    for e in recorded_samples(str(tmp_path / "run")):
        widget = _entry_widget(e)
        assert f"epoch {epoch_text(e.step, spe, t.total_steps).split('/')[0]}" in widget.content.plain
    import json

    for meta in (tmp_path / "run" / "checkpoints").glob("*.meta.json"):
        m = json.loads(meta.read_text())
        assert m["epoch"] == t.epoch_of_step(m["step"])


def test_samples_pane_shows_empty_responses() -> None:
    from tui.format import EMPTY_RESPONSE
    from tui.widgets import sample_text

    for empty in ("", "  \n"):
        t = sample_text(5, 0, "Name a fruit.", empty, expected="apple")
        assert f"→ {EMPTY_RESPONSE}" in t.plain and "expected: apple" in t.plain
    assert EMPTY_RESPONSE not in sample_text(5, 0, "Name a fruit.", "A pear.", expected="apple").plain


async def test_stats_show_the_learning_rate_at_80x24(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path, lr=3e-3))
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 1, what="first steps")
        await pilot.pause(0.6)
        pane = app.query_one(StatsPane)
        shown = pane.text.plain.splitlines()[: pane.content_region.height]
        lr_row = next((line for line in shown if line.startswith("lr ")), None)
        assert lr_row is not None and "(peak 0.003)" in lr_row, shown
        trainer.change("lr", "1e-3")  # as `s` or `gpt-tui set` would
        await until(pilot, lambda: "(peak 0.001)" in pane.text.plain, what="the new peak")


def test_the_dashboard_draws_its_first_frame_without_torch(tmp_path: Path) -> None:
    """`gpt-tui train` starts the app first and lets the engine thread import torch: the app, the launcher
    and a drawn frame of the dashboard need no torch (it took 4-7 s to import on a newcomer's laptop)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import asyncio, sys
        from engine.commands import LocalCommands
        from engine.config import TrainConfig
        from engine.recorder import Recorder
        from tui.app import DashboardApp
        from tui.launch import StartingRun
        from tui.widgets import StatusLine

        async def main():
            run = StartingRun(TrainConfig(out={str(tmp_path / "run")!r}), LocalCommands(), None)
            app = DashboardApp(run, Recorder(), run_dir={str(tmp_path / "run")!r})
            async with app.run_test(size=(80, 24)) as pilot:
                await pilot.pause(0.2)
                print("STATUS", app.query_one(StatusLine).text.plain)
                await pilot.press("p")  # a key before the trainer exists goes to the run's commands
                print("PAUSED", run.paused)
        asyncio.run(main())
        print("TORCH", "torch" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "STATUS  STARTING" in r.stdout and "PAUSED True" in r.stdout
    assert "TORCH False" in r.stdout, r.stdout
