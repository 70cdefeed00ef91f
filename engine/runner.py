"""A trainer for a config as this process was started: one process, or a rank under torchrun."""

from __future__ import annotations

from .commands import LocalCommands
from .config import TrainConfig
from .events import Sink
from .task import Task
from .trainer import EngineOptions, Trainer


def make_trainer(cfg: TrainConfig, sink: Sink | None = None, *, explicit: frozenset[str] | None = None,
                 task: Task | None = None, options: EngineOptions | None = None,
                 commands: LocalCommands | None = None) -> Trainer:
    """The trainer for ``cfg``: under torchrun it joins the job (DDP or FSDP, agreed commands).

    ``commands``: the command source of a one-process run, made before the trainer (a dashboard
    takes commands while torch is still being imported)."""
    from .distributed import join, launched_by_torchrun

    if not launched_by_torchrun():
        return Trainer(cfg, sink, explicit=explicit, task=task, options=options, commands=commands)
    cfg, ctx, commands, strategy = join(cfg)
    explicit = explicit | {"out"} if explicit is not None and cfg.out else explicit
    return Trainer(cfg, sink, explicit=explicit, task=task, strategy=strategy, commands=commands, dist=ctx,
                   options=options)
