"""The UI side of a run's control channel: serving it, and driving a run in another process.

:func:`serve_control` opens the channel of a run in this process (headless runs and rank 0 of a
torchrun job). :class:`RemoteController` has the trainer's command interface (what the
dashboard calls) but talks to a run in another process, and keeps a
:class:`engine.events.Recorder` fed: first with the history in ``metrics.jsonl``, then live.
:func:`attach_run` opens the dashboard on a run directory: live when its process answers,
read-only when the run has ended.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from engine.control import (
    FINAL_STATES,
    ControlClient,
    ControlError,
    EventStream,
    is_run_dir,
    last_state,
    serve,
    settings_to_dict,
)
from engine.events import LogEvent, Recorder, event_from_record, read_metrics

if TYPE_CHECKING:
    from engine.sampling import SampleSettings


def run_dir_of(cfg: Any) -> str | None:
    """The run directory a training config writes to, when it is known before setup (--out, --resume)."""
    if cfg.out:
        return os.path.abspath(cfg.out)
    if cfg.resume:
        from engine.checkpoint import resolve_checkpoint

        return os.path.dirname(os.path.dirname(os.path.abspath(resolve_checkpoint(cfg.resume))))
    return None


def refuse_live_run(cfg: Any) -> None:
    """Fail when another process is training into the run directory of ``cfg``."""
    run_dir = run_dir_of(cfg)
    if run_dir is None or not is_run_dir(run_dir):
        return
    try:
        st = ControlClient(run_dir, timeout=2.0).call("status")
    except ControlError:
        return
    raise ControlError(f"run {run_dir} is already being trained by process {st['pid']}",
                       f"attach with gpt-tui attach {run_dir}, stop it with gpt-tui stop {run_dir}, "
                       "or choose another --out")


def serve_control(trainer: Any) -> Any:
    """Open the control channel of a set-up trainer (only rank 0 serves under torchrun)."""
    return serve(trainer)


def _key(rec: dict[str, Any]) -> tuple[Any, ...]:
    return rec.get("type"), rec.get("time"), rec.get("step")


def load_history(run_dir: str, recorder: Recorder) -> set[tuple[Any, ...]]:
    """Feed the records of ``RUN/metrics.jsonl`` to ``recorder``; returns their keys (to skip repeats)."""
    seen = set()
    for rec in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        event = event_from_record(rec)
        if event is not None:
            recorder.emit(event)
            seen.add(_key(rec))
    return seen


class RemoteController:
    """The dashboard's controller for a run in another process (through its control channel).

    Same interface as the trainer's commands: ``toggle_pause()``, ``paused``,
    ``request_checkpoint()``, ``request_eval()``, ``request_generate(prompt, settings)``,
    ``cancel_generation()``, ``stop(save=True)``. :meth:`start` rebuilds the history into
    ``recorder`` and starts a thread that feeds it the live events; ``connected`` turns False
    when the run's process goes away. Quitting the viewer (:meth:`close`) leaves the run going.
    """

    def __init__(self, run_dir: str, recorder: Recorder | None = None) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.recorder = recorder or Recorder()
        self.client = ControlClient(self.run_dir)
        self.connected = False
        self._paused = False
        self._stream: EventStream | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> RemoteController:
        """Subscribe, load the history, then follow live (raises ControlError when the run is not live)."""
        self._stream = self.client.subscribe()  # first, so no event falls between history and live
        self._paused = bool(self._stream.status.get("paused"))
        seen = load_history(self.run_dir, self.recorder)
        self.connected = True
        self._thread = threading.Thread(target=self._follow, args=(self._stream, seen), name="gpt-tui-attach",
                                        daemon=True)
        self._thread.start()
        return self

    def _follow(self, stream: EventStream, seen: set[tuple[Any, ...]]) -> None:
        for rec in stream:
            if _key(rec) in seen:
                continue
            event = event_from_record(rec)
            if event is None:
                continue
            if rec.get("type") == "state":
                self._paused = rec.get("state") == "paused"
            self.recorder.emit(event)
        if self.connected:
            self.connected = False
            if self.recorder.state not in FINAL_STATES:
                self.recorder.emit(LogEvent(level="warning", message=(
                    "the run's process closed the control channel; "
                    f"if it died, continue it with gpt-tui train --resume {self.run_dir}")))

    def close(self) -> None:
        """Stop following (the run keeps training)."""
        self.connected = False
        if self._stream is not None:
            self._stream.close()

    # --------------------------------------------------------------- commands
    @property
    def paused(self) -> bool:
        return self._paused

    def toggle_pause(self) -> bool:
        self._paused = bool(self.client.call("toggle_pause")["paused"])
        return self._paused

    def pause(self) -> None:
        self.client.call("pause")

    def resume(self) -> None:
        self.client.call("resume")

    def request_checkpoint(self) -> None:
        self.client.call("checkpoint")

    def request_eval(self) -> None:
        self.client.call("eval")

    def request_generate(self, prompt: str, settings: SampleSettings | None = None, raw: bool = False) -> int:
        return int(self.client.call("generate", prompt=prompt, settings=settings_to_dict(settings), raw=raw)["id"])

    def cancel_generation(self) -> None:
        self.client.call("cancel_generation")

    def stop(self, save: bool = True) -> None:
        self.client.call("stop", save=save)


class ReadOnlyController:
    """The controller of a run that has ended: nothing to command (the dashboard shows it read-only)."""

    paused = False
    connected = False

    def __init__(self, run_dir: str) -> None:
        self.run_dir = os.path.abspath(run_dir)

    def _refuse(self, *args: Any, **kw: Any) -> Any:
        raise ControlError(f"run {self.run_dir} has ended; it is shown read-only",
                           f"continue it with gpt-tui train --resume {self.run_dir}")

    toggle_pause = request_checkpoint = request_eval = request_generate = cancel_generation = stop = _refuse

    def close(self) -> None:
        pass


def open_run(run_dir: str) -> tuple[Any, Recorder, bool]:
    """(controller, recorder, read_only) for a run directory; ControlError when there is nothing to show."""
    run_dir = os.path.abspath(run_dir)
    if not is_run_dir(run_dir):
        raise ControlError(f"{run_dir} is not a gpt-tui run directory (no metrics.jsonl or config.json)",
                           "give the directory a `gpt-tui train` run writes to (its --out)")
    recorder = Recorder()
    try:
        return RemoteController(run_dir, recorder).start(), recorder, False
    except ControlError:
        state, _ = last_state(run_dir)
        if state not in FINAL_STATES:
            raise  # the process died mid-run: the error offers --resume
    load_history(run_dir, recorder)
    return ReadOnlyController(run_dir), recorder, True


def attach_run(run_dir: str) -> None:
    """Open the dashboard on a run: live with working keys, or read-only when it has ended."""
    from .app import DashboardApp
    from .common import fail, has_terminal

    controller, recorder, read_only = open_run(run_dir)  # errors first: not a run, process died
    if not has_terminal():
        controller.close()
        fail(f"attach needs a terminal to draw the dashboard on: run it in a terminal (or gpt-tui status {run_dir})")
    try:
        DashboardApp(controller, recorder, run_dir=os.path.abspath(run_dir), read_only=read_only,
                     owns_engine=False).run()
        live = not read_only and controller.connected
    finally:
        controller.close()
    if live:
        print(f"detached; the run goes on. Attach again: gpt-tui attach {run_dir}   stop it: gpt-tui stop {run_dir}")
