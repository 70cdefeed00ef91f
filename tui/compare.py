"""Runs side by side: ``gpt-tui compare`` and the dashboard's overlay of another run (key ``o``).

Both read runs from what they wrote to disk: ``metrics.jsonl`` (followed from where the last read
stopped, so a run still training is re-read every couple of seconds for the price of its new lines)
and ``config.json`` (its ``train`` settings). Files are read in a worker thread; the UI thread only
draws the ready :class:`RunView` snapshots it is handed.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, OptionList, Static
from textual.widgets.option_list import Option

from engine.errors import GptTuiError
from engine.runs import FINAL_STATES, RunDir, pid_alive

from .format import axis_scale, fmt_count
from .widgets import Chart, ExtraSeries, LossChart, downsample, ema

RELOAD_INTERVAL = 2.0
"""Seconds between looks at the runs' metrics.jsonl (only new lines are read)."""
MAX_POINTS = 2048
"""Points per curve handed to the UI (the chart thins them again to its width)."""
LEGEND_NAME = 16
"""Longest run name in the legend; the table shows names whole."""

# Eight colours that stay apart on a dark background. With 256 colours and up: fixed hues (after the
# Okabe-Ito palette, which colour-blind readers can tell apart). With 16 colours: the terminal's own
# palette, so they follow its theme. Beyond eight runs the colours repeat with another line marker.
PALETTE_256 = (39, 214, 170, 41, 203, 226, 147, 250)
PALETTE_16 = (6, 3, 5, 2, 1, 12, 7, 8)
LINE_MARKERS = (("braille", "━"), ("+", "+"))
"""(plotext marker, legend glyph) of the train line of runs 1-8, then 9-16 ..."""
OVERLAY_COLOR = 2
"""The overlaid run in the dashboard: green, apart from its cyan train line, yellow val and magenta lr."""
SKIP_SETTINGS = {"out"}
"""Settings that always differ between runs and say nothing (the run's own folder)."""


# ------------------------------------------------------------------ reading runs


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


