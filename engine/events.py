"""Typed events the engine reports, and the sinks that receive them.

The engine calls ``sink.emit(event)`` from its own thread. A sink must return quickly and
never block: the dashboard's sink (:class:`engine.recorder.Recorder`) only appends to bounded
buffers that the UI reads a few times a second. ``to_record`` gives the JSON form written to
``metrics.jsonl`` (every line an object with a ``type``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Protocol


@dataclass
class Event:
    type: ClassVar[str] = "event"
    persisted: ClassVar[bool] = True
    """Written to metrics.jsonl (streamed generation tokens are not)."""
    time: float = field(default_factory=time.time, kw_only=True)

    def to_record(self) -> dict[str, Any]:
        d = {"type": self.type}
        d.update(asdict(self))
        return d


@dataclass
class RunStarted(Event):
    type: ClassVar[str] = "start"
    run_dir: str
    config: dict
    n_params: int
    device: str
    dtype: str
    total_steps: int
    steps_per_epoch: int
    resumed_from: str | None = None
    resumed_step: int = 0
    config_changes: list[str] = field(default_factory=list)
    flops_per_token: float = 0.0
    peak_flops: float | None = None
    n_trainable: int = 0
    world_size: int = 1
    note: str = ""
    resumed_changes: int = 0
    """Live changes the resumed checkpoint already held (the history before them is this branch's)."""
    replayed: list[dict] = field(default_factory=list)
    """Live changes recorded after the resumed checkpoint, applied again at their steps."""
    peak_lr: float | None = None
    """The learning rate the schedule peaks at (--lr, or the preset's or finetuning's default)."""


@dataclass
class StepEvent(Event):
    type: ClassVar[str] = "step"
    step: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    tokens_seen: int
    tokens_per_sec: float
    step_time: float
    mfu: float | None = None
    memory_mb: float | None = None
    skipped: bool = False
    data_time: float = 0.0
    """Seconds of the step spent waiting for its batches."""
    end_phase_s: float = 0.0
    """About how long the work after the last step will take (test responses), for ETAs."""


@dataclass
class EvalEvent(Event):
    type: ClassVar[str] = "eval"
    step: int
    train_loss: float
    val_loss: float
    tokens_seen: int = 0
    val_bpb: float | None = None
    """Val loss in bits per byte of text (comparable across tokenizers)."""


@dataclass
class SampleEvent(Event):
    type: ClassVar[str] = "sample"
    step: int
    epoch: int
    text: str
    prompt: str = ""
    expected: str | None = None


@dataclass
class CheckpointEvent(Event):
    type: ClassVar[str] = "checkpoint"
    step: int
    path: str
    reason: str = "periodic"


@dataclass
class StateEvent(Event):
    """Run state changed: running, paused, saving, finished, failed, stopped."""

    type: ClassVar[str] = "state"
    state: str
    step: int = 0
    message: str = ""


@dataclass
class GenerateEvent(Event):
    """Tokens streamed from a live-weights generation (``done`` on the last one)."""

    type: ClassVar[str] = "generate"
    persisted: ClassVar[bool] = False
    request_id: int
    text: str
    prompt: str = ""
    done: bool = False
    tokens_per_sec: float = 0.0
    error: str | None = None
    """Why the generation could not run (with ``done``)."""
    note: str | None = None
    """Said once, first: e.g. the prompt was cut to the context."""


@dataclass
class ChangeEvent(Event):
    """A setting changed while the run trains; it applies from step ``step + 1``."""

    type: ClassVar[str] = "change"
    step: int
    setting: str
    old: Any
    new: Any
    source: str = "dashboard"


@dataclass
class LogEvent(Event):
    type: ClassVar[str] = "log"
    level: str
    message: str
    step: int = 0


@dataclass
class FailedEvent(Event):
    type: ClassVar[str] = "failed"
    step: int
    error: str
    last_checkpoint: str | None = None


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...


class MultiSink:
    """Send each event to several sinks."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def emit(self, event: Event) -> None:
        for s in self.sinks:
            s.emit(event)


class NullSink:
    def emit(self, event: Event) -> None:
        pass


class MetricsWriter:
    """Appends events as JSON lines to ``metrics.jsonl``, line-buffered."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        if not event.persisted:
            return
        line = json.dumps(event.to_record(), ensure_ascii=False)
        with self._lock:
            if not self._f.closed:
                self._f.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._f.close()


def read_metrics(path: str) -> list[dict]:
    """Records of a ``metrics.jsonl`` (a torn last line is skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out


def _event_classes(base: type[Event]) -> list[type[Event]]:
    out = []
    for cls in base.__subclasses__():
        out += [cls, *_event_classes(cls)]
    return out


EVENT_TYPES: dict[str, type[Event]] = {cls.type: cls for cls in _event_classes(Event)}
"""Every event class by its ``type`` (each subclass of Event is one)."""


def event_from_record(rec: dict) -> Event | None:
    """Rebuild an event from its metrics.jsonl record (for attach and history)."""
    cls = EVENT_TYPES.get(rec.get("type", ""))
    if cls is None:
        return None
    names = {f.name for f in fields(cls)}  # not the ClassVar `type`
    try:
        return cls(**{k: v for k, v in rec.items() if k in names})
    except TypeError:
        return None
