"""Launching a run: with the dashboard, headless, detached, or as a viewer of another process's run.

This module owns "start a run and exit with its status": the commands (``cmd_train``,
``cmd_dist``) call it; it builds the trainer (``engine.runner.make_trainer``), its sinks, the
control channel and the signal handling, and picks the front end.

Exit codes of ``gpt-tui train``: 0 after a finished run or a stop (q, Ctrl+C, SIGTERM: a
checkpoint is saved first); the engine error's own code with one line on stderr after a failed
run (1; 2 for bad input; 3 for divergence); 130 when quit a second time without waiting.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import typer

from engine.commands import LocalCommands, LocalController
from engine.config import TrainConfig
from engine.events import LogEvent
from engine.recorder import Recorder

from .common import SignalStopper, fail, has_terminal, served_to_browser, signal_note, tokenize_progress
from .format import short_path


class SetupCancelled(Exception):
    """Raised from the tokenizer's progress callback when the run is stopped during setup."""


class EngineThread(threading.Thread):
    """Runs ``trainer.setup()`` then ``trainer.fit()``, keeping the result or the error.

    Given ``make`` instead of a trainer, it builds the trainer first (importing torch there, so
    the dashboard draws at once). A daemon thread, so a forced exit never waits on it; the normal
    exit paths stop the trainer and join it, so no thread is left running.
    """

    def __init__(self, trainer: Any, recorder: Recorder, after_setup: Callable[[], Any] | None = None,
                 make: Callable[[], Any] | None = None) -> None:
        super().__init__(name="gpt-tui-engine", daemon=True)
        self.trainer = trainer
        self.make = make
        self.recorder = recorder
        self.after_setup = after_setup
        self.in_setup = True
        self.result: str | None = None
        self.error: BaseException | None = None
        self._last_progress = 0.0
        if trainer is not None:
            trainer.progress = self._progress

    def _progress(self, done: int, total: int) -> None:
        if self.trainer.stopping:
            raise SetupCancelled()
        now = time.monotonic()
        if done < total and now - self._last_progress < 0.25:
            return
        self._last_progress = now
        self.recorder.emit(LogEvent(level="progress", message=f"tokenizing {done / 2**20:.1f}/{total / 2**20:.1f} MB"))

    def run(self) -> None:
        try:
            if self.trainer is None and self.make is not None:
                self.recorder.emit(LogEvent(level="progress", message="starting the engine (importing torch)"))
                self.trainer = self.make()
                self.trainer.progress = self._progress
                if self.trainer.stopping:  # quit while torch was importing: nothing to save
                    self.result = "stopped"
                    return
            self.trainer.setup()
            self.in_setup = False
            if self.after_setup is not None:
                self.after_setup()
            self.result = self.trainer.fit()
        except SetupCancelled:
            self.result = "stopped"
        except BaseException as e:  # noqa: BLE001  (kept and re-raised on the main thread)
            self.error = e

    @property
    def done(self) -> bool:
        return self.ident is not None and not self.is_alive()


class ExitGuard:
    """Ends the process if the app's own exit hangs (seen when the terminal hung up)."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._disarmed = threading.Event()
        self._thread: threading.Thread | None = None

    def arm(self, code: int) -> None:
        if self._thread is not None:
            return

        def watch() -> None:
            if not self._disarmed.wait(self.timeout):
                os._exit(code)

        self._thread = threading.Thread(target=watch, name="gpt-tui-exit-guard", daemon=True)
        self._thread.start()

    def disarm(self) -> None:
        self._disarmed.set()
        if self._thread is not None:
            self._thread.join()


# ------------------------------------------------------------------ starting a run
def run_training(cfg: TrainConfig, explicit: frozenset[str] | None = None, *, task: Any = None,
                 headless: bool = False, detach: bool = False, web: Any = None) -> None:
    """Start a run with the dashboard, headless, or detached, and exit with its status.

    The dashboard's path imports no torch before the app has drawn its first frame: the engine
    thread imports it (and applies the process settings) while the screen already shows the run."""
    from engine.control import refuse_live_run
    from engine.runs import launched_by_torchrun, run_dir_of_config

    refuse_live_run(run_dir_of_config(cfg.out, cfg.resume))  # one process per run directory
    if detach:
        from .detach import detach_run

        detach_run(sys.argv, cfg)
        return
    distributed = launched_by_torchrun()
    if web is None and not headless and not distributed and not has_terminal():
        print("gpt-tui: no terminal to draw on; running headless", file=sys.stderr)
        headless = True
    if headless or distributed:
        from engine.setup import prepare_process

        prepare_process(cfg)
        run_headless(cfg, explicit, task)
    else:
        run_dashboard(cfg, explicit, task, web=web)


def run_headless(cfg: TrainConfig, explicit: frozenset[str] | None, task: Any = None) -> None:
    from engine.control import serve
    from engine.distributed import launched_by_torchrun, leave
    from engine.runner import make_trainer

    from .headless import ConsoleSink

    trainer = make_trainer(cfg, ConsoleSink(), explicit=explicit, task=task)
    trainer.progress = tokenize_progress()
    with SignalStopper(lambda: trainer.stop(save=True), lambda: signal_note(trainer)):
        trainer.setup()
        serve(trainer)
        state = trainer.fit()
    if launched_by_torchrun():
        leave()
    if state == "stopped":
        raise typer.Exit(0)


class StartingRun(LocalController):
    """The dashboard's controller of a run: the trainer's own commands, taken before the trainer
    exists (while the engine thread imports torch and builds it), then the trainer's settings."""

    def __init__(self, cfg: TrainConfig, commands: LocalCommands, template: str | None) -> None:
        self.commands = commands
        self._cfg = cfg
        self._template = template
        self.trainer: Any = None

    @property  # type: ignore[override]
    def cfg(self) -> TrainConfig:
        return self.trainer.cfg if self.trainer is not None else self._cfg

    @property
    def template(self) -> str | None:
        return self._template


