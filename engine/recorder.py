"""A bounded, thread-safe store of a run's events for a UI to poll, and the snapshot it hands out."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from .events import (
    ChangeEvent,
    CheckpointEvent,
    EvalEvent,
    Event,
    FailedEvent,
    GenerateEvent,
    LogEvent,
    RunStarted,
    SampleEvent,
    StateEvent,
    StepEvent,
)


class StepPoint(NamedTuple):
    """One point of the step history the charts draw."""

    step: int
    tokens: int
    loss: float
    lr: float


@dataclass
class Generation:
    """The text of one live generation so far."""

    prompt: str = ""
    text: str = ""
    done: GenerateEvent | None = None
    note: str | None = None

    @property
    def error(self) -> str | None:
        return self.done.error if self.done is not None else None


@dataclass
class Snapshot:
    """A consistent copy of what the recorder holds (cheap: lists are copied, events shared)."""

    version: int = 0
    steps: list[StepPoint] = field(default_factory=list)
    evals: list[EvalEvent] = field(default_factory=list)
    samples: list[SampleEvent] = field(default_factory=list)
    logs: list[LogEvent] = field(default_factory=list)
    changes: list[ChangeEvent] = field(default_factory=list)
    generations: dict[int, Generation] = field(default_factory=dict)
    last_step: StepEvent | None = None
    start: RunStarted | None = None
    state: str = "starting"
    state_message: str = ""
    last_checkpoint: CheckpointEvent | None = None
    failed: FailedEvent | None = None

    @property
    def step(self) -> int:
        """Steps done so far (from the last step event, else where the run started)."""
        if self.last_step is not None:
            return self.last_step.step
        return self.start.resumed_step if self.start is not None else 0


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
        self.steps: list[StepPoint] = []
        self._stride = 1
        self._pending_step = 0
        self.evals: deque[EvalEvent] = deque(maxlen=max_points)
        self.samples: deque[SampleEvent] = deque(maxlen=max_samples)
        self.logs: deque[LogEvent] = deque(maxlen=200)
        self.changes: deque[ChangeEvent] = deque(maxlen=1000)
        self.generations: dict[int, Generation] = {}
        self.last_step: StepEvent | None = None
        self.start: RunStarted | None = None
        self.state = "starting"
        self.state_message = ""
        self.last_checkpoint: CheckpointEvent | None = None
        self.failed: FailedEvent | None = None
        self.version = 0
        """Bumped on every change, so a UI can skip redraws."""

    def emit(self, event: Event) -> None:
        with self._lock:
            self.version += 1
            if isinstance(event, StepEvent):
                self._add_step(event)
            elif isinstance(event, EvalEvent):
                self.evals.append(event)
            elif isinstance(event, SampleEvent):
                self.samples.append(event)
            elif isinstance(event, GenerateEvent):
                g = self.generations.setdefault(event.request_id, Generation(prompt=event.prompt))
                g.text += event.text
                g.note = g.note or event.note
                if event.done:
                    g.done = event
            elif isinstance(event, CheckpointEvent):
                self.last_checkpoint = event
            elif isinstance(event, StateEvent):
                self.state, self.state_message = event.state, event.message
            elif isinstance(event, RunStarted):
                self.start = event
            elif isinstance(event, FailedEvent):
                self.failed = event
                self.state, self.state_message = "failed", event.error
            elif isinstance(event, ChangeEvent):
                self.changes.append(event)
            elif isinstance(event, LogEvent):
                self.logs.append(event)

    def _add_step(self, e: StepEvent) -> None:
        self.last_step = e
        self._pending_step += 1
        if self._pending_step >= self._stride:
            self._pending_step = 0
            self.steps.append(StepPoint(e.step, e.tokens_seen, e.loss, e.lr))
            if len(self.steps) >= self.max_points:
                self.steps = self.steps[::2]
                self._stride *= 2

    def snapshot(self) -> Snapshot:
        """A consistent copy of everything, cheap enough to take several times a second."""
        with self._lock:
            return Snapshot(
                version=self.version, steps=list(self.steps), evals=list(self.evals), samples=list(self.samples),
                logs=list(self.logs), changes=list(self.changes),
                generations={k: Generation(g.prompt, g.text, g.done, g.note) for k, g in self.generations.items()},
                last_step=self.last_step, start=self.start, state=self.state, state_message=self.state_message,
                last_checkpoint=self.last_checkpoint, failed=self.failed,
            )
