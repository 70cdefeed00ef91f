"""The dashboard's widgets: charts, stats, samples, status line and the help screen.

Every widget is fed from a :meth:`engine.events.Recorder.snapshot` by the app; none of them
talks to the engine. Charts keep the snapshot's points and thin them to about their own
width in points when they render, so a long run draws as fast as a short one.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Static
from textual_plotext import PlotextPlot

from engine.recorder import Snapshot, StepPoint
from engine.runs import FINAL_STATES

from .format import EMPTY_RESPONSE, axis_scale, clip_left, fmt_count, fmt_duration, short_path
from .keys import help_rows
from .live import target_row

# ------------------------------------------------------------------ numbers


def downsample(xs: Sequence[float], ys: Sequence[float], n: int) -> tuple[list[float], list[float]]:
    """Thin a series to at most ``n`` points: each of ``n // 2`` consecutive buckets keeps its lowest
    and its highest point, in step order, so a spike or a dip survives however long the run grows."""
    m = len(xs)
    if n <= 0 or m <= n:
        return list(xs), list(ys)
    buckets = max(1, n // 2)
    out_x: list[float] = []
    out_y: list[float] = []
    for b in range(buckets):
        lo, hi = b * m // buckets, (b + 1) * m // buckets
        if hi <= lo:
            continue
        finite = [i for i in range(lo, hi) if math.isfinite(ys[i])] or [lo]
        i_min = min(finite, key=ys.__getitem__)
        i_max = max(finite, key=ys.__getitem__)
        keep = sorted({i_min, i_max}) if n >= 2 else [i_min]
        out_x.extend(xs[i] for i in keep)
        out_y.extend(ys[i] for i in keep)
    return out_x, out_y


def ema(ys: Sequence[float], alpha: float = 0.9) -> list[float]:
    """Debiased exponential moving average (as TensorBoard smooths), skipping non-finite values."""
    out, acc, weight = [], 0.0, 0.0
    last = float("nan")
    for y in ys:
        if math.isfinite(y):
            acc = alpha * acc + (1 - alpha) * y
            weight = alpha * weight + (1 - alpha)
            last = acc / weight
        out.append(last)
    return out


STATE_STYLES = {
    "starting": "black on cyan",
    "ready": "black on cyan",
    "compiling": "black on cyan",
    "running": "black on green",
    "paused": "black on yellow",
    "saving": "black on cyan",
    "stopping": "black on yellow",
    "finished": "black on blue",
    "stopped": "black on magenta",
    "failed": "white on red",
    "finishing": "black on blue",
}

DONE_STATES = FINAL_STATES


# ------------------------------------------------------------------ charts


# Plotext colours as ANSI palette numbers: the terminal's own colours, kept with 16 colours
# (plotext's names do not all map onto them: its "yellow" came out uncoloured).
ANSI = {"yellow": 3, "magenta": 5, "cyan": 6}


def tick_values(lo: float, hi: float, n: int) -> list[float]:
    """``n`` evenly spaced values from lo to hi (one when the range is empty)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo or n < 2:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