def run_dashboard(cfg: TrainConfig, explicit: frozenset[str] | None, task: Any = None, web: Any = None) -> None:
    """Train ``cfg`` under the dashboard; returns (or raises typer.Exit / the engine's error) when done.

    In a terminal the engine runs in a child process (:mod:`tui.engine_process`); for ``--web``, where
    nothing is drawn here, in a thread of this process.
    """
    if web is None:
        run_dashboard_process(cfg, explicit, task)
        return
    run_dashboard_thread(cfg, explicit, task, web)


def run_dashboard_process(cfg: TrainConfig, explicit: frozenset[str] | None, task: Any = None) -> None:
    """The dashboard on an engine in a child process; exits with the child's status and error line."""
    from engine.runs import new_run_path, run_dir_of_config

    from .app import DashboardApp
    from .engine_process import ChildRun, EngineProcess, spec_of

    run_dir = run_dir_of_config(cfg.out, cfg.resume)
    if run_dir is None:  # a new run: its directory is chosen here, so the screen can find the child's channel
        run_dir = new_run_path()
        cfg = cfg.replace(out=run_dir)
        explicit = None if explicit is None else explicit | {"out"}
    recorder = Recorder()
    run = ChildRun(task.template if task is not None else None)
    engine = EngineProcess(spec_of(cfg, explicit, task), run_dir, run, recorder)
    guard = ExitGuard()
    app = DashboardApp(run, recorder, run_dir=run_dir, engine=engine, handle_signals=True, exit_guard=guard)
    engine.start()
    try:
        app.run()
    finally:
        if app.forced:
            run.kill()
        elif engine.is_alive():
            run.cancel_generation()
            run.stop(save=True)
            say("gpt-tui: saving a checkpoint before exit" if not engine.in_setup else "gpt-tui: stopping")
            engine.join()
    guard.disarm()
    if app.forced:
        say("gpt-tui: exiting now; checkpoints on disk are intact")
        os._exit(130)
    engine.join()
    snap = recorder.snapshot()
    last = snap.last_checkpoint.path if snap.last_checkpoint else None
    if engine.result in ("stopped", "finished"):
        say(f"gpt-tui: {engine.result} at step {snap.step}" + (f"; checkpoint {short_path(last)}" if last else ""))
    if engine.error is not None:
        raise engine.error
    if engine.result == "stopped":
        raise typer.Exit(0)


def run_dashboard_thread(cfg: TrainConfig, explicit: frozenset[str] | None, task: Any = None,
                         web: Any = None) -> None:
    """The dashboard (or ``--web``'s server) on an engine thread of this process.

    The app starts first; the engine thread imports torch, applies the process settings and builds
    the trainer, so the screen is up within a fraction of a second instead of after the import."""
    from .app import DashboardApp

    recorder = Recorder()
    run = StartingRun(cfg, LocalCommands(), task.template if task is not None else None)

    def make() -> Any:
        from engine.control import serve
        from engine.runner import make_trainer
        from engine.setup import prepare_process
        from engine.trainer import EngineOptions

        prepare_process(cfg)
        trainer = make_trainer(cfg, recorder, explicit=explicit, task=task, options=EngineOptions.interactive(),
                               commands=run.commands)
        run.trainer = trainer
        engine.after_setup = lambda: serve(trainer)
        return trainer

    engine = EngineThread(None, recorder, make=make)
    guard = ExitGuard()
    app = DashboardApp(run, recorder, run_dir=cfg.out, engine=engine, handle_signals=True, exit_guard=guard)
    engine.start()
    try:
        if web is not None:
            web(app)
        else:
            app.run()
    finally:
        if engine.is_alive() and not app.forced:
            run.cancel_generation()
            run.stop(save=True)
            say("gpt-tui: saving a checkpoint before exit" if run.trainer is not None and not engine.in_setup
                else "gpt-tui: stopping")
            engine.join()
    guard.disarm()
    trainer = run.trainer
    last = trainer.last_checkpoint if trainer is not None else None
    if engine.result in ("stopped", "finished") and trainer is not None:
        say(f"gpt-tui: {engine.result} at step {trainer.step}" + (f"; checkpoint {short_path(last)}" if last else ""))
    if app.forced:
        say("gpt-tui: exiting now; checkpoints on disk are intact")
        os._exit(130)
    if engine.error is not None:
        raise engine.error
    if engine.result == "stopped":
        raise typer.Exit(0)


def attach_run(run_dir: str) -> None:
    """Open the dashboard on a run: live with working keys, or read-only when it has ended."""
    from engine.control import open_run

    from .app import DashboardApp

    controller, recorder, read_only = open_run(run_dir)  # errors first: not a run, process died
    if not has_terminal():
        controller.close()
        fail(f"attach needs a terminal to draw the dashboard on: run it in a terminal (or gpt-tui status {run_dir})")
    try:
        DashboardApp(controller, recorder, run_dir=os.path.abspath(run_dir), read_only=read_only,
                     owns_engine=False).run()
        live = not read_only and controller.connected
        paused = live and controller.paused
    finally:
        controller.close()
    if served_to_browser():
        return  # a browser page (--web): stdout carries the page's protocol, and the page has closed
    if paused:
        print(f"detached; the run stays paused. Resume it (or attach again and press p):\n  gpt-tui resume {run_dir}")
    elif live:
        print(f"detached; the run goes on. Attach again, or stop it:\n  gpt-tui attach {run_dir}\n"
              f"  gpt-tui stop {run_dir}")


def say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
