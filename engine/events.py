"""Typed events the engine reports, and the sinks that receive them.

The engine calls ``sink.emit(event)`` from its own thread. A sink must return quickly and
never block: the dashboard's sink (:class:`Recorder`) only appends to bounded buffers that
the UI reads a few times a second. ``to_record`` gives the JSON form written to
``metrics.jsonl`` (every line an object with a ``type``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Protocol


@dataclass
class Event:
    type: ClassVar[str] = "event"
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


@dataclass
class EvalEvent(Event):
    type: ClassVar[str] = "eval"
    step: int
    train_loss: float
    val_loss: float
    tokens_seen: int = 0


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
    request_id: int
    text: str
    prompt: str = ""
    done: bool = False
    tokens_per_sec: float = 0.0


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


# Events written to metrics.jsonl (streamed generation tokens are not).
PERSISTED = {"start", "step", "eval", "sample", "checkpoint", "state", "log", "failed"}


class MetricsWriter:
    """Appends events as JSON lines to ``metrics.jsonl``, line-buffered."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        if event.type not in PERSISTED:
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


class Recorder:
    """Bounded, thread-safe store of events for a UI to poll.

    The engine thread appends (O(1), a lock held for microseconds); the UI calls
    :meth:`snapshot` a few times a second. Step history is kept at full resolution up to
    ``max_points`` and then thinned by half (every other point dropped), so memory stays
    flat over any number of steps while the chart keeps the whole run's shape.
    """

    def __init__(self, max_points: int = 4096, max_samples: int = 500) -> None:
        self._lock = threading.Lock()
        self.max_points = max_points
        self.steps: list[tuple[int, int, float, float]] = []  # step, tokens_seen, loss, lr
        self._stride = 1
        self._pending_step: int = 0
        self.evals: deque[EvalEvent] = deque(maxlen=max_points)
        self.samples: deque[SampleEvent] = deque(maxlen=max_samples)
        self.logs: deque[LogEvent] = deque(maxlen=200)
        self.generations: dict[int, list[str]] = {}
        self.generation_done: dict[int, GenerateEvent] = {}
        self.last_step: StepEvent | None = None
        self.start: RunStarted | None = None
        self.state: str = "starting"
        self.state_message: str = ""
        self.last_checkpoint: CheckpointEvent | None = None
        self.failed: FailedEvent | None = None
        self.version = 0  # bumped on every change, so a UI can skip redraws

    def emit(self, event: Event) -> None:
        with self._lock:
            self.version += 1
            t = event.type
            if t == "step":
                self.last_step = event  # type: ignore[assignment]
                self._pending_step += 1
                if self._pending_step >= self._stride:
                    self._pending_step = 0
                    e: StepEvent = event  # type: ignore[assignment]
                    self.steps.append((e.step, e.tokens_seen, e.loss, e.lr))
                    if len(self.steps) >= self.max_points:
                        self.steps = self.steps[::2]
                        self._stride *= 2
            elif t == "eval":
                self.evals.append(event)  # type: ignore[arg-type]
            elif t == "sample":
                self.samples.append(event)  # type: ignore[arg-type]
            elif t == "generate":
                g: GenerateEvent = event  # type: ignore[assignment]
                self.generations.setdefault(g.request_id, []).append(g.text)
                if g.done:
                    self.generation_done[g.request_id] = g
            elif t == "checkpoint":
                self.last_checkpoint = event  # type: ignore[assignment]
            elif t == "state":
                s: StateEvent = event  # type: ignore[assignment]
                self.state, self.state_message = s.state, s.message
            elif t == "start":
                self.start = event  # type: ignore[assignment]
            elif t == "failed":
                self.failed = event  # type: ignore[assignment]
                self.state = "failed"
                self.state_message = event.error  # type: ignore[attr-defined]
            elif t == "log":
                self.logs.append(event)  # type: ignore[arg-type]

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of everything, cheap enough to take several times a second."""
        with self._lock:
            return {
                "version": self.version,
                "steps": list(self.steps),
                "evals": list(self.evals),
                "samples": list(self.samples),
                "logs": list(self.logs),
                "generations": {k: "".join(v) for k, v in self.generations.items()},
                "generation_done": dict(self.generation_done),
                "last_step": self.last_step,
                "start": self.start,
                "state": self.state,
                "state_message": self.state_message,
                "last_checkpoint": self.last_checkpoint,
                "failed": self.failed,
            }


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (RunStarted, StepEvent, EvalEvent, SampleEvent, CheckpointEvent, StateEvent, GenerateEvent, LogEvent, FailedEvent)
}


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
