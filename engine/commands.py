"""The controller contract: what a dashboard, ``attach`` or a shell command may ask of a run.

Two sides:

* :class:`RunController` is what a UI holds. Three things implement it: the local
  :class:`engine.trainer.Trainer`, the remote controller of a run in another process
  (:class:`engine.control.RemoteController`, through its control channel) and the read-only viewer
  of a run that has ended (:class:`engine.control.ReadOnlyController`, which refuses every command).
  The UI is typed against this Protocol only; it never reaches into a trainer's model or tokenizer.
* :class:`CommandSource` is what the engine's loop reads at each step boundary.
  :class:`LocalCommands` serves one process; :class:`engine.distributed.DistCommands` makes the
  ranks of a torchrun job agree on rank 0's commands.

Commands are queued from any thread and carried out by the engine thread at the next step
boundary, so the weights are never touched mid-step.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .config import LiveChange, TrainConfig
    from .sampling import SampleSettings
    from .task import Task


@dataclass
class GenerateRequest:
    """A generation from the live weights; its text comes back as GenerateEvents with ``request_id``."""

    request_id: int
    prompt: str
    settings: SampleSettings
    raw: bool = False
    """True: the prompt as given, without the run's instruction template."""


@runtime_checkable
class RunController(Protocol):
    """Thread-safe commands to one training run."""

    @property
    def paused(self) -> bool:
        """True while the run is paused (or a pause is requested)."""
        ...

    @property
    def controls(self) -> bool:
        """False for a read-only viewer: the UI then offers no pause, checkpoint, eval or changes."""
        ...

    @property
    def template(self) -> str | None:
        """The instruction template live generations go through (None: the prompt as typed)."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def toggle_pause(self) -> bool:
        """Pause if running, resume if paused; True when now paused."""
        ...

    def request_checkpoint(self) -> None: ...

    def request_eval(self) -> None: ...

    def request_generate(self, prompt: str, settings: SampleSettings | None = None, raw: bool = False) -> int:
        """Queue a generation from the live weights; returns its request id (see GenerateEvent)."""
        ...

    def cancel_generation(self) -> None: ...

    def change(self, setting: str, value: str, source: str = "dashboard") -> LiveChange:
        """Change a setting at the next step boundary (``lr``, ``eval-every`` ...: see
        :data:`engine.config.LIVE_SETTINGS`); raises GptTuiError for a refused value."""
        ...

    def change_many(self, items: list[tuple[str, str]], source: str = "dashboard") -> list[LiveChange]:
        """Several changes, applied together at the same step boundary; none if one is refused."""
        ...

    def stop(self, save: bool = True) -> None:
        """Stop at the next step boundary (saving a checkpoint first when ``save``)."""
        ...


class CommandSource(Protocol):
    """The engine's side: what the loop reads at a step boundary (one thread: the engine's)."""

    queued_changes: list[Any]
    """Live changes put and not yet applied (shared with the controller that checks new ones)."""

    def exchange(self) -> None:
        """Agree on the requests so far (a collective under torchrun; nothing in one process)."""
        ...

    def take(self) -> list[tuple[str, Any]]:
        """The commands to carry out now, in order: (kind, argument)."""
        ...

    def is_paused(self) -> bool: ...

    def stop_requested(self) -> bool: ...

    def save_on_stop(self) -> bool: ...

    def generation_cancelled(self) -> bool: ...

    def pause(self) -> None:
        """Pause from the engine itself (divergence, target reached)."""
        ...


class LocalCommands:
    """Commands of a run in one process: both the controller's requests and the engine's reads."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._paused = threading.Event()
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._save = True
        self._ids = itertools.count(1)
        self.queued_changes: list[Any] = []
        """Live changes put and not yet applied (:meth:`LocalController.queued_changes`)."""

    # ------------------------------------------------------------ controller side
    def put(self, kind: str, arg: Any = None) -> None:
        self._queue.put((kind, arg))

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def toggle_pause(self) -> bool:
        if self._paused.is_set():
            self.resume()
            return False
        self.pause()
        return True

    def new_request_id(self) -> int:
        return next(self._ids)

    def generate(self, req: GenerateRequest) -> None:
        self._cancel.clear()
        self.put("generate", req)

    def cancel_generation(self) -> None:
        self._cancel.set()

    def stop(self, save: bool = True) -> None:
        self._save = save
        self._stop.set()

    # ------------------------------------------------------------ engine side
    def exchange(self) -> None:
        pass

    def take(self) -> list[tuple[str, Any]]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def is_paused(self) -> bool:
        return self._paused.is_set()

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def save_on_stop(self) -> bool:
        return self._save

    def generation_cancelled(self) -> bool:
        return self._cancel.is_set()