class Chart(PlotextPlot):
    """A plotext chart that thins its series to about its own width when it renders."""

    y_format = "{:.2f}"

    def __init__(self, title: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.border_title = title
        self.theme = "clear"  # the terminal's own colours: fine with 16 colours
        self.axis = "steps"
        self.log_y = False  # y drawn as log10 of the value, ticks labelled with the value itself
        self.steps: list[StepPoint] = []
        self.evals: list[Any] = []
        self.markers: list[tuple[int, str]] = []
        """(step, label) of each live change to mark with a vertical line."""
        self.base_title = title
        self.title_note = ""
        """Said after the title (e.g. that the chart shows only the recent window)."""

    def set_data(self, steps: list[StepPoint], evals: list[Any], axis: str,
                 markers: list[tuple[int, str]] | None = None) -> None:
        self.steps, self.evals, self.axis = steps, evals, axis
        self.markers = markers or []
        self.refresh()

    def title(self) -> str:
        """The border title (subclasses add the current value)."""
        return self.base_title

    def points(self) -> int:
        """How many points to draw: about one per column of the plot area."""
        return max(8, self.size.width - 8)

    def x_scale(self) -> tuple[float, str]:
        if self.axis == "steps" or not self.steps:
            return 1.0, ""
        return axis_scale(self.steps[-1].tokens)

    def xs(self, pairs: Sequence[tuple[int, int]], scale: float) -> list[float]:
        """X values (steps, or tokens divided by ``scale``) of (step, tokens) pairs."""
        if self.axis == "steps":
            return [float(s) for s, _ in pairs]
        return [t / scale for _, t in pairs]

    def series(self, scale: float) -> list[tuple[list[float], list[float], int, str]]:
        """(xs, ys, colour, marker) of each line, already thinned (subclasses); a ``dot`` marker is
        drawn as separate points."""
        return []

    def has_data(self) -> bool:
        """Whether there is anything to draw (a chart fed other than by ``set_data`` says so itself)."""
        return bool(self.steps)

    def render(self) -> Any:
        plt = self.plt
        plt.clear_data()
        plt.frame(False)
        if self.has_data():
            scale, unit = self.x_scale()
            self.border_subtitle = self.subtitle(unit)
            lines = self.series(scale)
            if self.log_y:
                lines = [(xs, [math.log10(y) if y > 0 else float("nan") for y in ys], c, m) for xs, ys, c, m in lines]
            all_x = [x for xs, _, _, _ in lines for x in xs]
            all_y = [y for _, ys, _, _ in lines for y in ys if math.isfinite(y)]
            for xs, ys, color, marker in lines:
                draw = plt.scatter if marker == "dot" else plt.plot
                draw(xs, ys, color=color, marker=marker)
            if all_x and all_y:
                self.draw_markers(scale, min(all_x), max(all_x), max(all_y))
                xt = tick_values(min(all_x), max(all_x), 4 if self.size.width > 40 else 3)
                plt.xticks(xt, [self.x_label(v, unit) for v in xt])
                h = self.size.height
                yt = tick_values(min(all_y), max(all_y), 2 if h < 6 else 3 if h < 10 else 5)
                plt.yticks(yt, [self.y_format.format(10 ** v if self.log_y else v) for v in yt])
        self.border_title = self.title() + self.title_note
        return super().render()

    def draw_markers(self, scale: float, x_lo: float, x_hi: float, y_top: float) -> None:
        """A vertical line at each marker's step inside the x range, its label at the top: right of
        the line, or left of it near the right edge; a label that would overlap a newer one is left
        out (the line stays)."""
        if not self.markers or x_hi <= x_lo:
            return
        cols = max(8, self.size.width - 8)
        taken: list[tuple[float, float]] = []
        for step, label in reversed(self.markers):  # the newest label wins where they would overlap
            x = float(step) if self.axis == "steps" else tokens_at(self.steps, step) / scale
            if not x_lo <= x <= x_hi:
                continue
            self.plt.vline(x, color=ANSI["magenta"])
            col = (x - x_lo) / (x_hi - x_lo) * cols
            span, align = (col, col + len(label)), "left"
            if span[1] > cols + 1:
                span, align = (col - len(label), col), "right"
            if label and span[0] >= 0 and not any(a - 1 < span[1] and span[0] < b + 1 for a, b in taken):
                self.plt.text(label, x, y_top, color=ANSI["magenta"], alignment=align)
                taken.append(span)

    def x_label(self, v: float, unit: str) -> str:
        if self.axis == "steps":
            return fmt_count(v) if v >= 10_000 else f"{v:.0f}"
        return f"{v:.3g}{unit}"

    def subtitle(self, unit: str) -> str:
        """What the x axis counts (a tokens axis's ticks carry their own unit: 12k, 1.2M)."""
        return f"x: {self.axis}"


@dataclass(frozen=True)
class ExtraSeries:
    """A curve that does not come from the recorder (another run's, read from its metrics.jsonl):
    its x both as steps and as tokens, so the chart's x axis can switch."""

    steps: Sequence[float]
    tokens: Sequence[float]
    ys: Sequence[float]
    color: int
    marker: str
    """``braille`` (or any plotext marker) draws a line; ``dot`` draws separate points."""

    def xy(self, axis: str, scale: float) -> tuple[list[float], list[float]]:
        xs = [float(s) for s in self.steps] if axis == "steps" else [t / scale for t in self.tokens]
        return xs, list(self.ys)


class LossChart(Chart):
    """Train loss per step (smoothed) and val loss at each eval; with ``bpb`` in bits per byte; ``extra``:
    another run's curves over them (key ``o``, tui/compare.py), drawn as far along x as this run has come."""

    bpb = False

    def __init__(self, title: str, **kw: Any) -> None:
        super().__init__(title, **kw)
        self.extra: list[ExtraSeries] = []
        self.extra_label = ""  # its legend entry in the subtitle (markup)

    def set_extra(self, extra: list[ExtraSeries], label: str = "") -> None:
        self.extra, self.extra_label = extra, label
        self.refresh()

    def series(self, scale: float) -> list[tuple[list[float], list[float], int, str]]:
        n = self.points()
        factor = bpb_factor(self.evals) if self.bpb else None
        xs = self.xs([(p.step, p.tokens) for p in self.steps], scale)
        ys = ema([p.loss for p in self.steps], 0.9 if len(self.steps) > 20 else 0.5)
        if factor is not None:
            ys = [y * factor for y in ys]
        out = [(*downsample(xs, ys, n), ANSI["cyan"], "braille")]
        if self.evals:
            ex = self.xs([(e.step, e.tokens_seen) for e in self.evals], scale)
            ey = [e.val_bpb if factor is not None and e.val_bpb is not None else e.val_loss for e in self.evals]
            out.append((*downsample(ex, ey, n // 2), ANSI["yellow"], "dot"))
        end = xs[-1] if xs else 0.0
        for s in self.extra:
            sx, sy = s.xy(self.axis, scale)
            kept = [(x, y) for x, y in zip(sx, sy, strict=True) if x <= end]
            if kept:
                out.append((*downsample([x for x, _ in kept], [y for _, y in kept], n), s.color, s.marker))
        return out

    def title(self) -> str:
        return self.base_title + (" · bits per byte" if self.bpb and bpb_factor(self.evals) else "")

    def subtitle(self, unit: str) -> str:
        log = " · log y" if self.log_y else ""
        extra = f" · {self.extra_label}" if self.extra and self.extra_label else ""
        return f"[cyan]train (smoothed)[/] [yellow]• val[/]{extra} · x: {self.axis}{log}"


class LRChart(Chart):
    """The learning-rate schedule as trained so far."""

    y_format = "{:.1e}"

    def series(self, scale: float) -> list[tuple[list[float], list[float], int, str]]:
        xs = self.xs([(p.step, p.tokens) for p in self.steps], scale)
        ys = [p.lr for p in self.steps]
        return [(*downsample(xs, ys, self.points()), ANSI["magenta"], "braille")]

    def title(self) -> str:
        return f"{self.base_title} {self.steps[-1].lr:.2e}" if self.steps else self.base_title


def tokens_at(steps: Sequence[StepPoint], step: int) -> float:
    """Tokens seen after ``step``, from the (possibly thinned) step points: interpolated between
    the nearest two, extrapolated at the same rate past the ends."""
    if not steps:
        return 0.0
    i = bisect.bisect_left([p.step for p in steps], step)
    if i < len(steps) and steps[i].step == step:
        return float(steps[i].tokens)
    a, b = (steps[i - 1], steps[i]) if 0 < i < len(steps) else (steps[0], steps[-1])
    if b.step == a.step:
        return a.tokens * step / max(a.step, 1)
    return a.tokens + (b.tokens - a.tokens) * (step - a.step) / (b.step - a.step)


def bpb_factor(evals: Sequence[Any]) -> float | None:
    """Bits per byte per nat per token of the run's val text (from the latest eval that has both)."""
    for e in reversed(evals):
        if getattr(e, "val_bpb", None) and e.val_loss > 0:
            return e.val_bpb / e.val_loss
    return None


# ------------------------------------------------------------------ stats


@dataclass
class RunClock:
    """Throughput and ETA from the snapshots the UI sees (time spent paused left out).

    The ETA counts the steps left at the speed so far plus the work after the last step that the
    engine announces (``StepEvent.end_phase_s``: a finetuning's test responses); while that work
    runs it counts down from the announced time. Paused, it stands still and says so.
    """

    first: tuple[float, int, int] | None = None  # (time, step, tokens) of the first step seen
    paused_since: float | None = None
    paused_total: float = 0.0
    finishing_since: float | None = None
    tps_now: float = 0.0
    now: float = 0.0
    _last_step_time: float = field(default=0.0, repr=False)

    def update(self, snap: Snapshot, now: float | None = None) -> None:
        now = self.now = time.time() if now is None else now
        last = snap.last_step
        state = snap.state
        if state == "paused" and self.paused_since is None:
            self.paused_since = now
        elif state != "paused" and self.paused_since is not None:
            self.paused_total += now - self.paused_since
            self.paused_since = None
        if state == "finishing" and self.finishing_since is None:
            self.finishing_since = now
        if last is None:
            return
        if self.first is None:
            self.first = (last.time, last.step, last.tokens_seen)
            self.paused_total = 0.0
        if last.time != self._last_step_time:
            self._last_step_time = last.time
            self.tps_now = last.tokens_per_sec if not self.tps_now else 0.7 * self.tps_now + 0.3 * last.tokens_per_sec

    def active(self, snap: Snapshot) -> float:
        last = snap.last_step
        if self.first is None or last is None:
            return 0.0
        return max(0.0, last.time - self.first[0] - self.paused_total)

    def tps_avg(self, snap: Snapshot) -> float | None:
        last = snap.last_step
        dt = self.active(snap)
        if self.first is None or last is None or dt <= 0:
            return None
        return (last.tokens_seen - self.first[2]) / dt

    def steps_eta(self, snap: Snapshot) -> float | None:
        """Seconds the steps still to go take at the speed so far (None before two steps are seen)."""
        last, start = snap.last_step, snap.start
        if self.first is None or last is None or start is None:
            return None
        done = last.step - self.first[1]
        if done <= 0:
            return None
        return self.active(snap) / done * max(0, start.total_steps - last.step)

    def eta(self, snap: Snapshot) -> float | None:
        """Seconds left: the steps to go at the speed so far, plus the end-of-run work announced."""
        last = snap.last_step
        if self.first is None or last is None or snap.start is None:
            return None
        end_phase = max(0.0, last.end_phase_s)
        if snap.state == "finishing":
            return max(0.0, end_phase - (self.now - (self.finishing_since or self.now)))
        steps = self.steps_eta(snap)
        return None if steps is None else steps + end_phase

    def eta_text(self, snap: Snapshot) -> str:
        """The ETA row: ``-`` before the first steps and after the end, marked while paused."""
        eta = self.eta(snap)
        if snap.state in DONE_STATES or eta is None:
            return "-"
        if snap.state == "paused":
            return f"{fmt_duration(eta)} (paused)"
        if snap.state == "finishing":
            return f"{fmt_duration(eta)} (end of run)" if eta > 0 else "end of run"
        return fmt_duration(eta)


def epoch_text(step: int, steps_per_epoch: int, total_steps: int) -> str:
    """``2/3``: the epoch (from 1) in which step ``step`` was trained, as the events count it
    (``Trainer.epoch_of_step``), of the run's epochs."""
    spe = max(1, steps_per_epoch)
    n_epochs = max(1, math.ceil(total_steps / spe)) if total_steps else 1
    return f"{max(0, step - 1) // spe + 1}/{n_epochs}"


def seconds_per_step(snap: Snapshot, clock: RunClock) -> float | None:
    """The run's current seconds per step, as its ETA counts them (else the last step's time)."""
    start, last = snap.start, snap.last_step
    eta = clock.steps_eta(snap)
    left = (start.total_steps - last.step) if start is not None and last is not None else 0
    if eta is not None and left > 0:
        return eta / left
    return last.step_time if last is not None else None


def lr_text(snap: Snapshot) -> str:
    """The learning rate now and the peak the schedule goes to (after live changes of it)."""
    start, last = snap.start, snap.last_step
    peak = start.peak_lr if start else None
    for c in snap.changes:
        if c.setting == "lr" and isinstance(c.new, (int, float)):
            peak = float(c.new)
    now = f"{last.lr:.2e}" if last else "-"
    return f"{now} (peak {peak:g})" if peak else now


def stats_rows(snap: Snapshot, clock: RunClock, bpb: bool = False) -> list[tuple[str, str]]:
    """(label, value) rows of the stats pane (``bpb``: val loss in bits per byte where known)."""
    start, last = snap.start, snap.last_step
    evals = snap.evals
    total = start.total_steps if start else 0
    spe = max(1, start.steps_per_epoch) if start else 1
    step = last.step if last else (start.resumed_step if start else 0)
    rows: list[tuple[str, str]] = []
    pct = f" ({100 * step / total:.0f}%)" if total else ""
    rows.append(("step", f"{step:,}/{total:,}{pct}" if total else f"{step:,}"))
    rows.append(("epoch", epoch_text(step, spe, total) if start else "-"))
    if last:
        steps = snap.steps
        smooth = ema([p.loss for p in steps[-50:]], 0.9)[-1] if steps else last.loss
        rows.append(("loss", f"{last.loss:.4f} ~{smooth:.3f}"))
    else:
        rows.append(("loss", "-"))
    if evals:
        ev = evals[-1]
        if bpb and ev.val_bpb is not None:
            rows.append(("val bpb", f"{ev.val_bpb:.4f} @{ev.step}"))
        else:
            rows.append(("val loss", f"{ev.val_loss:.4f} @{ev.step}"))
        ppl_of = ev.val_loss
    else:
        rows.append(("val loss", "-"))
        ppl_of = last.loss if last else None
    rows.append(("perplexity", f"{math.exp(ppl_of):,.1f}" if ppl_of is not None and ppl_of < 50 else "-"))
    avg = clock.tps_avg(snap)
    now = f"{clock.tps_now:,.0f}" if last else "-"
    rows.append(("tok/s", now + (f" · avg {avg:,.0f}" if avg else "")))
    mfu = last.mfu if last else None
    rows.append(("MFU", f"{100 * mfu:.1f}%" if mfu is not None else "-"))
    rows.append(("step time", f"{1000 * last.step_time:,.0f} ms" if last else "-"))
    rows.append(("ETA", clock.eta_text(snap)))
    target = target_row(snap, seconds_per_step(snap, clock))
    if target is not None:
        rows.append(target)
    rows.append(("device", f"{start.device} {start.dtype}" if start else "-"))
    if start:
        trainable = start.n_trainable and start.n_trainable != start.n_params
        rows.append(("params", fmt_count(start.n_params) + (f" ({fmt_count(start.n_trainable)} train)" if trainable else "")))
    else:
        rows.append(("params", "-"))
    rows.append(("lr", lr_text(snap)))
    mem = last.memory_mb if last else None
    if not start or start.device != "cpu":  # GPU/MPS memory: nothing to show on a CPU
        rows.append(("memory", f"{mem / 1024:.2f} GB" if mem is not None else "-"))
    # below: seen when the pane is taller than 80x24 gives it
    rows.append(("tokens", fmt_count(last.tokens_seen) if last else "-"))
    rows.append(("grad norm", f"{last.grad_norm:.3f}" if last else "-"))
    if evals:
        rows.append(("best val", f"{min(e.val_loss for e in evals):.4f}"))
    rows.append(("elapsed", fmt_duration(clock.active(snap))))
    ck = snap.last_checkpoint
    rows.append(("checkpoint", f"step {ck.step:,} ({ck.reason})" if ck else "-"))
    return rows


class TextPane(Widget):
    """A fixed-size widget showing one Text; updating it repaints only itself (no layout pass)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.text = Text()

    def set_text(self, text: Text) -> None:
        if text != self.text:
            self.text = text
            self.refresh()

    def render(self) -> Text:
        return self.text


class StatsPane(TextPane):
    """Step, epoch, losses, throughput, ETA, device, parameters, memory."""

    def show(self, rows: list[tuple[str, str]]) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        for i, (label, value) in enumerate(rows):
            t.append(f"{label:<10} ", style="bold")
            t.append(value + ("\n" if i < len(rows) - 1 else ""))
        self.set_text(t)


# ------------------------------------------------------------------ status line


class StatusLine(TextPane):
    """One line: state, run directory and the latest note (checkpoint path, error)."""

    def show(self, state: str, run_dir: str, note: str = "", note_style: str = "") -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(f" {state.upper()} ", style=STATE_STYLES.get(state, "reverse"))
        if run_dir:
            t.append(" │ ", style="dim")
            t.append(clip_left(short_path(run_dir), 26))
        if note:
            t.append(" │ ", style="dim")
            t.append(note, style=note_style)
        self.set_text(t)


# ------------------------------------------------------------------ samples


class SamplesPane(VerticalScroll):
    """Every per-epoch sample with its step, and every generation (prompt and output)."""

    can_focus = True

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.border_title = "samples"
        self.entries: dict[Any, Static] = {}
        self.contents: dict[Any, Text] = {}
        self.following = True

    def on_resize(self) -> None:
        if self.following:
            self.call_after_refresh(self.scroll_end, animate=False)

    def put(self, key: Any, text: Text) -> None:
        """Add an entry, or replace the one with this key; follows the end unless scrolled up."""
        if self.contents.get(key) == text:
            return
        follow = self.following = self.scroll_y >= self.max_scroll_y - 1
        self.contents[key] = text
        if key in self.entries:
            self.entries[key].update(text)
        else:
            w = Static(text, classes="sample")
            self.entries[key] = w
            self.mount(w)
        if follow:
            self.call_after_refresh(self.scroll_end, animate=False)

    def plain(self) -> str:
        """All entries as plain text (what the pane holds, for tests and captures)."""
        return "\n".join(t.plain for t in self.contents.values())


def sample_text(step: int, epoch: int, prompt: str, text: str, expected: str | None = None) -> Text:
    t = Text()
    t.append(f"step {step:,} · epoch {epoch + 1}\n", style="dim")
    if expected is not None:  # instruction finetuning: instruction, response, expected response
        t.append(prompt + "\n", style="bold")
        t.append("→ ", style="dim")
        if text.strip():
            t.append(text + "\n")
        else:
            t.append(EMPTY_RESPONSE + "\n", style="dim italic")
        t.append("expected: ", style="dim")
        t.append(expected, style="green")
        return t
    if prompt.strip():
        t.append(prompt, style="bold")
    t.append(text)
    return t


def generation_text(request_id: int, step: int, prompt: str, text: str, done: Any) -> Text:
    t = Text()
    head = f"generate #{request_id} · step {step:,}"
    if done is not None:
        head += f" · {len(text)} chars · {done.tokens_per_sec:,.0f} tok/s"
    else:
        head += " · generating…"
    t.append(head + "\n", style="dim green")
    t.append(prompt, style="bold green")
    t.append(text)
    return t


# ------------------------------------------------------------------ screens

class HelpScreen(ModalScreen[None]):
    """The key table."""

    BINDINGS = [Binding("escape,question_mark,q", "close", "close")]

    def __init__(self, viewer: bool = False, controls: bool = True) -> None:
        super().__init__()
        self.rows = help_rows(viewer, controls)

    def compose(self) -> ComposeResult:
        import textwrap

        width = max(len(k) for k, _ in self.rows) + 2
        room = max(20, min(100, self.app.size.width - 4) - width)  # inside the border and padding
        body = Text("Keys", style="bold")
        body.append("  (Esc closes)\n", style="dim")
        for i, (k, what) in enumerate(self.rows):
            body.append(f"{k:<{width}}", style="bold cyan")
            body.append(textwrap.fill(what, room, subsequent_indent=" " * width)
                        + ("\n" if i < len(self.rows) - 1 else ""))
        with VerticalScroll(id="help-scroll"):  # scrolls where the terminal is shorter than the table
            yield Static(body, id="help-box")

    def action_close(self) -> None:
        self.dismiss(None)