@dataclass
class RunCurves:
    """One run's loss curves and figures, kept current by reading its metrics.jsonl from where it
    stopped last time (a torn last line waits for the next read). Not thread-safe: one reader at a time."""

    path: str
    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_tokens: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    total: int | None = None
    state: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    offset: int = 0
    _config_mtime: float = -1.0

    @property
    def run(self) -> RunDir:
        return RunDir(self.path)

    def update(self) -> bool:
        """Read what was added since the last call; whether anything changed."""
        changed = self._read_settings()
        try:
            size = os.path.getsize(self.run.metrics)
        except OSError:
            return changed
        if size < self.offset:  # the file was replaced: start over
            self.__dict__.update(RunCurves(self.path).__dict__)
            self._read_settings()
            changed = True
        if size == self.offset:
            return changed
        with open(self.run.metrics, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        end = data.rfind(b"\n")
        if end < 0:
            return changed
        self.offset += end + 1
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                self._add(rec)
                changed = True
        return changed

    def _read_settings(self) -> bool:
        try:
            mtime = os.path.getmtime(self.run.config)
        except OSError:
            return False
        if mtime == self._config_mtime:
            return False
        self._config_mtime = mtime
        self.settings = self.run.train_settings()
        return True

    def _add(self, rec: dict[str, Any]) -> None:
        kind = rec.get("type")
        if kind == "step" and isinstance(rec.get("step"), int):
            step = rec["step"]
            if self.steps and step <= self.steps[-1]:  # steps again from an earlier point: the later ones win
                self._truncate(step - 1)
            self.steps.append(step)
            self.tokens.append(int(rec.get("tokens_seen") or 0))
            loss = rec.get("loss")
            self.losses.append(float(loss) if isinstance(loss, (int, float)) else math.nan)
        elif kind == "eval" and isinstance(rec.get("step"), int):
            val = _finite(rec.get("val_loss"))
            if val is not None:
                self.eval_steps.append(rec["step"])
                self.eval_tokens.append(int(rec.get("tokens_seen") or 0))
                self.val_losses.append(val)
        elif kind == "start":
            if isinstance(rec.get("total_steps"), int):
                self.total = rec["total_steps"]
            if isinstance(rec.get("resumed_step"), int) and rec.get("resumed_from"):
                self._truncate(rec["resumed_step"])  # a resumed run redoes what came after its checkpoint
            self.state = "ready"
        elif kind == "state":
            self.state = rec.get("state") or self.state
        elif kind == "failed":
            self.state = "failed"

    def _truncate(self, last_step: int) -> None:
        """Forget the steps and evals after ``last_step``."""
        n = bisect.bisect_right(self.steps, last_step)
        del self.steps[n:], self.tokens[n:], self.losses[n:]
        n = bisect.bisect_right(self.eval_steps, last_step)
        del self.eval_steps[n:], self.eval_tokens[n:], self.val_losses[n:]

    def live_state(self) -> str:
        """finished, stopped, failed, or (recorded as running) live when its process is there, else dead."""
        if self.state in FINAL_STATES:
            return str(self.state)
        from engine.control import read_info

        return "live" if pid_alive((read_info(self.path) or {}).get("pid")) else "dead"


@dataclass(frozen=True)
class Figures:
    state: str
    step: int
    total: int | None
    tokens: int
    train: float | None
    """The smoothed train loss at the last step (what the chart's line ends at)."""
    best_val: float | None
    best_step: int | None


@dataclass(frozen=True)
class RunView:
    """What the UI draws of one run: ready-made, never changed after it is handed over."""

    path: str
    name: str
    color: int
    glyph: str
    train: ExtraSeries
    val: ExtraSeries
    figures: Figures
    settings: dict[str, Any]


def _thin(n: int, ys: Sequence[float], limit: int = MAX_POINTS) -> list[int]:
    """Indices of at most ``limit`` points that keep each bucket's lowest and highest value."""
    idx, _ = downsample(list(range(n)), ys, limit)
    return [int(i) for i in idx]


def run_view(curves: RunCurves, name: str, color: int, marker: tuple[str, str], state: str | None = None) -> RunView:
    smooth = ema(curves.losses, 0.9 if len(curves.losses) > 20 else 0.5)
    keep = _thin(len(smooth), smooth)
    train = ExtraSeries([curves.steps[i] for i in keep], [curves.tokens[i] for i in keep],
                        [smooth[i] for i in keep], color, marker[0])
    val = ExtraSeries(list(curves.eval_steps), list(curves.eval_tokens), list(curves.val_losses), color, "dot")
    best = min(range(len(curves.val_losses)), key=curves.val_losses.__getitem__) if curves.val_losses else None
    last = _finite(smooth[-1]) if smooth else None
    figures = Figures(state or curves.live_state(), curves.steps[-1] if curves.steps else 0, curves.total,
                      curves.tokens[-1] if curves.tokens else 0, last,
                      curves.val_losses[best] if best is not None else None,
                      curves.eval_steps[best] if best is not None else None)
    return RunView(curves.path, name, color, marker[1], train, val, figures, dict(curves.settings))


def run_names(paths: Sequence[str]) -> list[str]:
    """Each run's folder name; where two share one, with its parent's name too."""
    base = [os.path.basename(os.path.normpath(p)) for p in paths]
    return [os.path.join(os.path.basename(os.path.dirname(os.path.normpath(p))), b) if base.count(b) > 1 else b
            for p, b in zip(paths, base, strict=True)]


def runs_under(folder: str) -> list[str]:
    """The run directories directly under ``folder``, by name."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names if RunDir(os.path.join(folder, n)).is_run()]


def resolve_runs(args: Sequence[str]) -> list[str]:
    """Run directories from the command line: each a run, or a folder of runs (all of them)."""
    out: list[str] = []
    for arg in args:
        path = os.path.abspath(arg)
        if RunDir(path).is_run():
            found = [path]
        elif os.path.isdir(path):
            found = runs_under(path)
            if not found:
                raise GptTuiError(f"no runs under {arg}",
                                  "give run directories (folders with metrics.jsonl), or a folder that holds them")
        else:
            raise GptTuiError(f"{arg} is not a run directory" + ("" if os.path.exists(arg) else " (it does not exist)"),
                              "give the folder a `gpt-tui train` run wrote (its --out), e.g. runs/NAME")
        out += [p for p in found if p not in out]
    return out


class Comparison:
    """The runs being compared: each one's reader, colour and the latest view of it."""

    def __init__(self, paths: Sequence[str], palette: Sequence[int] = PALETTE_256) -> None:
        self.curves = [RunCurves(p) for p in paths]
        self.names = run_names(paths)
        self.palette = tuple(palette)
        self.views: list[RunView] = []

    def style(self, i: int) -> tuple[int, tuple[str, str]]:
        n = len(self.palette)
        return self.palette[i % n], LINE_MARKERS[(i // n) % len(LINE_MARKERS)]

    def read(self, force: bool = False) -> list[RunView] | None:
        """Fresh views when a run changed (or ``force``), else None. Call from one thread at a time."""
        changed = [c.update() for c in self.curves]
        states = [c.live_state() for c in self.curves]  # a live run may have died without a word
        old = {v.path: v for v in self.views}
        views = []
        for i, c in enumerate(self.curves):
            color, marker = self.style(i)
            v = old.get(c.path)
            if force or changed[i] or v is None or v.color != color or v.figures.state != states[i]:
                v = run_view(c, self.names[i], color, marker, states[i])
            views.append(v)
        if not force and self.views and all(a is b for a, b in zip(views, self.views, strict=True)):
            return None
        self.views = views
        return views


# ------------------------------------------------------------------ settings and figures


def differing_settings(settings: Sequence[dict[str, Any]]) -> list[str]:
    """The train settings whose values are not the same in every run, in config order."""
    keys: list[str] = []
    for s in settings:
        keys += [k for k in s if k not in keys and k not in SKIP_SETTINGS]
    if len(settings) < 2:
        return []
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in settings}) > 1]