class LocalController:
    """:class:`RunController` over a run's own command source (the trainer is one).

    Needs ``commands`` (a :class:`LocalCommands` or ``DistCommands``), ``cfg`` (the live
    TrainConfig, for checking changes) and ``task`` (for its template).
    """

    commands: Any
    cfg: TrainConfig
    task: Task

    @property
    def paused(self) -> bool:
        return self.commands.is_paused()

    @property
    def controls(self) -> bool:
        return True

    @property
    def template(self) -> str | None:
        return self.task.template

    @property
    def stopping(self) -> bool:
        return self.commands.stop_requested()

    def pause(self) -> None:
        self.commands.pause()

    def resume(self) -> None:
        self.commands.resume()

    def toggle_pause(self) -> bool:
        return self.commands.toggle_pause()

    def request_checkpoint(self) -> None:
        self.commands.put("checkpoint")

    def request_eval(self) -> None:
        self.commands.put("eval")

    def request_generate(self, prompt: str, settings: SampleSettings | None = None, raw: bool = False) -> int:
        from .sampling import SampleSettings

        req = GenerateRequest(self.commands.new_request_id(), prompt, (settings or SampleSettings()).validate(), raw)
        self.commands.generate(req)
        return req.request_id

    def cancel_generation(self) -> None:
        self.commands.cancel_generation()

    def change(self, setting: str, value: str, source: str = "dashboard") -> LiveChange:
        """Queue a live change, checked against the settings as they will be once the changes
        queued before it have applied (so ``lr x2`` pressed twice within one step is x4)."""
        return self.change_many([(setting, value)], source)[0]

    def change_many(self, items: list[tuple[str, str]], source: str = "dashboard") -> list[LiveChange]:
        """Queue several changes as one command: all are checked first (none is queued if one is
        refused) and the engine applies them together at the same step boundary."""
        changes = self.check_changes(items, source)
        self.queued_changes().extend(changes)
        self.commands.put("changes", changes)
        return changes

    def check_changes(self, items: list[tuple[str, str]], source: str = "dashboard") -> list[LiveChange]:
        """The changes ``items`` ((setting, value) pairs) would make, each checked against the settings
        with the queued changes and the ones before it applied; GptTuiError names a refused one.
        Nothing is queued."""
        import dataclasses

        from .config import LiveChange, parse_live_change

        queued = {c.setting: c.new for c in list(self.queued_changes())}
        cfg = dataclasses.replace(self.cfg, **queued)
        out = []
        for setting, value in items:
            new = parse_live_change(cfg, setting, value)
            change = LiveChange(setting.strip().replace("-", "_"), new, source=source)
            cfg = dataclasses.replace(cfg, **{change.setting: new})
            out.append(change)
        return out

    def queued_changes(self) -> list[LiveChange]:
        """Changes asked for and not yet applied (the engine removes each as it applies it). They are
        kept with the commands, which the dashboard's controller and the trainer share."""
        return self.commands.queued_changes

    def stop(self, save: bool = True) -> None:
        self.commands.stop(save)
