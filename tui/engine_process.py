"""The dashboard's engine in a child process: training and the screen share no interpreter.

``gpt-tui train`` in a terminal starts the engine as ``python -m tui.engine_process SPEC`` (the run's
settings in a JSON file), in a session of its own, and draws the dashboard on it through the run's
control channel, as ``gpt-tui attach`` does. The UI's work (plotext, Textual) then never holds the
engine's interpreter lock between its small ops, which cost a busy 2-core machine a tenth of its speed.

The child trains as the in-process dashboard would (it pauses on divergence and on reaching the target,
keeps serving generations after the last step until told to stop) and writes its lines to
``RUN/train.log``. The parent forwards its setup progress to the screen, stops it with a checkpoint
on q, Ctrl+C, SIGTERM or SIGHUP, and exits with its exit code and its error line. The child stops
with a checkpoint by itself if the parent goes away.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from engine.control import ControlClient, ControlError, RemoteController
from engine.errors import GptTuiError
from engine.events import LogEvent
from engine.recorder import Recorder
from engine.runs import RunDir

_PROGRESS = re.compile(r"tokenizing \[[#.]*\] ([0-9.]+/[0-9.]+ MB)")
_ERROR = re.compile(r"^gpt-tui: error: (.*)$")


class ChildRun:
    """The dashboard's :class:`~engine.commands.RunController` of the child's run: its channel once it
    answers; before that, only a stop (which ends the child's setup)."""

    controls = True

    def __init__(self, template: str | None) -> None:
        self.remote: RemoteController | None = None
        self.proc: subprocess.Popen | None = None
        self._template = template
        self.stop_requested = False

    def _live(self, what: str) -> RemoteController:
        if self.remote is None or not self.remote.connected:
            raise GptTuiError(f"the run is still starting: cannot {what} yet", "wait for its first step")
        return self.remote

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def template(self) -> str | None:
        return self.remote.template if self.remote is not None else self._template

    @property
    def paused(self) -> bool:
        return self.remote.paused if self.remote is not None else False

    def pause(self) -> None:
        self._live("pause").pause()

    def resume(self) -> None:
        self._live("resume").resume()

    def toggle_pause(self) -> bool:
        return self._live("pause").toggle_pause()

    def request_checkpoint(self) -> None:
        self._live("write a checkpoint").request_checkpoint()

    def request_eval(self) -> None:
        self._live("evaluate").request_eval()

    def request_generate(self, prompt: str, settings: Any = None, raw: bool = False) -> int:
        return self._live("generate").request_generate(prompt, settings, raw)

    def cancel_generation(self) -> None:
        if self.remote is not None and self.remote.connected:
            self.remote.cancel_generation()

    def change(self, setting: str, value: str, source: str = "dashboard") -> Any:
        return self._live("change settings").change(setting, value, source)

    def change_many(self, items: list[tuple[str, str]], source: str = "dashboard") -> Any:
        return self._live("change settings").change_many(items, source)

    def stop(self, save: bool = True) -> None:
        """Stop at the next step with a checkpoint; before the channel answers, end the setup."""
        if self.stop_requested:
            return
        self.stop_requested = True
        if self.remote is not None and self.remote.connected:
            try:
                self.remote.stop(save=save)
                return
            except ControlError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the child's first signal: stop with a checkpoint

    def kill(self) -> None:
        """Quit without waiting: the child ends at once (checkpoints on disk are whole)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


class EngineProcess(threading.Thread):
    """Starts the child, connects the controller once its channel answers, waits for it to end.

    It has what the dashboard asks of an engine thread: ``done``, ``in_setup``, ``error`` (set when
    the child failed), ``result`` (finished or stopped) and ``returncode``.
    """

    def __init__(self, spec: dict[str, Any], run_dir: str, run: ChildRun, recorder: Recorder) -> None:
        super().__init__(name="gpt-tui-engine-process", daemon=True)
        self.spec, self.run_dir, self.child, self.recorder = spec, run_dir, run, recorder
        self.in_setup = True
        self.result: str | None = None
        self.error: BaseException | None = None
        self.returncode: int | None = None
        self.log = RunDir(run_dir).train_log
        self._log_pos = 0
        self.error_line = ""

    @property
    def done(self) -> bool:
        return self.ident is not None and not self.is_alive()

    def spawn(self) -> subprocess.Popen:
        os.makedirs(self.run_dir, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="gpt-tui-engine-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.spec, f)
        self._log_pos = os.path.getsize(self.log) if os.path.exists(self.log) else 0
        env = dict(os.environ, PYTHONUNBUFFERED="1", GPT_TUI_ENGINE_PARENT=str(os.getpid()))
        env.pop("GPT_TUI_WEB", None)
        with open(self.log, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} engine of the dashboard\n".encode())
            log.flush()
            return subprocess.Popen([sys.executable, "-m", "tui.engine_process", path], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def run(self) -> None:
        try:
            proc = self.child.proc = self.spawn()
        except OSError as e:
            self.error = GptTuiError(f"could not start the training process ({e})", "check the Python installation")
            return
        self._connect(proc)
        self.returncode = proc.wait()
        self._read_log()
        if self.child.remote is not None:
            self.child.remote.close()
        if self.returncode == 0:
            state = self.recorder.state
            self.result = state if state in ("finished", "stopped") else "stopped"
        elif self.returncode in (-signal.SIGKILL, 130) or (self.returncode == -signal.SIGTERM and self.child.stop_requested):
            self.result = "stopped"
        else:
            code = self.returncode if self.returncode > 0 else 1
            self.error = GptTuiError(self.error_line or f"the training process exited with status {self.returncode}: "
                                     f"see {self.log}", exit_code=code)

    def _connect(self, proc: subprocess.Popen) -> None:
        client = ControlClient(self.run_dir, timeout=2.0)
        self.recorder.emit(LogEvent(level="progress", message="starting the engine (importing torch)"))
        while proc.poll() is None:  # setting up (importing torch, tokenizing) takes as long as it takes; q stops it
            self._read_log()
            try:
                if client.call("status").get("pid") == proc.pid:
                    self.child.remote = RemoteController(self.run_dir, self.recorder).start()
                    self.in_setup = False
                    return
            except ControlError:
                pass
            time.sleep(0.1)

    def _read_log(self) -> None:
        """The child's new lines: tokenizing progress to the screen, the last error line kept."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_pos)
                data = f.read()
        except OSError:
            return
        self._log_pos += len(data)
        for line in re.split(r"[\r\n]+", data.decode("utf-8", "replace")):
            m = _PROGRESS.search(line)
            if m:
                self.recorder.emit(LogEvent(level="progress", message=f"tokenizing {m.group(1)}"))
            e = _ERROR.match(line.strip())
            if e:
                self.error_line = e.group(1)


def spec_of(cfg: Any, explicit: frozenset[str] | None, task: Any) -> dict[str, Any]:
    """What the child needs to build the same trainer."""
    return {"config": cfg.to_dict(), "explicit": sorted(explicit) if explicit is not None else None,
            "task": getattr(task, "name", "pretrain")}


# ------------------------------------------------------------------ the child
def _watch_parent(parent: int, on_gone: Any) -> None:
    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                on_gone()
                return

    threading.Thread(target=watch, name="gpt-tui-parent-watch", daemon=True).start()


def _stop_before_training(signum: int, frame: Any) -> None:
    raise SystemExit(0)  # nothing trained yet: nothing to save


def child_main(spec_path: str) -> None:
    """Train the spec's run headless, as the dashboard's engine: its events on the channel, lines on stdout.

    A stop before the first step (the dashboard's q while torch imports or the corpus is tokenized) ends
    the child at once with status 0; from the first step on, it stops with a checkpoint.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_before_training)
    import typer

    from engine.config import TrainConfig
    from engine.control import serve
    from engine.runner import make_trainer
    from engine.setup import prepare_process
    from engine.trainer import EngineOptions

    from .common import SignalStopper, signal_note, tokenize_progress
    from .headless import ConsoleSink

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    os.unlink(spec_path)
    cfg = TrainConfig.from_dict(spec["config"])
    explicit = frozenset(spec["explicit"]) if spec["explicit"] is not None else None
    task = None
    if spec["task"] == "instruct":
        from engine.instruct import InstructTask

        task = InstructTask()
    prepare_process(cfg)
    trainer = make_trainer(cfg, ConsoleSink(), explicit=explicit, task=task, options=EngineOptions.interactive())
    bar = tokenize_progress()

    def progress(done: int, total: int) -> None:
        if trainer.stopping:
            raise SystemExit(0)  # stopped while tokenizing: finished files' parts are kept
        bar(done, total)

    trainer.progress = progress
    parent = int(os.environ.get("GPT_TUI_ENGINE_PARENT", "0") or 0)
    if parent:
        _watch_parent(parent, lambda: trainer.stop(save=True))
    with SignalStopper(lambda: trainer.stop(save=True), lambda: signal_note(trainer),
                       signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
        trainer.setup()
        serve(trainer)
        trainer.fit()
    raise typer.Exit(0)


if __name__ == "__main__":
    from .common import friendly_errors

    try:
        friendly_errors(child_main)(sys.argv[1])
    except SystemExit as e:
        sys.exit(e.code)
    except BaseException as e:  # typer.Exit and friends
        sys.exit(getattr(e, "exit_code", 1))
