"""The training dashboard: a Textual app around a run's controller and its recorder.

The app never calls into the engine's thread and the engine never calls into the app: the
engine records events into a bounded :class:`engine.recorder.Recorder`, which the app polls
a few times a second (skipping the redraw when nothing changed), and the app drives the
run through a :class:`engine.commands.RunController` (the local trainer, a remote run for
``gpt-tui attach``, or a read-only viewer); with ``owns_engine=False`` ``q`` only closes the viewer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from textual import events
from textual.app import App, ComposeResult, SystemCommand
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Static

from engine.commands import RunController
from engine.errors import GptTuiError
from engine.recorder import Recorder, Snapshot

from .format import fmt_value, short_path
from .keys import bindings, commanding_actions
from .live import WINDOW_SHARE, in_window, markers, window_start
from .steer import ChangesScreen, SettingsScreen, describe
from .system import SAMPLE_INTERVAL, SystemMonitor, SystemPane, system_rows
from .widgets import (
    DONE_STATES,
    HelpScreen,
    LossChart,
    LRChart,
    RunClock,
    SamplesPane,
    StatsPane,
    StatusLine,
    generation_text,
    sample_text,
    stats_rows,
)

if TYPE_CHECKING:
    from .launch import EngineThread, ExitGuard

PAUSING = "pausing at the next step"
MIN_SIZE = (80, 24)
"""The smallest terminal the dashboard is laid out for; below it a notice says so."""
NOTE_SECONDS = 10.0
"""How long a note of something done (checkpoint saved, eval result, resumed) stays in the status line."""
READ_ONLY_KEYS = {"p": "pause", "c": "checkpoint", "e": "evaluate", "g": "generate", "s": "change settings",
                  "plus": "change the learning rate", "minus": "change the learning rate"}


class DashboardApp(App[int]):
    """Loss and learning-rate charts, stats, samples and a status line for a training run."""

    CSS_PATH = "dashboard.tcss"
    TITLE = "gpt-tui"
    ENABLE_COMMAND_PALETTE = True
    """Ctrl+P only (Textual's Theme and Keys commands, our screenshot and the run's actions)."""
    SYSTEM_PANE_HEIGHT = 40
    """The system pane shows by itself in terminals at least this tall (m shows or hides it anywhere)."""
    POLL_INTERVAL = 0.5
    """Seconds between looks at the recorder (nothing is redrawn when its version is unchanged)."""
    CHART_INTERVAL = 1.0
    """Least seconds between chart redraws (plotext is the dearest part of a frame)."""

    BINDINGS = bindings()

    def __init__(self, controller: RunController, recorder: Recorder, run_dir: str | None = None, read_only: bool = False,
                 owns_engine: bool = True, engine: EngineThread | None = None, handle_signals: bool = False,
                 exit_guard: ExitGuard | None = None) -> None:
        super().__init__()
        self.controller = controller
        self.recorder = recorder
        self.run_dir = run_dir
        self.read_only = read_only
        self.owns_engine = owns_engine
        self.engine = engine
        self.handle_signals = handle_signals
        self.exit_guard = exit_guard
        self.axis = "steps"
        self.clock = RunClock()
        self.quitting = False
        self.forced = False
        self.note: tuple[str, str] = ("", "")
        self._note_until: float | None = None  # when a note of something done leaves the status line
        self._eval_asked: tuple[int, int] | None = None  # (evals seen, last eval step) when e was pressed
        self._bindings_sig: tuple[bool, bool] | None = None
        self.generations: dict[int, tuple[str, int]] = {}  # request id -> (prompt, step)
        self.snap: Snapshot | None = None
        self._version = -1
        self._chart_sig: Any = None
        self._chart_time = 0.0
        self._samples_sig: Any = None
        self._gen_shown: dict[int, tuple[int, bool]] = {}
        self._last_ckpt: str | None = None
        self._failed_shown = False
        self._signals: list[int] = []
        self.window = False
        """w: the charts show only the recent window (see tui.live.window_start)."""
        self.bpb = False
        """b: val loss in bits per byte."""
        self.system_choice: bool | None = None
        """m: the system pane shown or hidden by the user (None: shown when the terminal is tall enough)."""
        self.monitor = SystemMonitor(None)
        self._changes_seen: int | None = None
        self._system_timer: Timer | None = None
        self._system_pane: SystemPane | None = None
        self.overlay: Any = None  # key o: another run drawn over the loss chart (tui/compare.py Overlay)

    # ------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield StatusLine(id="status")
        with Horizontal(id="main"):
            with Vertical(id="charts"):
                yield LossChart("loss", id="loss-chart")
                yield LRChart("learning rate", id="lr-chart")
            with Vertical(id="side"):
                stats = StatsPane(id="stats")
                stats.border_title = "stats"
                yield stats
                system = SystemPane(id="system")
                system.border_title = "system"
                yield system
        yield SamplesPane(id="samples")
        yield Static(f"terminal too small: need {MIN_SIZE[0]}x{MIN_SIZE[1]}\n(enlarge the window; q quits)",
                     id="too-small")
        yield Footer()

    def on_mount(self) -> None:
        if self.console.color_system in ("standard", "windows"):
            self.theme = "ansi-dark"  # 16 colours: the terminal's own palette
        self._system_pane = self.query_one(SystemPane)
        self._system_timer = self.set_interval(SAMPLE_INTERVAL, self.sample_system, pause=True)
        self._show_system()
        self.fit_to(self.size)
        self.poll()
        self.set_interval(self.POLL_INTERVAL, self.poll)
        if self.handle_signals:
            self._install_signals()

    def on_resize(self, event: events.Resize) -> None:
        self.fit_to(event.size)

    def fit_to(self, size: Any) -> None:
        """Below :data:`MIN_SIZE` the panes give way to a notice (instead of vanishing one by one)."""
        small = size.width < MIN_SIZE[0] or size.height < MIN_SIZE[1]
        self.default_screen.set_class(small, "too-small")

    def on_unmount(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        for s in self._signals:
            loop.remove_signal_handler(s)

    def _install_signals(self) -> None:
        """SIGTERM, SIGHUP and SIGINT: stop at a step boundary with a checkpoint, then exit."""
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            try:
                loop.add_signal_handler(s, self.on_signal, s)
                self._signals.append(s)
            except (ValueError, RuntimeError, NotImplementedError):
                pass

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP and self.exit_guard is not None:
            self.exit_guard.timeout = 1.0  # the terminal is gone: do not wait on it at exit
        self.action_quit_run(reason=signal.Signals(signum).name)

    # ------------------------------------------------------------ polling
    def poll(self) -> None:
        """Pull a snapshot when the recorder changed and redraw what changed."""
        pane = self._system_pane
        if self.system_choice is None and pane is not None and pane.display != self.system_shown():
            self._show_system()  # the terminal was resized across SYSTEM_PANE_HEIGHT
        version = getattr(self.recorder, "version", None)
        ended = self.engine is not None and self.engine.ident is not None and not self.engine.is_alive()
        if version is not None and version == self._version and not self.quitting and not ended:
            return
        try:
            stats = self.query_one("#stats", StatsPane)
        except NoMatches:  # the app is closing and its panes are gone; a last tick of the timer
            return
        snap = self.recorder.snapshot()
        self._version = snap.version
        self.snap = snap
        self.clock.update(snap)
        stats.show(stats_rows(snap, self.clock, bpb=self.bpb))
        self._update_charts(snap)
        self._update_samples(snap)
        self._events(snap)
        self._update_status(snap)
        sig = (self.controller_paused(), snap.state in DONE_STATES)
        if sig != self._bindings_sig:  # the footer's p: pause or resume, or gone
            self._bindings_sig = sig
            self.refresh_bindings()
        if self.engine_done(snap):
            if self.quitting:
                self._exit_with(0)
            elif self.engine is not None and self.engine.error is not None and self.engine.in_setup:
                self._exit_with(1)  # nothing to show: run_dashboard prints the error

    def engine_done(self, snap: Snapshot) -> bool:
        if self.engine is not None:
            return not self.engine.is_alive() and self.engine.ident is not None
        return snap.state in DONE_STATES

    def _update_charts(self, snap: Snapshot, force: bool = False) -> None:
        steps, evals = snap.steps, snap.evals
        sig = (len(steps), steps[-1] if steps else None, len(evals), self.axis, len(snap.changes), self.window,
               self.bpb)
        now = time.monotonic()
        if sig == self._chart_sig or (not force and now - self._chart_time < self.CHART_INTERVAL
                                      and snap.state == "running"):
            return
        self._chart_sig, self._chart_time = sig, now
        loss_marks, lr_marks = markers(snap), markers(snap, lr_chart=True)
        note = ""
        if self.window:
            first = window_start(steps)
            steps, evals, loss_marks = in_window(steps, evals, loss_marks, first)
            lr_marks = [m for m in lr_marks if m[0] >= first]
            note = f" · last {WINDOW_SHARE:.0%}" if first else ""
        loss, lr = self.query_one(LossChart), self.query_one(LRChart)
        loss.bpb = self.bpb
        loss.title_note = lr.title_note = note
        loss.set_data(steps, evals, self.axis, loss_marks)
        lr.set_data(steps, [], self.axis, lr_marks)

    def _update_samples(self, snap: Snapshot) -> None:
        pane = self.query_one(SamplesPane)
        samples = snap.samples
        logs = [lg for lg in snap.logs if lg.level in ("warning", "error", "target")]
        sig = (len(samples), samples[-1].time if samples else None, len(logs), logs[-1].time if logs else None)
        if sig != self._samples_sig:
            self._samples_sig = sig
            merged = sorted([(s.time, "sample", s) for s in samples] + [(lg.time, "log", lg) for lg in logs],
                            key=lambda t: t[0])
            for t, kind, ev in merged:
                key = (kind, t)
                if key in pane.contents:
                    continue
                if kind == "sample":
                    pane.put(key, sample_text(ev.step, ev.epoch, ev.prompt, ev.text, ev.expected))
                else:
                    from rich.text import Text

                    pane.put(key, Text(f"{ev.level} at step {ev.step:,}: {ev.message}",
                                       style="bold red" if ev.level == "error" else "yellow"))
        for rid, gen in snap.generations.items():
            if rid not in self.generations:  # asked for here, on another screen or by another viewer
                self.generations[rid] = (gen.prompt, snap.step)
            prompt, step = self.generations[rid]
            shown = (len(gen.text), gen.done is not None)
            if self._gen_shown.get(rid) != shown:
                self._gen_shown[rid] = shown
                pane.put(("gen", rid), generation_text(rid, step, prompt or gen.prompt, gen.text, gen.done))

    def _events(self, snap: Snapshot) -> None:
        """Rare events: a setting changed, a checkpoint written, the run failed."""
        if self._changes_seen is not None and len(snap.changes) > self._changes_seen:
            last = snap.changes[-1]
            same = [c for c in snap.changes[self._changes_seen:] if c.step == last.step]
            by = "" if last.source == "dashboard" else f" ({last.source})"
            self.note = (f"step {last.step:,}: " + ", ".join(
                f"{c.setting.replace('_', '-')} {fmt_value(c.old)} -> {fmt_value(c.new)}" for c in same) + by, "cyan")
        self._changes_seen = len(snap.changes)
        ck = snap.last_checkpoint
        if ck is not None and ck.path != self._last_ckpt:
            first = self._last_ckpt is None and ck.reason != "requested"
            self._last_ckpt = ck.path
            self.set_note(f"saved {self.rel_to_run(ck.path)}", "cyan", done=True)
            if not first or ck.reason == "requested":
                self.notify(f"checkpoint saved: {short_path(ck.path)}", title="checkpoint", timeout=4)
        if self._eval_asked is not None and snap.evals:
            ev = snap.evals[-1]
            if (len(snap.evals), ev.step) != self._eval_asked:
                self._eval_asked = None
                self.set_note(f"eval step {ev.step:,}: val {ev.val_loss:.4f} · train {ev.train_loss:.4f}", "cyan",
                              done=True)
        failed = snap.failed
        if failed is not None and not self._failed_shown:
            from rich.text import Text

            self._failed_shown = True
            last = failed.last_checkpoint or "none"
            self.query_one(SamplesPane).put(("failed",), Text(
                f"run failed at step {failed.step:,}: {failed.error}\nlast checkpoint: {short_path(last)}\n"
                "press q to exit", style="bold red"))
            self.notify(failed.error, title="run failed", severity="error", timeout=30)

    def set_note(self, text: str, style: str, done: bool = False) -> None:
        """The status line's note; ``done`` (something finished) leaves after :data:`NOTE_SECONDS`."""
        self.note = (text, style)
        self._note_until = time.monotonic() + NOTE_SECONDS if done else None

    def _update_status(self, snap: Snapshot) -> None:
        state = snap.state
        start = snap.start
        if self.quitting and state not in DONE_STATES:
            state = "stopping"
        elif state == "running" and self.controller_paused():
            state = "pausing"
        if state == "paused" and self.note[0] == PAUSING:
            self.set_note("paused · p resumes", "yellow")
        elif state == "running" and self.note[0] in (PAUSING, "paused · p resumes"):
            self.set_note("resumed", "yellow", done=True)
        if self._note_until is not None and time.monotonic() > self._note_until:
            self.set_note("", "")
        note, style = self.note
        if snap.failed is not None:
            note, style = snap.failed.error, "bold red"
        elif self.quitting and state == "stopping":
            note, style = self.quit_note(snap), "yellow"
        elif snap.state_message and state in ("paused", "failed"):
            note, style = snap.state_message, "yellow"
        elif state in ("finished", "stopped"):
            note = (snap.state_message + " · " if snap.state_message else "") + "q exits"
        elif state == "compiling":
            note, style = "compiling the model (the first step takes a while)", "dim"
        elif state == "starting":
            progress = [lg for lg in snap.logs if lg.level == "progress"]
            note, style = (progress[-1].message if progress else "setting up"), "dim"
        elif state == "finishing":  # the end phase's own progress (not setup's)
            progress = [lg for lg in snap.logs if lg.level == "progress" and lg.step == snap.step and snap.step]
            note, style = (progress[-1].message if progress else snap.state_message or "finishing"), "dim"
        if self.read_only:
            note = "read-only · " + note
        run_dir = start.run_dir if start else (self.run_dir or "")
        self.query_one(StatusLine).show(state, run_dir, note, style)

    @staticmethod
    def quit_note(snap: Snapshot) -> str:
        """What the first q (or signal) is doing, short enough for 80 columns."""
        if snap.state == "finishing":
            return "final checkpoint saved · q: quit now"
        if snap.start is None:
            return "stopping · q: quit now"
        return "saving a checkpoint · q: quit now"

    def rel_to_run(self, path: str) -> str:
        """A checkpoint path relative to the run directory shown beside it."""
        start = self.snap.start if self.snap else None
        base = start.run_dir if start else self.run_dir
        if base and os.path.abspath(path).startswith(os.path.abspath(base) + os.sep):
            return os.path.relpath(path, base)
        return short_path(path)

    def controller_paused(self) -> bool:
        try:
            return bool(self.controller.paused)
        except Exception:  # noqa: BLE001  (a remote controller may be gone)
            return False

    def refresh_now(self) -> None:
        """Redraw at once (after a key) instead of at the next poll."""
        self._version = -1
        self.poll()

    # ------------------------------------------------------------ keys
    def _command(self, what: str, while_running_only: bool = False) -> bool:
        """Whether a command can go to the engine now (a notice says why not)."""
        state = self.snap.state if self.snap is not None else "starting"
        reason = None
        if self.read_only:
            reason = "read-only view"
        elif state == "failed" or (self.engine is not None and self.engine_done(self.snap or Snapshot())):
            reason = f"the run is {state}"
        elif while_running_only and state in DONE_STATES:
            reason = f"the run is {state}"
        elif self.quitting:
            reason = "stopping"
        if reason:
            self.notify(f"{reason}: cannot {what}", severity="warning")
            return False
        return True

    def action_pause(self) -> None:
        if not self._command("pause", while_running_only=True):
            return
        paused = self.controller.toggle_pause()
        if paused:
            self.set_note(PAUSING, "yellow")
        else:
            self.set_note("resumed", "yellow", done=True)
        self.refresh_bindings()
        self.refresh_now()

    def action_resume(self) -> None:
        """The footer's ``p resume`` while paused: the same toggle."""
        self.action_pause()

    def action_checkpoint(self) -> None:
        if not self._command("checkpoint"):
            return
        self.controller.request_checkpoint()
        self.set_note("checkpoint requested", "cyan")
        self.refresh_now()

    def action_eval(self) -> None:
        if not self._command("evaluate"):
            return
        evals = self.snap.evals if self.snap is not None else []
        self._eval_asked = (len(evals), evals[-1].step if evals else -1)
        self.controller.request_eval()
        self.set_note("eval requested", "cyan")
        self.refresh_now()

    def action_generate(self) -> None:
        if not self._command("generate"):
            return
        self.open_generate()

    def open_generate(self) -> None:
        """Open the generate prompt (the one place that chooses which screen does it)."""
        from .sample_panel import LiveBackend, SamplePanel

        self.push_screen(SamplePanel(LiveBackend(self.controller, self.recorder), title="generate from the live weights"))

    # ------------------------------------------------------------ steering
    def change(self, setting: str, value: str) -> None:
        """Send one live change; the status line says what will happen, or why it was refused."""
        try:
            c = self.controller.change(setting, value, source="dashboard")
        except GptTuiError as e:
            self.note = (str(e), "bold red")
        else:
            self.note = (f"{describe([c])} at the next step", "cyan")
        self.refresh_now()

    def action_lr_scale(self, factor: float) -> None:
        """+ and -: the peak learning rate x2 or x0.5 (the schedule continues from it)."""
        if self._command("change the learning rate", while_running_only=True):
            self.change("lr", f"x{factor:g}")

    def action_settings(self) -> None:
        """s: a form to type each live setting's value."""
        if not self._command("change settings", while_running_only=True) or isinstance(self.screen, SettingsScreen):
            return

        def done(changes: list[Any] | None) -> None:
            if changes:
                self.note = (f"{describe(changes)} at the next step", "cyan")
                self.refresh_now()

        self.push_screen(SettingsScreen(self.controller, self.recorder.snapshot()), done)

    def action_history(self) -> None:
        """h: every live change (step, setting, old -> new, source)."""
        if not isinstance(self.screen, ChangesScreen):
            self.push_screen(ChangesScreen(self.recorder.snapshot()))

    def action_toggle_window(self) -> None:
        self.window = not self.window
        if self.snap is not None:
            self._update_charts(self.snap, force=True)

    def action_toggle_bpb(self) -> None:
        snap = self.snap or self.recorder.snapshot()
        if not self.bpb and not any(e.val_bpb for e in snap.evals):
            self.notify("no bits per byte yet: they come with the first eval (e evaluates now)", severity="warning")
            return
        self.bpb = not self.bpb
        self.refresh_now()
        self._update_charts(snap, force=True)

    # ------------------------------------------------------------ system pane
    def system_shown(self) -> bool:
        if self.system_choice is not None:
            return self.system_choice
        return self.size.height >= self.SYSTEM_PANE_HEIGHT

    def _show_system(self) -> None:
        shown = self.system_shown()
        pane, timer = self._system_pane, self._system_timer
        if pane is None or timer is None:
            return
        if pane.display != shown:
            pane.display = shown
        if shown:
            self.sample_system()
            timer.resume()
        else:
            timer.pause()

    def action_system(self) -> None:
        """m: show or hide the system pane."""
        self.system_choice = not self.system_shown()
        self._show_system()

    def engine_pid(self) -> int | None:
        """The process that trains: the engine's own (a child, or the run attached to), else this one."""
        if self.read_only:
            return None
        if hasattr(self.controller, "pid"):
            return self.controller.pid
        return os.getpid() if self.owns_engine else None

    def sample_system(self) -> None:
        """Sample the process, the machine and the GPU (UI thread, twice a second while shown)."""
        snap = self.snap
        device = snap.start.device if snap is not None and snap.start is not None else ""
        self.monitor.set_device(device)
        self.monitor.set_process(self.engine_pid())
        live = not self.read_only and not (snap is not None and snap.state in DONE_STATES and not self.owns_engine)
        sample = self.monitor.sample()
        if self._system_pane is not None:
            self._system_pane.show(system_rows(sample, snap.last_step if snap else None, device, live))

    # ------------------------------------------------------------ screenshot and palette
    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        """ctrl+s: an SVG of the screen into the run directory; the status line says where."""
        snap = self.recorder.snapshot()
        run_dir = path or (snap.start.run_dir if snap.start is not None else self.run_dir) or "."
        step = snap.step
        name = filename or f"screenshot-step{step:06d}-{time.strftime('%Y%m%d-%H%M%S')}.svg"
        try:
            saved = self.save_screenshot(name, run_dir)
        except OSError as e:
            self.note = (f"screenshot not saved: {e.strerror or e}", "bold red")
        else:
            self.note = (f"screenshot {self.rel_to_run(saved)}", "cyan")
        self.refresh_now()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The palette: Textual's commands (its screenshot replaced by ours) and the dashboard's keys."""
        for cmd in super().get_system_commands(screen):
            if cmd.title != "Screenshot":
                yield cmd
        yield SystemCommand("Screenshot", "Save an SVG of the dashboard into the run directory (ctrl+s)",
                            lambda: self.set_timer(0.1, self.action_screenshot))
        yield SystemCommand("Changes", "The history of live changes (h)", self.action_history)
        yield SystemCommand("System pane", "Show or hide CPU, memory, GPU and data wait (m)", self.action_system)
        yield SystemCommand("Window", "Charts: the whole run or the recent window (w)", self.action_toggle_window)
        yield SystemCommand("Bits per byte", "Val loss in nats per token or bits per byte (b)", self.action_toggle_bpb)
        if not self.read_only:
            yield SystemCommand("Settings", "Change the learning rate, eval interval, target ... live (s)",
                                self.action_settings)

    def action_toggle_axis(self) -> None:
        self.axis = "tokens" if self.axis == "steps" else "steps"
        if self.snap is not None:
            self._update_charts(self.snap, force=True)

    def action_overlay(self) -> None:
        """o: pick a run beside this one to draw over the loss chart, or clear it. The picker and the
        reading of that run's metrics.jsonl (a worker, off this poll) are tui/compare.py's."""
        from .compare import Overlay

        if self.overlay is None:
            self.overlay = Overlay(self, self.query_one(LossChart))
        start = self.snap.start if self.snap is not None else None
        self.overlay.pick(start.run_dir if start else self.run_dir)

    def action_toggle_log(self) -> None:
        """The loss chart's y axis: linear or log (loss spans orders of magnitude early in a run)."""
        chart = self.query_one(LossChart)
        chart.log_y = not chart.log_y
        chart.refresh()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(viewer=not self.owns_engine, controls=not self.read_only))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """A read-only viewer offers no key that commands the run (they leave its footer); ``p`` is
        ``pause`` while running, ``resume`` while paused, and absent after the last step."""
        if self.read_only and action in commanding_actions():
            return False
        if getattr(self.screen, "app_keys", True) is False and action != "quit_run":
            return False  # a full screen of its own (the generate panel) shows only its keys
        if action in ("pause", "resume"):
            if self.snap is not None and (self.snap.state in DONE_STATES or self.snap.state == "finishing"):
                return False  # no steps left to pause between
            return self.controller_paused() == (action == "resume")
        return True

    def on_key(self, event: Any) -> None:
        """In a read-only view a command key says why it does nothing."""
        what = READ_ONLY_KEYS.get(event.key) if self.read_only else None
        if what:
            self.notify(f"read-only view: cannot {what}", severity="warning")

    async def action_quit(self) -> None:
        self.action_quit_run()

    def action_quit_run(self, reason: str = "") -> None:
        """First press: stop at the next step with a checkpoint, then exit. Second: exit now.

        In the generate panel, Ctrl+C (and Ctrl+Q) first stops a running generation, as the panel says."""
        if not reason and getattr(self.screen, "generating", False):
            self.screen.action_stop()
            return
        snap = self.snap or self.recorder.snapshot()
        if not self.owns_engine or self.engine_done(snap):
            self._exit_with(0)
            return
        if self.quitting:
            self.forced = True
            self._exit_with(130)
            return
        self.quitting = True
        try:
            self.controller.cancel_generation()
            self.controller.stop(save=True)
        except Exception as e:  # noqa: BLE001
            self.notify(str(e), severity="error")
        if reason:
            self.note = (f"{reason}: stopping", "yellow")
        self.refresh_now()

    def _exit_with(self, code: int) -> None:
        if self.exit_guard is not None:
            self.exit_guard.arm(code)
        self.exit(code, return_code=code)
