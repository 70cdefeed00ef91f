"""Steering a run from the dashboard (Pilot, a real tiny Trainer): + / -, the settings form, the
history, chart markers, the recent window, bits per byte, the system pane, screenshots, the palette."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.command import CommandPalette
from textual.widgets import Input

from engine.events import read_metrics
from engine.trainer import Trainer
from tests.test_dashboard import long_run, make_app, text_of, until
from tui.launch import EngineThread
from tui.live import markers, window_start
from tui.steer import ChangesScreen, SettingsScreen
from tui.system import SystemPane
from tui.widgets import LossChart, LRChart, StatsPane, StatusLine


@pytest.fixture
def stop_engine() -> Any:
    """No engine thread outlives its test."""
    started: list[tuple[Trainer, EngineThread]] = []
    yield started.append
    for trainer, engine in started:
        trainer.stop(save=False)
        engine.join(30)
        assert not engine.is_alive()


def changes_of(run: Path) -> list[dict]:
    return [r for r in read_metrics(str(run / "metrics.jsonl")) if r["type"] == "change"]


async def test_plus_and_minus_scale_the_peak_lr_and_mark_the_charts(corpus: Path, tmp_path: Path,
                                                                    stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path, lr=1e-3, warmup_steps=0, min_lr=1e-3))
    stop_engine((trainer, engine))
    async with app.run_test(size=(100, 30)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 3, what="first steps")
        await pilot.press("plus")
        await until(pilot, lambda: len(trainer.changes) == 1, what="lr x2 applied")
        assert trainer.cfg.lr == 2e-3 and trainer.changes[0].old == 1e-3 and trainer.changes[0].source == "dashboard"
        await until(pilot, lambda: "lr 1e-3 -> 2e-3" in text_of(app, StatusLine), what="the change in the status line")
        at = trainer.changes[0].step
        await until(pilot, lambda: trainer.step > at + 2, what="steps at the new lr")
        lrs = {r["step"]: r["lr"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if r["type"] == "step"}
        # from the step after the boundary it was applied at (the cosine decay over 100,000 steps is tiny)
        assert lrs[at] == pytest.approx(1e-3, rel=1e-6) and lrs[at + 1] == pytest.approx(2e-3, rel=1e-6)

        await pilot.press("minus", "minus")  # pressed together: each halves what the one before left
        await until(pilot, lambda: len(trainer.changes) == 3, what="two halvings")
        assert trainer.cfg.lr == 5e-4
        snap = app.recorder.snapshot()
        assert [label for _, label in markers(snap)] == ["lr↑", "lr↓", "lr↓"]
        assert [label for _, label in markers(snap, lr_chart=True)] == ["2e-3", "1e-3", "5e-4"]

        # the markers are drawn: a vertical line and the label at the change's step
        loss, lr = app.query_one(LossChart), app.query_one(LRChart)
        await until(pilot, lambda: len(loss.markers) == 3 and len(lr.markers) == 3, what="markers on the charts")
        await pilot.pause(0.2)
        drawn = str(loss.render())
        assert "lr↓" in drawn and "│" in drawn  # the newest label is kept where labels would overlap
        assert "5e-4" in str(lr.render())
        assert [r["setting"] for r in changes_of(tmp_path / "run")] == ["lr", "lr", "lr"]


async def test_settings_form_applies_good_values_and_refuses_bad_ones(corpus: Path, tmp_path: Path,
                                                                      stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path, eval_every=0, lr=1e-3))
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 1, what="first steps")
        await pilot.press("s")
        assert isinstance(app.screen, SettingsScreen)
        form = app.screen
        # prefilled with the run's values now
        assert form.query_one("#set-lr", Input).value == "1e-3"
        assert form.query_one("#set-eval_every", Input).value == "0"
        assert form.query_one("#set-target_val_loss", Input).value == "off"
        assert app.focused is form.query_one("#set-lr", Input)

        # a refused value: one line in the form, nothing sent (not even the good field)
        form.query_one("#set-lr", Input).value = "3e-4"
        form.query_one("#set-grad_clip", Input).value = "-1"
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert isinstance(app.screen, SettingsScreen)
        said = form.query_one("#set-status").content.plain
        assert said.startswith("grad-clip must be 0 or more, got -1") and "\n" not in said
        assert trainer.changes == [] and trainer.queued_changes() == []

        # good values: applied at the next step, form closed, the status line says so
        form.query_one("#set-grad_clip", Input).value = "0.5"
        form.query_one("#set-eval_every", Input).value = "7"
        await pilot.press("enter")
        assert not isinstance(app.screen, SettingsScreen)
        await until(pilot, lambda: len(trainer.changes) == 3, what="three changes applied")
        assert {(c.setting, c.new) for c in trainer.changes} == {("lr", 3e-4), ("grad_clip", 0.5), ("eval_every", 7)}
        assert trainer.cfg.lr == 3e-4 and trainer.cfg.grad_clip == 0.5 and trainer.cfg.eval_every == 7
        await until(pilot, lambda: any(e.step % 7 == 0 for e in app.recorder.snapshot().evals), what="evals every 7")

        # opened again, it shows the values now; Esc closes without sending anything
        await pilot.press("s")
        assert app.screen.query_one("#set-lr", Input).value == "3e-4"
        assert app.screen.query_one("#set-eval_every", Input).value == "7"
        await pilot.press("escape")
        assert not isinstance(app.screen, SettingsScreen) and len(trainer.changes) == 3


async def test_history_lists_every_change(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path, lr=1e-3))
    stop_engine((trainer, engine))
    async with app.run_test(size=(100, 30)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 1, what="first steps")
        await pilot.press("h")
        assert isinstance(app.screen, ChangesScreen)
        assert "no live changes yet" in app.screen.query_one("#changes-table").content.plain
        await pilot.press("escape")
        trainer.change("eval-every", "25", source="shell")  # as `gpt-tui set` would
        await pilot.press("minus")
        await until(pilot, lambda: len(app.recorder.snapshot().changes) == 2, what="two changes recorded")
        await pilot.press("h")
        table = app.screen.query_one("#changes-table").content.plain.splitlines()
        steps = [c.step for c in trainer.changes]
        assert table[0].split() == ["step", "setting", "old", "->", "new", "source"]
        assert table[1].split() == [f"{steps[0]:,}", "eval-every", "0", "->", "25", "shell"]
        assert table[2].split() == [f"{steps[1]:,}", "lr", "1e-3", "->", "5e-4", "dashboard"]
        await pilot.press("h")
        assert not isinstance(app.screen, ChangesScreen)


async def test_window_bpb_and_target_row(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path, eval_every=20, target_val_loss=0.01))
    stop_engine((trainer, engine))
    async with app.run_test(size=(120, 40)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 130, what="steps")
        await until(pilot, lambda: len(app.recorder.snapshot().evals) >= 2, what="evals")
        await pilot.pause(1.1)
        chart = app.query_one(LossChart)
        assert chart.steps[0].step == 1 and chart.title_note == ""
        await pilot.press("w")
        last = chart.steps[-1].step  # the last 20% of the steps done when it was drawn
        first = last - max(50, last // 5)
        assert first > 50 and first == window_start(chart.steps)
        assert chart.steps[0].step == first and app.query_one(LRChart).steps[0].step == first
        assert all(e.step >= first for e in chart.evals)
        await pilot.pause(0.1)
        assert "last 20%" in str(chart.border_title)
        await pilot.press("w")
        assert chart.steps[0].step == 1

        # b: val loss in bits per byte, on the chart and in the stats
        ev = app.recorder.snapshot().evals[-1]
        assert ev.val_bpb is not None and ev.val_bpb != ev.val_loss
        before = str(chart.render())
        await pilot.press("b")
        await pilot.pause(0.1)
        assert chart.bpb and "bits per byte" in str(chart.border_title) and str(chart.render()) != before
        await until(pilot, lambda: "val bpb" in text_of(app, StatsPane), what="val bpb in the stats")
        await pilot.press("b")
        await until(pilot, lambda: "val loss" in text_of(app, StatsPane), what="val loss back")

        # the target row: set at start; 0.01 is far beyond what the fitted curve reaches in the run
        rows = dict(line.split(None, 1) for line in text_of(app, StatsPane).splitlines() if line.strip())
        assert rows["target"].startswith("0.01 · ")


async def test_system_pane_toggles_and_samples(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 3, what="first steps")
        pane = app.query_one(SystemPane)
        assert not pane.display  # 24 rows: no room by itself
        await pilot.press("m")
        assert pane.display
        await until(pilot, lambda: "data wait" in pane.text.plain and "ms" in pane.text.plain, what="system rows")
        await until(pilot, lambda: "%" in pane.text.plain.splitlines()[0], what="a CPU percentage")
        text = pane.text.plain
        assert "threads" in text and "RSS" in text and "RAM free" in text and " of " in text
        assert "GPU" not in text  # a CPU run
        await pilot.press("m")
        assert not pane.display
        await pilot.resize_terminal(120, 44)  # tall enough: m's choice still holds
        await pilot.pause(0.2)
        assert not pane.display


async def test_system_pane_shows_itself_in_a_tall_terminal(corpus: Path, tmp_path: Path, stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    async with app.run_test(size=(120, 44)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 1, what="first steps")
        pane = app.query_one(SystemPane)
        assert pane.display
        await until(pilot, lambda: "CPU" in pane.text.plain, what="system rows")
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.2)
        assert not pane.display


async def test_ctrl_s_saves_an_svg_into_the_run_dir_and_ctrl_p_opens_the_palette(corpus: Path, tmp_path: Path,
                                                                                  stop_engine: Any) -> None:
    app, trainer, engine = make_app(long_run(corpus, tmp_path))
    stop_engine((trainer, engine))
    run = tmp_path / "run"
    async with app.run_test(size=(80, 24)) as pilot:
        engine.start()
        await until(pilot, lambda: "RUNNING" in text_of(app, StatusLine), what="first steps shown")
        await pilot.press("ctrl+s")
        await until(pilot, lambda: list(run.glob("*.svg")), what="an SVG in the run dir")
        svg = list(run.glob("*.svg"))[0]
        assert svg.name.startswith("screenshot-step") and not svg.name.startswith("screenshot-step000000")
        assert svg.read_text().lstrip().startswith("<svg") and "RUNNING" in svg.read_text().replace("&#160;", " ")
        await until(pilot, lambda: f"screenshot {svg.name}" in text_of(app, StatusLine), what="its path said")

        await pilot.press("ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette), what="the command palette")
        await pilot.press(*"theme")
        await pilot.pause(0.3)
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, CommandPalette), what="palette closed")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Theme" in titles and titles.count("Screenshot") == 1 and "Settings" in titles
        # p still pauses: the palette takes no key but ctrl+p
        await pilot.press("p")
        await until(pilot, lambda: trainer.state == "paused", what="paused")


async def test_a_last_poll_while_the_app_closes_does_nothing(corpus: Path, tmp_path: Path) -> None:
    """The poll timer may tick once more after the app's panes are removed at exit: no error then."""
    app, _, _ = make_app(long_run(corpus, tmp_path))
    async with app.run_test(size=(80, 24)):
        for pane in app.query(StatsPane):  # the stats and system panes
            await pane.remove()
        app._version = -1  # a new snapshot to draw
        app.poll()
