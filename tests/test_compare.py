"""``gpt-tui compare`` (a chart, a legend and a table of several runs; --svg) and the dashboard's overlay (o)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from engine.trainer import Trainer
from tests.conftest import run_cli, tiny_config
from tests.test_dashboard import make_app, stop_engine, text_of, until  # noqa: F401  (stop_engine: a fixture)
from tui.compare import (
    PALETTE_16,
    PALETTE_256,
    CompareApp,
    Comparison,
    OverlayPicker,
    RunCurves,
    differing_settings,
    resolve_runs,
)
from tui.widgets import LossChart, StatusLine

LRS = ("1e-3", "3e-3", "1e-2")


def train(corpus: Path, out: Path, **kw) -> Path:
    """A finished tiny run in ``out`` (in this process)."""
    t = Trainer(tiny_config(corpus, out, **kw))
    t.setup()
    assert t.fit() == "finished"
    return out


@pytest.fixture
def three_runs(corpus: Path, tmp_path: Path) -> list[Path]:
    """Three finished tiny runs under tmp/runs that differ only in --lr."""
    return [train(corpus, tmp_path / "runs" / f"lr-{lr}", lr=float(lr), max_steps=24, eval_every=6) for lr in LRS]


# ------------------------------------------------------------------ reading runs


def test_curves_follow_a_growing_file_and_skip_a_torn_line(three_runs: list[Path], tmp_path: Path) -> None:
    src = three_runs[0] / "metrics.jsonl"
    lines = src.read_text().splitlines(keepends=True)
    run = tmp_path / "growing"
    run.mkdir()
    shutil.copy(three_runs[0] / "config.json", run / "config.json")
    metrics = run / "metrics.jsonl"
    half = len(lines) // 2
    metrics.write_text("".join(lines[:half]))

    curves = RunCurves(str(run))
    assert curves.update()
    n_steps = len(curves.steps)
    assert 0 < n_steps < 24 and curves.settings["lr"] == 1e-3
    assert not curves.update()  # nothing new

    torn = lines[half]
    with metrics.open("a") as f:
        f.write(torn[: len(torn) // 2])  # a line being written
    assert not curves.update()
    with metrics.open("a") as f:
        f.write(torn[len(torn) // 2:] + "".join(lines[half + 1:]))
    assert curves.update()
    whole = RunCurves(str(three_runs[0]))
    whole.update()
    assert (curves.steps, curves.losses, curves.val_losses) == (whole.steps, whole.losses, whole.val_losses)
    assert curves.steps == list(range(1, 25)) and curves.state == "finished" and curves.total == 24


def test_a_resumed_run_keeps_the_steps_after_its_checkpoint_once(three_runs: list[Path]) -> None:
    run = three_runs[0]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    start = dict(recs[0], resumed_from="checkpoints/step-00000012.pt", resumed_step=12)
    again = [r for r in recs if r.get("type") in ("step", "eval") and r["step"] > 12]
    with (run / "metrics.jsonl").open("a") as f:
        for r in [start, *again]:
            f.write(json.dumps(r) + "\n")
    curves = RunCurves(str(run))
    curves.update()
    assert curves.steps == list(range(1, 25))
    assert curves.eval_steps == sorted(set(curves.eval_steps))


def test_the_settings_that_differ(three_runs: list[Path]) -> None:
    views = Comparison([str(p) for p in three_runs]).read(force=True)
    assert views is not None
    assert differing_settings([v.settings for v in views]) == ["lr"]  # out always differs and is left out
    assert [v.name for v in views] == [f"lr-{lr}" for lr in LRS]
    assert len({v.color for v in views}) == 3
    f = views[0].figures
    assert f.state == "finished" and f.step == f.total == 24 and f.tokens > 0
    assert f.best_val is not None and f.best_step in (6, 12, 18, 24) and f.train is not None


def test_eight_runs_get_eight_colours_and_more_change_the_marker() -> None:
    c = Comparison([f"/r{i}" for i in range(10)])
    styles = [c.style(i) for i in range(10)]
    assert len({col for col, _ in styles[:8]}) == 8 and len(set(PALETTE_16)) == len(PALETTE_256) == 8
    assert styles[8][0] == styles[0][0] and styles[8][1] != styles[0][1]


def test_resolve_runs_takes_runs_and_folders(three_runs: list[Path], tmp_path: Path) -> None:
    by_name = sorted(map(str, three_runs))
    assert resolve_runs([str(tmp_path / "runs")]) == by_name
    both = resolve_runs([str(three_runs[1]), str(tmp_path / "runs")])  # a run named twice is compared once
    assert both == [str(three_runs[1])] + [p for p in by_name if p != str(three_runs[1])]


# ------------------------------------------------------------------ the command


def test_svg_names_the_runs(three_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp.svg"
    r = run_cli("compare", *map(str, three_runs), "--svg", str(out), "--size", "100x30")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} (3 runs)" in r.stdout
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    text = "".join(root.itertext()).replace("\xa0", " ")
    for lr in LRS:
        assert f"lr-{lr}" in text
    assert "best val" in text and "x: steps" in text


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = {
        str(tmp_path / "empty"): "no runs under",
        str(tmp_path / "file.txt"): "is not a run directory",
        str(tmp_path / "absent"): "is not a run directory (it does not exist)",
    }
    for arg, said in cases.items():
        r = run_cli("compare", arg, "--svg", str(tmp_path / "x.svg"))
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpt-tui: error: ") and said in lines[0], r.stderr
        assert not (tmp_path / "x.svg").exists()


def test_no_terminal_says_to_use_svg(three_runs: list[Path]) -> None:
    r = run_cli("compare", str(three_runs[0]))  # stdin and stderr are pipes here
    assert r.returncode != 0
    assert r.stderr.strip() == ("gpt-tui: error: compare needs a terminal to draw on: run it in a terminal, "
                                "or write a picture with --svg FILE")


# ------------------------------------------------------------------ the screen (Pilot)


async def test_compare_screen_follows_a_run_that_grows(three_runs: list[Path], tmp_path: Path) -> None:
    grow = tmp_path / "runs2" / "growing"
    grow.mkdir(parents=True)
    shutil.copy(three_runs[2] / "config.json", grow / "config.json")
    lines = (three_runs[2] / "metrics.jsonl").read_text().splitlines(keepends=True)
    (grow / "metrics.jsonl").write_text("".join(lines[:5]))
    app = CompareApp([str(three_runs[0]), str(grow)])
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert [v.name for v in app.views] == ["lr-1e-3", "growing"]
        first = app.views[1].figures.step
        assert first < 24 and app.views[1].figures.state == "dead"  # never finished, no process
        (grow / "metrics.jsonl").write_text("".join(lines))
        await until(pilot, lambda: app.views[1].figures.step == 24, timeout=10, what="the new lines read")
        assert app.views[1].figures.state == "finished"
        chart = app.query_one("#chart")
        assert "x: steps" in str(chart.border_subtitle)
        await pilot.press("x")
        assert "tokens" in str(chart.border_subtitle)


# ------------------------------------------------------------------ the dashboard's overlay


async def test_o_overlays_another_run_and_clears_it(corpus: Path, tmp_path: Path, stop_engine) -> None:  # noqa: F811
    other = train(corpus, tmp_path / "runs" / "reference", max_steps=30, eval_every=10)
    cfg = tiny_config(corpus, tmp_path / "runs" / "live", max_steps=100_000, eval_every=0)
    app, trainer, engine = make_app(cfg)
    stop_engine((trainer, engine))
    async with app.run_test(size=(100, 30)) as pilot:
        engine.start()
        await until(pilot, lambda: trainer.step > 40, what="the live run passing the reference's steps")
        chart = app.query_one(LossChart)
        assert chart.extra == []

        await pilot.press("o")
        await until(pilot, lambda: isinstance(app.screen, OverlayPicker), what="the picker")
        picker = app.screen
        assert picker.paths == [str(other)]  # the run itself is not offered
        await pilot.press("enter")
        await until(pilot, lambda: len(chart.extra) == 2, what="the overlay's curves")
        train_line, val = chart.extra
        assert list(train_line.steps) == list(range(1, 31)) and list(val.steps) == [10, 20, 30]
        assert "reference" in chart.extra_label and "reference" in str(chart.border_subtitle)
        assert "RUNNING" in text_of(app, StatusLine)

        await pilot.press("o")
        await until(pilot, lambda: isinstance(app.screen, OverlayPicker), what="the picker again")
        await pilot.press("enter")  # the first entry now: none (clear the overlay)
        await until(pilot, lambda: chart.extra == [], what="the overlay cleared")
        assert "reference" not in str(chart.border_subtitle)


# ------------------------------------------------------------------ in a real terminal (tmux)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_compare_in_tmux(three_runs: list[Path], tmp_path: Path, size: tuple[int, int]) -> None:
    from tests.test_tmux_dashboard import Terminal

    term = Terminal(f"gpt-tui-compare-{size[0]}", *size)
    env = f"TERM=xterm-256color PYTHONPATH={os.environ.get('PYTHONPATH', '')}"
    cmd = f"env -u COLUMNS -u LINES {env} {sys.executable} -m tui.cli compare {tmp_path / 'runs'}"
    try:
        term.start(f"{cmd}; echo COMPARE-EXIT=$?; sleep 60")
        term.wait(r"x: steps")
        screen = term.wait(r"lr-1e-2").string
        for lr in LRS:  # legend and table
            assert screen.count(f"lr-{lr}") >= 2, screen
        header = next(line for line in screen.splitlines() if re.search(r"\brun\b.*\blr\b", line))
        assert "train loss" in header  # the differing setting, then the figures
        row = next(line for line in screen.splitlines() if "lr-3e-3" in line and "0.003" in line)
        assert re.search(r"0\.003\s+~\d\.\d{3}\s+\d\.\d{4}", row), row
        assert "loss · 3 runs" in screen
        term.keys("x")
        term.wait(r"x: (k )?tokens")
        term.keys("q")
        term.wait("COMPARE-EXIT=0", timeout=30)
    finally:
        term.close()
