"""The training loop: ``setup -> fit``, controlled through thread-safe commands.

The engine runs in whatever thread calls :meth:`Trainer.fit` and reports through typed events
to a sink. Commands (pause, resume, checkpoint, eval, generate, live changes, stop) may be
called from any thread; they are queued and carried out at the next step boundary, so the
weights are never touched mid-step. While paused the engine does no compute but still serves
commands. What varies is passed in: the task (pretraining or instructions), the strategy
(plain, LoRA, DDP, FSDP), the command source (one process or agreed among ranks).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import checkpoint as ck
from . import run_state
from . import setup as st
from .commands import CommandSource, LocalCommands, LocalController
from .config import LiveChange, TrainConfig
from .device import autocast_factory, memory_mb, peak_flops
from .errors import DivergenceError, GptTuiError, RankLostError, is_out_of_memory
from .events import (
    ChangeEvent,
    CheckpointEvent,
    EvalEvent,
    FailedEvent,
    LogEvent,
    MetricsWriter,
    MultiSink,
    Sink,
    StateEvent,
    StepEvent,
)
from .guard import DivergenceGuard, target_reached
from .inference import generate_text, serve_generation
from .loggers import build_loggers, close_loggers
from .sampling import SampleSettings
from .steps import Batches, StepReader, StepReading
from .strategy import Strategy, strategy_for
from .task import Task, TextTask, eval_text_size

FIRST_SAMPLE_S = 10.0
"""A run with no sample yet (and samples on) writes one after this much training, whatever the cadence."""


@dataclass
class EngineOptions:
    """How the engine behaves around the loop, as its front end wants."""

    pause_on_divergence: bool = False
    """Pause (instead of failing) when the divergence guard trips or the target is reached."""
    keep_serving: bool = False
    """After the last step, go on answering generate and eval until stopped."""
    allow_finished: bool = False
    """Open a run that already finished (to look at it and generate) instead of refusing it."""
    ui_threads: bool = False
    """Leave a core for a user interface when choosing the number of CPU threads."""

    @classmethod
    def interactive(cls) -> EngineOptions:
        """What a dashboard wants: pause to let the user act, keep serving after the end, spare a core."""
        return cls(pause_on_divergence=True, keep_serving=True, allow_finished=True, ui_threads=True)


class Trainer(LocalController):
    """One training run: ``t = Trainer(cfg, sink); t.setup(); t.fit()``.

    ``explicit`` names the settings the user gave (on ``--resume`` only those override the
    checkpoint's; None: all of ``cfg``). ``dist`` is an ``engine.distributed.DistContext``.
    """

    def __init__(self, cfg: TrainConfig, sink: Sink | None = None, *, explicit: frozenset[str] | None = None,
                 task: Task | None = None, strategy: Strategy | None = None, commands: CommandSource | None = None,
                 dist: Any = None, options: EngineOptions | None = None) -> None:
        cfg.validate()
        self.cfg, self.explicit = cfg, explicit
        self.task: Task = task or TextTask()
        self.strategy = strategy or strategy_for(cfg)
        self.commands: Any = commands or LocalCommands()
        self.dist = dist
        self.options = options or EngineOptions()
        self.rank, self.world = (dist.rank, dist.world) if dist else (0, 1)
        self.is_main = self.rank == 0
        self.user_sink, self.sink = sink, MultiSink([sink] if sink else [])
        self.metrics: MetricsWriter | None = None
        self.loggers: list[Any] = []  # --log: TensorBoard, W&B
        self.progress: Callable[[int, int], None] | None = None  # tokenizing progress (bytes done, total)
        self.state = "created"
        self.step = self.tokens_seen = self.steps_per_epoch = self.total_steps = self.warmup = 0
        self.best_val: float | None = None
        self.last_checkpoint: str | None = None
        self.last_eval: tuple[float, float] | None = None
        self.last_eval_step: int | None = None
        self.resumed: ck.Checkpoint | None = None
        self.config_changes: list[str] = []
        self.changes: list[LiveChange] = []
        self.replay: list[LiveChange] = []
        self.guard = DivergenceGuard()
        self.last_sample_step = -1
        self.train_seconds = 0.0  # time spent in steps (not pauses, evals or samples)
        self.lr = 0.0  # --lr's scheduled rate at the last step (each parameter group scales it by its lr_scale)
        self.pause_message = ""
        self.run_dir = ""
        self.device = torch.device("cpu")
        self.dtype = "fp32"
        self.autocast: Callable = autocast_factory(self.device, "fp32")
        self.tokenizer: Any = None
        self.data: Any = None
        self.context = 0
        self.model: Any = None  # the GPT itself
        self.module: Any = None  # what the step calls: the model, or DDP/FSDP/compiled around it
        self.optimizer: Any = None
        self.scaler: Any = None
        self.batches: Batches | None = None
        self.reader = StepReader(self.device)
        self.eval_bytes: tuple[int, int] | None = None  # tokens and bytes of the val windows (bits per byte)

    # ================================================================ setup
    def emit(self, event: Any) -> None:
        if self.is_main:
            self.sink.emit(event)

    def add_sink(self, sink: Sink) -> None:
        """Send the events from now on to ``sink`` too (the control channel's viewers)."""
        self.sink = MultiSink([self.sink, sink])

    def log(self, msg: str, level: str = "info") -> None:
        self.emit(LogEvent(level=level, message=msg, step=self.step))

    def setup(self) -> None:
        """Resolve the settings (on --resume: the checkpoint's), device, data, model, optimizer, schedule."""
        if self.cfg.resume:
            self.resumed = ck.load_checkpoint(self.cfg.resume)
            self.cfg, self.config_changes = st.resume_config(self.cfg, self.explicit, self.resumed, self.world)
        cfg = self.cfg
        self.device = st.run_device(cfg, self.dist.local_rank if self.dist else None)
        self.dtype, self.autocast = st.compute_setup(cfg, self.device, self.options.ui_threads)
        self.run_dir = st.run_path(cfg)
        if self.resumed is None:
            ck.check_new_run_dir(self.run_dir)
        with self.dist.main_first() if self.dist else contextlib.nullcontext():  # rank 0 tokenizes into the shared cache first
            d = self.task.setup_data(cfg, self.resumed, self.progress, lambda m, lv: self.log(m, lv))
        self.tokenizer, self.data, self.context = d.tokenizer, d.data, d.context
        self.steps_per_epoch = st.steps_per_epoch(self.data, cfg.batch_size * self.world * cfg.grad_accum, self.context)
        self.model = st.build_model(cfg, self.tokenizer.vocab_size, self.context, self.resumed, self.strategy,
                                    self.log).to(self.device)
        self.module = self.strategy.wrap(self.model, self.device)
        if cfg.compile:
            if self.device.type == "mps":
                raise GptTuiError("--compile is not supported on MPS", "drop --compile")
            self.module = torch.compile(self.module)
        self.optimizer = st.make_optimizer(cfg, self.model)
        # fp16 needs a gradient scaler on CUDA; MPS runs autocast without one (fp32 is its default).
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == "fp16" and self.device.type == "cuda" else None
        self.total_steps, self.warmup = st.schedule(cfg, self.steps_per_epoch)
        self.batches = Batches(self.data, self.device, cfg.batch_size, cfg.grad_accum, self.steps_per_epoch,
                               self.rank, self.world)
        self.reader = StepReader(self.device)
        if self.resumed is not None:
            run_state.restore(self, self.resumed)
        self._open_run()

    def _open_run(self) -> None:
        if self.step >= self.total_steps and not self.options.allow_finished:
            raise GptTuiError(f"the run in {self.run_dir} already finished ({self.step} of {self.total_steps} steps)",
                              "give a larger --max-steps or --epochs to train it further")
        if self.is_main:
            self.loggers = build_loggers(self.cfg.log, self.run_dir, lambda m: self.log(m, "warning"))
            os.makedirs(ck.ckpt_dir(self.run_dir), exist_ok=True)
            ck.write_json_atomic(os.path.join(self.run_dir, "config.json"), st.run_config(
                self.cfg, self.model, self.tokenizer, self.device, self.dtype, self.world, self.total_steps,
                self.steps_per_epoch))
            self.metrics = MetricsWriter(os.path.join(self.run_dir, "metrics.jsonl"))
            self.sink = MultiSink([self.metrics, *self.loggers, self.sink])
        self.state = "ready"
        self.emit(st.run_started(self))
        for skipped in self.resumed.skipped if self.resumed else []:
            self.log(f"skipped damaged checkpoint {skipped}", "warning")

    # ================================================================ checkpoints
    def epoch_of_step(self, step: int) -> int:
        """The epoch (from 0) in which step ``step`` (from 1) was trained."""
        return max(0, step - 1) // self.steps_per_epoch

    def save_checkpoint(self, reason: str = "periodic") -> str | None:
        """Write a complete checkpoint of the current state (rank 0 writes; all ranks must call)."""
        prev_state = self.state
        self.set_state("saving")
        try:
            captured = run_state.capture(self, reason)
            if captured is None:
                return None
            path = ck.save_checkpoint(ck.checkpoint_name(self.run_dir, self.step), *captured)
            self.last_checkpoint = path
            ck.prune(self.run_dir, self.cfg.keep_last)
            self.emit(CheckpointEvent(step=self.step, path=path, reason=reason))
            return path
        finally:
            self.set_state(prev_state if prev_state != "saving" else "running")

    # ================================================================ the loop
    def set_state(self, state: str, message: str = "") -> None:
        if state != self.state:
            self.state = state
            self.emit(StateEvent(state=state, step=self.step, message=message))

    def tokens_per_step(self) -> int:
        return self.task.tokens_per_step(self)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss, grad norm, finite) as device tensors, read by nobody here.

        A non-finite loss or gradient never reaches the weights: the fused optimizer skips the
        update on the device (its ``found_inf``), so the step needs no host read.
        """
        cfg = self.cfg
        self.lr = lr = st.lr_at(self.step, self.total_steps, cfg, self.warmup)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.module.train()
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.batches.get(self.step, micro)
            with self.strategy.no_sync(self.module, micro == cfg.grad_accum - 1):
                with self.autocast():
                    loss = self.module(x, y) / cfg.grad_accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        gnorm = self.strategy.plain(
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        loss = self.strategy.reduce_mean(total)
        finite = torch.isfinite(loss) & torch.isfinite(gnorm)
        if self.scaler:  # fp16: on overflowing gradients the scaler skips the update and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            finite = torch.isfinite(loss)
        elif getattr(self.optimizer, "defaults", {}).get("fused"):
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
        elif bool(finite):  # an optimizer without device-side skipping needs this one host read
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, gnorm, finite

    def run_step(self, advance: bool = True) -> torch.Tensor:
        """One step outside :meth:`fit` (benchmarks): its loss on the device; ``advance`` counts it."""
        loss = self.train_step()[0]
        if advance:
            self.step += 1
            self.tokens_seen += self.tokens_per_step()
        return loss

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        was = self.model.training
        self.model.eval()
        out = []
        try:
            for split in ("train", "val"):
                losses = []
                for x, y in self.data.eval_batches(split, self.cfg.eval_batches, self.cfg.batch_size):
                    with self.autocast():
                        losses.append(self.model(x.to(self.device), y.to(self.device)).float())
                out.append(float(torch.stack(losses).mean()) if losses else 0.0)  # one device sync per split
        finally:
            self.model.train(was)
        train_loss, val_loss = out
        self.last_eval, self.last_eval_step = (train_loss, val_loss), self.step
        if self.best_val is None or val_loss < self.best_val:
            self.best_val = val_loss
        self.emit(EvalEvent(step=self.step, train_loss=train_loss, val_loss=val_loss, tokens_seen=self.tokens_seen,
                            val_bpb=self._bits_per_byte(val_loss)))
        self._check_target(val_loss)
        return train_loss, val_loss

    def _bits_per_byte(self, val_loss: float) -> float | None:
        if self.eval_bytes is None:  # the same windows every eval: counted once
            self.eval_bytes = eval_text_size(self.data, self.tokenizer, self.cfg.eval_batches, self.cfg.batch_size)
        n_tok, n_bytes = self.eval_bytes
        return val_loss * n_tok / (n_bytes * math.log(2)) if n_bytes else None

    def generate_text(self, prompt: str, settings: SampleSettings, on_token: Callable[[str], None] | None = None,
                      note: Callable[[str], None] | None = None, cancellable: bool = False) -> str:
        """Generate from the live weights without disturbing training (own RNG, eval mode, no grad).

        ``cancellable``: a user's generation, which their cancel stops (the run's own samples are not).
        """
        stop = self.commands.generation_cancelled if cancellable else None
        return generate_text(self.model, self.tokenizer, prompt, settings, self.autocast, stop, on_token, note)

    def apply_change(self, change: LiveChange) -> None:
        """Carry out a live change at this step boundary (recorded, saved with checkpoints)."""
        # lr unset means the preset's: the old value recorded is the one trained with
        change.old = self.cfg.peak_lr() if change.setting == "lr" else getattr(self.cfg, change.setting)
        change.step = self.step
        setattr(self.cfg, change.setting, change.new)
        with contextlib.suppress(ValueError):  # after the setting: a check in between sees it in one place
            self.queued_changes().remove(change)
        self.changes.append(change)
        self.emit(ChangeEvent(step=self.step, setting=change.setting, old=change.old, new=change.new,
                              source=change.source))

    def process_commands(self) -> None:
        """Carry out queued commands; loops here (no compute) while paused."""
        announced = False
        while True:
            self.commands.exchange()
            for kind, arg in self.commands.take():
                self.run_command(kind, arg)
            if self.commands.stop_requested() or not self.commands.is_paused():
                break
            if not announced:
                self.set_state("paused", self.pause_message)
                self.pause_message, announced = "", True
            time.sleep(0.05)
        if announced and not self.commands.stop_requested():
            self.set_state("running")

    def run_command(self, kind: str, arg: Any) -> None:
        self._flush()  # the step events before what the command reports
        if kind == "checkpoint":
            self.save_checkpoint("requested")
        elif kind == "eval":
            self.evaluate()
        elif kind == "generate":
            serve_generation(arg, self.task.template, self.generate_text, self.emit)
        elif kind == "changes":
            for change in arg:
                self.apply_change(change)

    def _boundary(self) -> None:
        """Between steps: replayed changes due now, then the commands."""
        while self.replay and self.replay[0].step <= self.step:
            c = self.replay.pop(0)
            self._flush()
            self.apply_change(LiveChange(c.setting, c.new, source=f"replay ({c.source})"))
        self.process_commands()

    def _flush(self) -> None:
        for r in self.reader.flush():
            self._report(r)

    def fit(self) -> str:
        """Train to the end (or a stop); returns the final state: finished, stopped or paused-diverged."""
        self.set_state("compiling" if self.cfg.compile else "running")
        t_start = time.perf_counter()
        try:
            while self.step < self.total_steps:
                self._boundary()
                if self.commands.stop_requested():
                    break
                t0 = time.perf_counter()
                loss, gnorm, finite = self.train_step()
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                self.step += 1
                self.tokens_seen += self.tokens_per_step()
                info = {"dt": dt, "lr": self.lr, "tokens": self.tokens_seen,
                        "data_time": self.batches.take_wait_time()}
                for r in self.reader.push(self.step, loss, gnorm, finite, info):
                    self._report(r)
                if self._due(self.step):
                    self._flush()
                    self._after_step()
            self._flush()
            return self._finish(t_start)
        except Exception as e:
            err = self.failure(e)
            self.emit(FailedEvent(step=self.step, error=str(err) if isinstance(err, GptTuiError)
                                  else f"{type(err).__name__}: {err}", last_checkpoint=self.last_checkpoint))
            self.set_state("failed", str(err))
            if err is e:
                raise
            raise err from (e if not is_out_of_memory(e) else None)
        finally:
            close_loggers(self.loggers)
            if self.metrics is not None:
                self.metrics.close()

    def _due(self, step: int) -> bool:
        cfg = self.cfg
        every = [cfg.eval_every, cfg.checkpoint_every, int(cfg.sample_every) if str(cfg.sample_every).isdigit() else 0]
        return (any(n and step % n == 0 for n in every) or step % self.steps_per_epoch == 0 or step == 1
                or step >= self.total_steps or self.commands.is_paused() or self.commands.stop_requested()
                or self._first_sample_due())

    def _first_sample_due(self) -> bool:
        """No sample yet and :data:`FIRST_SAMPLE_S` of training done: one now, so there is text to read early."""
        return (self.last_sample_step < 0 and str(self.cfg.sample_every) != "0"
                and self.train_seconds >= FIRST_SAMPLE_S)

    def _after_step(self) -> None:
        """Evals, samples and checkpoints due after this step (the first eval brings the first sample)."""
        cfg, step = self.cfg, self.step
        evaluated = False
        if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
            self.evaluate()
            evaluated = True
        every = str(cfg.sample_every)
        if (every.isdigit() and int(every) and step % int(every) == 0) or (
                every == "epoch" and step % self.steps_per_epoch == 0) or (
                every != "0" and self.last_sample_step < 0 and (evaluated or self._first_sample_due())):
            self.task.samples(self)
            self.last_sample_step = step
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < self.total_steps:
            self.save_checkpoint("periodic")

    def _report(self, r: StepReading) -> None:
        """The step event of a reading, and the divergence guard (one step late on CUDA)."""
        if self.state == "compiling":
            self.set_state("running")
        dt = r.info["dt"]
        tps = self.tokens_per_step() / max(dt, 1e-9)
        peak = peak_flops(self.device, self.dtype)  # a first run's quick probe ends during the first steps
        self.emit(StepEvent(step=r.step, epoch=self.epoch_of_step(r.step), loss=r.loss, lr=r.info["lr"],
                            grad_norm=r.grad_norm, tokens_seen=r.info["tokens"], tokens_per_sec=tps, step_time=dt,
                            mfu=(self.model.flops_per_token(self.context) * tps / peak) if peak else None,
                            memory_mb=memory_mb(self.device), skipped=r.skipped, data_time=r.info["data_time"],
                            end_phase_s=self.task.end_phase_seconds(self)))
        self._guard(r)

    def _finish(self, t_start: float) -> str:
        final = "finished" if self.step >= self.total_steps else "stopped"
        if final == "finished" or self.commands.save_on_stop():
            if final == "finished":
                self.evaluate()
                if str(self.cfg.sample_every) != "0" and self.last_sample_step != self.step:
                    self.task.samples(self)
            self.save_checkpoint("final" if final == "finished" else "stop")
            if final == "finished" and self.is_main:
                self.task.end_phase(self)
        self.set_state(final, f"{self.step} steps in {time.perf_counter() - t_start:.1f}s")
        self._serve_after_finish()
        return final

    def failure(self, e: BaseException) -> BaseException:
        """The error to show for one ``fit`` raised: a lost rank or out of memory in their own words."""
        if is_out_of_memory(e):
            return st.oom_error(self.cfg, self.context, self.step, self.run_dir, self.last_checkpoint)
        lost = e if isinstance(e, GptTuiError) else self.strategy.translate_error(e)
        if isinstance(lost, RankLostError):
            return lost.where(self.step, self.last_checkpoint, self.run_dir)
        return lost or e

    def _serve_after_finish(self) -> None:
        """Carry out what is still queued; with ``keep_serving``, go on (generate, eval) until stopped."""
        for kind, arg in self.commands.take():
            self.run_command(kind, arg)
        while self.options.keep_serving and not self.commands.stop_requested():
            time.sleep(0.05)
            for kind, arg in self.commands.take():
                self.run_command(kind, arg)

    def _guard(self, r: StepReading) -> None:
        """Divergence: fail, or pause with the reason where a UI is there to act on it."""
        if r.skipped:
            self.log(f"step {r.step}: non-finite loss or gradient norm; update skipped", "warning")
        reason = self.guard.check(r.step, r.loss, r.skipped, self.cfg)
        if reason is None:
            return
        msg = f"training diverged: {reason}; last good checkpoint: {self.last_checkpoint or 'none yet'}"
        if not self.options.pause_on_divergence:
            raise DivergenceError(msg, f"lower --lr and resume with --resume {self.run_dir}")
        self.pause_message = msg + " (lower --lr and --resume, or resume to go on)"
        self.log(msg, "error")
        self.guard.bad_steps = 0
        self.commands.pause()

    def _check_target(self, val_loss: float) -> None:
        """Pause (or stop with a checkpoint) when the val loss reaches ``target_val_loss``."""
        msg = target_reached(self.cfg.target_val_loss, val_loss, self.step, self.total_steps)
        if msg is None:
            return
        self.log(msg, "target")
        if self.options.pause_on_divergence:
            self.pause_message = msg
            self.commands.pause()
        else:
            self.commands.stop(save=True)
