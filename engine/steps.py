"""The two halves of a step that touch the host: batches in, loss and grad norm out.

On CUDA neither waits for the GPU: :class:`Batches` copies the next micro-batch from pinned
memory on a side stream while the current step runs, and :class:`StepReader` copies a step's
loss and grad norm to pinned host memory without blocking and hands them out one step later.
Elsewhere both do the plain thing at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


class BatchSource(Protocol):
    """What the trainer needs of its data: TextData (windows of a corpus) or InstructionData."""

    def order(self, epoch: int) -> np.ndarray: ...

    def train_batch(self, epoch: int, index: int, batch: int, rank: int = 0, world: int = 1,
                    order: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


class Batches:
    """Micro-batch ``(step, micro)`` of the run on the device, the next one prefetched on CUDA."""

    def __init__(self, data: BatchSource, device: torch.device, batch_size: int, grad_accum: int,
                 steps_per_epoch: int, rank: int = 0, world: int = 1) -> None:
        self.data, self.device = data, device
        self.batch_size, self.grad_accum, self.steps_per_epoch = batch_size, grad_accum, steps_per_epoch
        self.rank, self.world = rank, world
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._next: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None
        self.wait_time = 0.0
        """Seconds spent getting batches since the last :meth:`take_wait_time`."""

    def _host(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            self._order, self._order_epoch = self.data.order(epoch), epoch
        index = in_epoch * self.grad_accum + micro
        return self.data.train_batch(epoch, index, self.batch_size, self.rank, self.world, self._order)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        if self._stream is not None and self._next is not None and self._next[0] == (step, micro):
            _, x, y = self._next
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            x.record_stream(torch.cuda.current_stream(self.device))
            y.record_stream(torch.cuda.current_stream(self.device))
        else:
            x, y = self._to_device(*self._host(step, micro))
        self._next = None
        if self._stream is not None:
            nxt = (step, micro + 1) if micro + 1 < self.grad_accum else (step + 1, 0)
            hx, hy = self._host(*nxt)
            with torch.cuda.stream(self._stream):
                self._next = (nxt, *self._to_device(hx, hy))
        self.wait_time += time.perf_counter() - t0
        return x, y

    def take_wait_time(self) -> float:
        t, self.wait_time = self.wait_time, 0.0
        return t


@dataclass
class StepReading:
    """A step's figures on the host."""

    step: int
    loss: float
    grad_norm: float
    skipped: bool
    info: dict[str, Any]
    """What the loop measured when the step ran (time, lr, tokens ...)."""


class StepReader:
    """Loss and grad norm of each step, read without stalling the GPU.

    :meth:`push` takes a step's device tensors; on CUDA it starts their copy to pinned memory
    and returns the *previous* step's reading (one step late), elsewhere the step's own.
    :meth:`flush` returns what is still pending (before an eval, a checkpoint, the end).
    """

    def __init__(self, device: torch.device, deferred: bool | None = None) -> None:
        self.deferred = device.type == "cuda" if deferred is None else deferred
        self.cuda = device.type == "cuda"
        self._pending: tuple[int, torch.Tensor, Any, dict[str, Any]] | None = None

    def push(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor,
             info: dict[str, Any]) -> list[StepReading]:
        values = torch.stack([loss.float(), grad_norm.float(), finite.float()])
        if not self.deferred:
            return [self._read(step, values, info)]
        out = self.flush()
        event = None
        if self.cuda:
            host = torch.empty(3, dtype=torch.float32, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self._pending = (step, values, event, info)
        return out

    def flush(self) -> list[StepReading]:
        if self._pending is None:
            return []
        step, values, event, info = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return [self._read(step, values, info)]

    @staticmethod
    def _read(step: int, values: torch.Tensor, info: dict[str, Any]) -> StepReading:
        loss, gnorm, finite = values.tolist()
        return StepReading(step, loss, gnorm, not finite, info)