def fmt_setting(value: Any, width: int = 24) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ",".join(fmt_setting(v, width) for v in value) or "-"
    else:
        text = str(value)
        if os.sep in text:
            text = os.path.basename(text.rstrip(os.sep)) or text
    return text if len(text) <= width else text[: width - 1] + "…"


def figure_cells(f: Figures) -> list[str]:
    """train, best val, @step, steps, tokens, state."""
    steps = f"{f.step:,}/{f.total:,}" if f.total else f"{f.step:,}"
    return [f"~{f.train:.3f}" if f.train is not None else "-",
            f"{f.best_val:.4f}" if f.best_val is not None else "-",
            f"{f.best_step:,}" if f.best_step is not None else "-",
            steps, fmt_count(f.tokens), f.state]


FIGURE_COLUMNS = ("train loss", "best val", "@step", "steps", "tokens", "state")


def short_name(name: str, n: int = LEGEND_NAME) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


# ------------------------------------------------------------------ the comparison screen


class CompareChart(Chart):
    """Every run's smoothed train loss (a line) and val loss (points), each run in its colour."""

    def __init__(self, title: str, **kw: Any) -> None:
        super().__init__(title, **kw)
        self.views: list[RunView] = []

    def set_views(self, views: list[RunView], axis: str) -> None:
        self.views, self.axis = views, axis
        self.border_subtitle = self.subtitle(self.x_scale()[1])  # also before the first render (an --svg frame)
        self.refresh()

    def has_data(self) -> bool:
        return any(v.train.steps or v.val.steps for v in self.views)

    def x_scale(self) -> tuple[float, str]:
        if self.axis == "steps":
            return 1.0, ""
        return axis_scale(max((max(v.train.tokens, default=0) for v in self.views), default=0))

    def series(self, scale: float) -> list[tuple[list[float], list[float], int, str]]:
        n = self.points()
        out = []
        for v in self.views:
            for s, m in ((v.train, n), (v.val, n // 2)):
                xs, ys = s.xy(self.axis, scale)
                if xs:
                    out.append((*downsample(xs, ys, m), s.color, s.marker))
        return out

    def subtitle(self, unit: str) -> str:
        log = " · log y" if self.log_y else ""
        return f"━ train (smoothed) • val · x: {unit + ' ' if unit else ''}{self.axis}{log}"


class Legend(Static):
    """One short entry per run in its colour; wraps onto more lines when the runs do not fit one."""

    def show(self, views: Sequence[RunView]) -> None:
        t = Text(overflow="fold")
        for i, v in enumerate(views):
            if i:
                t.append("  ")
            t.append(f"{v.glyph} {short_name(v.name)}", style=f"bold color({v.color})")
        self.update(t)


class CompareApp(App[int]):
    """The runs' loss curves on one chart, a legend, and a table of what differs and how each did."""

    TITLE = "gpt-tui compare"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    Screen { layout: vertical; }
    CompareChart {
        height: 1fr; min-height: 8;
        border: round $primary 60%; border-title-color: $text; border-subtitle-color: $text-muted;
        padding: 0;
    }
    Legend { height: auto; max-height: 3; padding: 0 1; }
    DataTable { height: auto; max-height: 45%; }
    DataTable > .datatable--fixed { background: $surface; }
    """
    BINDINGS = [
        Binding("x", "toggle_axis", "axis"),
        Binding("y", "toggle_log", "log y"),
        Binding("tab", "focus_next", "table", show=False),
        Binding("q", "quit", "quit"),
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
    ]

    def __init__(self, paths: Sequence[str], follow: bool = True) -> None:
        super().__init__()
        self.comparison = Comparison(paths)
        self.follow = follow
        self.axis = "steps"
        self.views: list[RunView] = []
        self._columns: tuple[str, ...] = ()

    def compose(self) -> ComposeResult:
        yield CompareChart(f"loss · {len(self.comparison.curves)} runs", id="chart")
        yield Legend(id="legend")
        table: DataTable[Any] = DataTable(id="table", zebra_stripes=True, cursor_type="none")
        table.fixed_columns = 1
        yield table
        yield Footer()

    def on_mount(self) -> None:
        if self.console.color_system in ("standard", "windows"):
            self.theme = "ansi-dark"
            self.comparison.palette = PALETTE_16
        views = self.comparison.read(force=True)  # the first read, before the first frame
        self.show_views(views or [])
        if self.follow:
            self.run_worker(self._follow(), exclusive=True, group="compare-reader")

    async def _follow(self) -> None:
        """Re-read the runs every RELOAD_INTERVAL seconds in a thread, and show what changed."""
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            views = await asyncio.to_thread(self.comparison.read)
            if views is not None:
                self.show_views(views)

    def show_views(self, views: list[RunView]) -> None:
        self.views = views
        self.query_one(CompareChart).set_views(views, self.axis)
        self.query_one(Legend).show(views)
        self._fill_table(views)

    def _fill_table(self, views: list[RunView]) -> None:
        table = self.query_one(DataTable)
        keys = differing_settings([v.settings for v in views])
        columns = ("run", *keys, *FIGURE_COLUMNS)
        rows = [[Text(f"{v.glyph} {v.name}", style=f"bold color({v.color})"),
                 *(fmt_setting(v.settings.get(k)) for k in keys), *figure_cells(v.figures)] for v in views]
        if columns != self._columns:
            table.clear(columns=True)
            for c in columns:
                table.add_column(c, key=c)
            for v, row in zip(views, rows, strict=True):
                table.add_row(*row, key=v.path)
            self._columns = columns
            return
        for v, row in zip(views, rows, strict=True):
            for c, cell in zip(columns, row, strict=True):
                table.update_cell(v.path, c, cell, update_width=True)

    def action_toggle_axis(self) -> None:
        self.axis = "tokens" if self.axis == "steps" else "steps"
        self.query_one(CompareChart).set_views(self.views, self.axis)

    def action_toggle_log(self) -> None:
        chart = self.query_one(CompareChart)
        chart.log_y = not chart.log_y
        chart.set_views(self.views, self.axis)


def compare_runs(paths: Sequence[str]) -> None:
    """The comparison screen until q."""
    CompareApp(paths).run()


def write_svg(paths: Sequence[str], out: str, size: tuple[int, int] = (120, 40)) -> None:
    """The comparison as an SVG: the same app run headless at ``size``, one frame saved with Textual's
    own SVG export, then closed."""
    app = CompareApp(paths, follow=False)
    svg: list[str] = []

    async def snap(pilot: Any) -> None:
        await pilot.pause()
        await pilot.pause(0.1)  # the charts draw after the first layout
        svg.append(app.export_screenshot(title=f"gpt-tui compare · {len(paths)} runs"))
        app.exit(0)

    app.run(headless=True, size=size, auto_pilot=snap)
    if not svg:
        raise GptTuiError("the comparison could not be drawn", "run again with --debug for the traceback")
    try:
        with open(out, "w", encoding="utf-8") as f:
            f.write(svg[0])
    except OSError as e:
        raise GptTuiError(f"cannot write {out}: {e.strerror}", "give --svg a path in a folder you can write") from e


# ------------------------------------------------------------------ the dashboard's overlay (key o)


class OverlayPicker(ModalScreen[str | None]):
    """The runs beside this one. Enter draws the chosen one over the loss chart; Esc changes nothing.
    Dismissed with a run's path, "" to clear the overlay, or None."""

    BINDINGS = [Binding("escape,q,o", "close", "close")]
    DEFAULT_CSS = """
    OverlayPicker { align: center middle; }
    #overlay-box { width: 90%; max-width: 90; height: auto; max-height: 90%;
                   background: $surface; border: round $accent; padding: 0 1; }
    #overlay-box OptionList { height: auto; max-height: 16; }
    #overlay-hint { color: $text-muted; }
    """

    def __init__(self, folder: str, exclude: str | None, current: str | None) -> None:
        super().__init__()
        self.folder = folder
        self.current = current
        self.paths = [p for p in runs_under(folder) if exclude is None or os.path.abspath(p) != os.path.abspath(exclude)]

    def compose(self) -> ComposeResult:
        with Vertical(id="overlay-box"):
            yield Static(Text(f"overlay a run from {self.folder}", style="bold"))
            options = [Option(os.path.basename(p), id=p) for p in self.paths]
            if self.current:
                options.insert(0, Option(Text("none (clear the overlay)", style="italic"), id=""))
            yield OptionList(*options, id="overlay-list")
            hint = "Enter: overlay · Esc: close" if self.paths else "no other runs in this folder · Esc: close"
            yield Static(hint, id="overlay-hint")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()
        if self.paths:
            self.run_worker(self._describe(), exclusive=True)

    async def _describe(self) -> None:
        """Fill in each run's state, step and best val (read in a thread: metrics files can be large)."""
        rows = await asyncio.to_thread(lambda: [(p, _describe_run(p)) for p in self.paths])
        ol = self.query_one(OptionList)
        for p, line in rows:
            ol.replace_option_prompt(p, line)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_close(self) -> None:
        self.dismiss(None)


def _describe_run(path: str) -> Text:
    c = RunCurves(path)
    c.update()
    name = os.path.basename(path)
    best = f"best val {min(c.val_losses):.4f}" if c.val_losses else "no eval yet"
    steps = f"{c.steps[-1]:,}" if c.steps else "0"
    t = Text(f"{name:<24} ", style="bold")
    t.append(f"{c.live_state():<9} step {steps:<9} {best}")
    return t


class Overlay:
    """Another run's curves over the dashboard's loss chart: the picker, then a loop that re-reads that
    run's metrics.jsonl in a worker thread every RELOAD_INTERVAL seconds, apart from the app's poll."""

    def __init__(self, app: App[Any], chart: LossChart) -> None:
        self.app = app
        self.chart = chart
        self.path: str | None = None

    def pick(self, run_dir: str | None) -> None:
        if not run_dir:
            self.app.notify("no run directory yet: try again once the run has started", severity="warning")
            return
        folder = os.path.dirname(os.path.abspath(run_dir))
        self.app.push_screen(OverlayPicker(folder, run_dir, self.path), self.chosen)

    def chosen(self, path: str | None) -> None:
        if path is None:
            return
        if path == "":
            self.path = None
            self.app.workers.cancel_group(self.app, "overlay")
            self.chart.set_extra([])
            return
        self.path = path
        self.app.run_worker(self._follow(path), exclusive=True, group="overlay")

    async def _follow(self, path: str) -> None:
        curves = RunCurves(path)
        from rich.markup import escape

        label = f"[green]━ {escape(short_name(os.path.basename(path), 14))}[/]"  # OVERLAY_COLOR's name
        first = True
        while self.path == path:
            if await asyncio.to_thread(curves.update) or first:
                view = await asyncio.to_thread(run_view, curves, "", OVERLAY_COLOR, LINE_MARKERS[0])
                if self.path != path:
                    return
                self.chart.set_extra([view.train, view.val], label)
                first = False
            await asyncio.sleep(RELOAD_INTERVAL)
