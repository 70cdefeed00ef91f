"""The training engine: ``setup -> fit``, controlled through thread-safe commands.

The engine runs in whatever thread calls :meth:`Trainer.fit` and reports through typed
events to a sink. Commands (pause, resume, checkpoint, eval, generate, stop) may be called
from any thread; they are queued and carried out at the next step boundary, so the
weights are never touched mid-step. While paused the engine does no compute but still
serves commands (checkpoint, eval, generate, stop).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import checkpoint as ck
from .config import SAFE_ON_RESUME, TrainConfig
from .data import TextData, build_char_tokenizer, load_tokens, resolve_sources, tokenize_to_cache
from .device import (
    autocast_factory,
    default_threads,
    keep_freed_memory,
    memory_mb,
    peak_flops,
    resolve_device,
    resolve_dtype,
    setup_device_flags,
)
from .errors import CheckpointError, DivergenceError, GptTuiError
from .events import (
    CheckpointEvent,
    EvalEvent,
    FailedEvent,
    GenerateEvent,
    LogEvent,
    MetricsWriter,
    MultiSink,
    RunStarted,
    SampleEvent,
    Sink,
    StateEvent,
    StepEvent,
)
from .loggers import build_loggers, close_loggers
from .model import GPT, PRESETS, ModelConfig, describe_shape_mismatch
from .sampling import SampleSettings, generate_stream
from .tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer, tokenizer_from_spec


def lr_at(step: int, total: int, cfg: TrainConfig, warmup: int) -> float:
    """Linear warm-up from ``initial_lr`` to ``lr``, then cosine decay to ``min_lr``."""
    peak = cfg.peak_lr()
    floor = cfg.min_lr if cfg.min_lr is not None else peak / 10
    if warmup > 0 and step < warmup:
        return cfg.initial_lr + (peak - cfg.initial_lr) * step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


@dataclass
class GenerateRequest:
    request_id: int
    prompt: str
    settings: SampleSettings
    raw: bool = False


@dataclass
class _Commands:
    queue: queue.Queue = field(default_factory=queue.Queue)
    paused: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    cancel_generation: threading.Event = field(default_factory=threading.Event)


KEEP_MEMORY_FROM_PARAMS = 4_000_000
"""Models this big get :func:`engine.device.keep_freed_memory`. Measured in a training thread,
alternating runs: ``gpt2`` 2 x 256 1.26-1.30 s -> 1.06-1.10 s a step, ``small`` with the char
tokenizer (10.7 M) 0.61 -> 0.59 s, but ``tiny`` (0.4 M) 12-14 ms -> 19-20 ms, where one shared
allocator arena costs more than the page faults it saves."""


def _trains_on_cpu(cfg: TrainConfig) -> bool:
    try:
        return resolve_device(cfg.device).type == "cpu"
    except GptTuiError:  # reported by setup()
        return False


def expected_params(cfg: TrainConfig) -> int | None:
    """About how many parameters the run's model will have, before it is built (None: unknown)."""
    source = cfg.resume or cfg.init
    if source:  # a gpt-tui run or checkpoint says in its meta.json; a GPT-2 folder is not known
        try:
            meta = ck.read_meta(ck.resolve_checkpoint(source))
        except GptTuiError:
            return None
        return int(meta["n_params"]) if meta and "n_params" in meta else None
    preset = PRESETS[cfg.preset]
    layers, width = cfg.n_layer or preset["n_layer"], cfg.n_embd or preset["n_embd"]
    vocab = 50257 if cfg.effective_tokenizer() == "gpt2" else 256
    blocks = 0 if preset.get("arch") == "bigram" else 12 * layers * width * width
    return blocks + vocab * width


class Trainer:
    """One training run. Typical use: ``t = Trainer(cfg, sink); t.setup(); t.fit()``."""

    def __init__(self, cfg: TrainConfig, sink: Sink | None = None, with_ui: bool = False,
                 pause_on_divergence: bool | None = None) -> None:
        cfg.validate()
        n_params = expected_params(cfg)
        if _trains_on_cpu(cfg) and (n_params is None or n_params >= KEEP_MEMORY_FROM_PARAMS):
            # Before the engine thread exists, so that it shares the main allocator arena.
            keep_freed_memory()
        self.cfg = cfg
        self.user_sink = sink
        self.with_ui = with_ui
        self.pause_on_divergence = with_ui if pause_on_divergence is None else pause_on_divergence
        self._cmd = _Commands()
        self._next_request = 0
        self.state = "created"
        self.step = 0
        self.tokens_seen = 0
        self.best_val: float | None = None
        self.last_checkpoint: str | None = None
        self.last_eval: tuple[float, float] | None = None
        self.progress: Callable[[int, int], None] | None = None  # tokenization progress (bytes)
        self.rank, self.world = 0, 1
        self.is_main = True
        self.metrics: MetricsWriter | None = None
        self.sink: Sink = sink or MultiSink([])
        self.restored: dict[str, Any] | None = None
        self._recent_losses: deque[float] = deque(maxlen=50)
        self._bad_steps = 0
        self._last_sample_step = -1
        self.prompt_template: Callable[[str], str] | None = None  # set by instruction finetuning

    # ================================================================ commands
    # Thread-safe; carried out by the engine thread at the next step boundary.
    def pause(self) -> None:
        self._cmd.paused.set()

    def resume(self) -> None:
        self._cmd.paused.clear()

    def toggle_pause(self) -> bool:
        """Pause if running, resume if paused; returns True when now paused."""
        if self._cmd.paused.is_set():
            self.resume()
            return False
        self.pause()
        return True

    @property
    def paused(self) -> bool:
        return self._cmd.paused.is_set()

    def request_checkpoint(self) -> None:
        self._cmd.queue.put(("checkpoint", None))

    def request_eval(self) -> None:
        self._cmd.queue.put(("eval", None))

    def request_generate(self, prompt: str, settings: SampleSettings | None = None, raw: bool = False) -> int:
        """Queue a generation from the live weights; returns its request id (see GenerateEvent)."""
        self._next_request += 1
        self._cmd.cancel_generation.clear()
        self._cmd.queue.put(("generate", GenerateRequest(self._next_request, prompt, settings or SampleSettings(), raw)))
        return self._next_request

    def cancel_generation(self) -> None:
        self._cmd.cancel_generation.set()

    def stop(self, save: bool = True) -> None:
        """Stop at the next step boundary (saving a checkpoint first when ``save``)."""
        self._stop_save = save
        self._cmd.stop.set()

    @property
    def stopping(self) -> bool:
        return self._cmd.stop.is_set()

    # =================================================================== setup
    def emit(self, event) -> None:
        if self.is_main:
            self.sink.emit(event)

    def _log(self, msg: str, level: str = "info") -> None:
        self.emit(LogEvent(level=level, message=msg, step=self.step))

    def setup(self) -> None:
        """Resolve device, data, tokenizer, model, optimizer and (on --resume) the saved state."""
        self._setup_distributed()
        resume_ckpt = self._load_resume() if self.cfg.resume else None
        cfg = self.cfg  # on --resume: the checkpoint's settings plus the safe changes
        self.device = resolve_device(cfg.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        setup_device_flags(self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.threads or default_threads(self.with_ui))
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.autocast = autocast_factory(self.device, self.dtype)

        self.run_dir = os.path.abspath(cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
        if resume_ckpt is None:
            self.config_changes = []
            ck.check_new_run_dir(self.run_dir)
        from .distributed import main_first

        with main_first(self):  # under torchrun rank 0 tokenizes into the shared cache first
            self.setup_data(resume_ckpt)
        self.setup_model(resume_ckpt)
        self.setup_schedule()
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
            if self.step >= self.total_steps and not self.with_ui:
                raise GptTuiError(
                    f"the run in {self.run_dir} already finished ({self.step} of {self.total_steps} steps)",
                    "give a larger --max-steps or --epochs to train it further",
                )
        if self.is_main:
            self.loggers = build_loggers(cfg.log, self.run_dir, lambda m: self._log(m, "warning"))
            os.makedirs(ck.ckpt_dir(self.run_dir), exist_ok=True)
            ck.write_json_atomic(os.path.join(self.run_dir, "config.json"), self.run_config())
            self.metrics = MetricsWriter(os.path.join(self.run_dir, "metrics.jsonl"))
            self.sink = MultiSink([self.metrics, *self.loggers, self.user_sink])
        self.state = "ready"
        self.emit(
            RunStarted(
                run_dir=self.run_dir,
                config=self.cfg.to_dict(),
                n_params=self.model_ref.num_params(),
                n_trainable=sum(p.numel() for p in self.model_ref.parameters() if p.requires_grad),
                device=str(self.device),
                dtype=self.dtype,
                total_steps=self.total_steps,
                steps_per_epoch=self.steps_per_epoch,
                resumed_from=self.restored.get("path") if self.restored else None,
                resumed_step=self.step,
                config_changes=self.config_changes,
                flops_per_token=self.model_ref.flops_per_token(self.context),
                peak_flops=peak_flops(self.device, self.dtype),
                world_size=self.world,
            )
        )
        for skipped in (self.restored or {}).get("skipped", []):
            self._log(f"skipped damaged checkpoint {skipped}", "warning")

    def _setup_distributed(self) -> None:
        """Hook for torchrun (see engine.distributed); a single process by default."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from .distributed import init_distributed

            init_distributed(self)

    def _load_resume(self) -> dict[str, Any]:
        """Load the --resume checkpoint and make ``self.cfg`` its settings plus the safe changes."""
        cfg = self.cfg
        obj = ck.load_checkpoint(cfg.resume)
        resume_path = obj["_path"]
        saved_cfg = TrainConfig.from_dict(obj["train_config"])
        self.config_changes = self._diff_config(saved_cfg, cfg, obj.get("model_config"))
        merged = saved_cfg.to_dict()
        explicit = getattr(cfg, "_explicit", None)
        for k in self._safe_on_resume(saved_cfg, cfg):
            if explicit is None or k in explicit:
                merged[k] = getattr(cfg, k)
        merged["resume"] = cfg.resume
        if not cfg.out:
            merged["out"] = os.path.dirname(os.path.dirname(os.path.abspath(resume_path)))
        self.cfg = TrainConfig.from_dict(merged)
        from .distributed import keep_global_batch

        self.config_changes += keep_global_batch(self.cfg, int(obj.get("world_size", 1)), self.world)
        return obj

    @staticmethod
    def _safe_on_resume(saved: TrainConfig, new: TrainConfig) -> set[str]:
        """Settings that may change on resume: SAFE_ON_RESUME, plus batch size and accumulation
        when their product (the windows per step, hence the data order) stays the same."""
        explicit = getattr(new, "_explicit", None)

        def eff(k: str) -> Any:
            return getattr(new, k) if explicit is None or k in explicit else getattr(saved, k)

        same_step = eff("batch_size") * eff("grad_accum") == saved.batch_size * saved.grad_accum
        return SAFE_ON_RESUME | ({"batch_size", "grad_accum"} if same_step else set())

    def _diff_config(self, saved: TrainConfig, new: TrainConfig, model_config: dict | None = None) -> list[str]:
        """Changed settings on resume: the safe ones listed, any other refused with one line."""
        explicit = getattr(new, "_explicit", None)
        safe = self._safe_on_resume(saved, new)
        changes, unsafe = [], []
        for k, v in new.to_dict().items():
            if k in ("resume", "out"):
                continue
            if explicit is not None and k not in explicit:
                continue
            old = getattr(saved, k)
            if old != v:
                (changes if k in safe else unsafe).append(f"{k}: {old!r} -> {v!r}")
        table = (model_config or {}).get("context_length")
        if table and new.context and new.context > table and (explicit is None or "context" in explicit):
            raise CheckpointError(
                f"--context {new.context} is longer than the position table of the checkpoint's weights ({table})",
                f"use --context {table} or less, or start a new run",
            )
        if unsafe:
            raise GptTuiError(
                f"cannot resume with changed setting(s) {'; '.join(unsafe)}",
                "drop those flags (they are fixed by the checkpoint) or start a new run",
            )
        return changes

    def setup_data(self, resume_ckpt: dict | None) -> None:
        cfg = self.cfg
        files = resolve_sources(cfg.data)
        if resume_ckpt is not None:
            tok = tokenizer_from_spec(resume_ckpt["tokenizer"])
        elif cfg.init:
            from .pretrained import init_context_length, init_tokenizer

            tok = init_tokenizer(cfg.init)
            if cfg.context is None:  # default: the init model's own context
                cfg.context = init_context_length(cfg.init)
        elif cfg.effective_tokenizer() == "char":
            tok = build_char_tokenizer(files, cfg.text_field)
        else:
            tok = GPT2Tokenizer()
        self.tokenizer: Tokenizer = tok
        tokens = load_tokens(tokenize_to_cache(files, tok, self.progress, text_field=cfg.text_field))
        self.context = cfg.effective_context()
        stride = cfg.stride or self.context
        self.data = TextData(tokens, self.context, stride, cfg.val_ratio, cfg.seed)
        self.global_batch = cfg.batch_size * self.world
        self.steps_per_epoch = self.data.steps_per_epoch(self.global_batch * cfg.grad_accum)
        if self.steps_per_epoch < 1:
            raise GptTuiError(
                f"train split has {self.data.train.n_windows} windows of {self.context} tokens, "
                f"fewer than one step's batch of {self.global_batch * cfg.grad_accum}",
                "lower --batch-size, --grad-accum or --context, or give more text",
            )

    def build_model(self, vocab_size: int) -> GPT:
        mcfg = self.cfg.model_config(vocab_size)
        return GPT(mcfg, weight_init=self.cfg.weight_init)

    def prepare_model(self, model: GPT, resume_ckpt: dict | None) -> GPT:
        """Hook between building the model and creating its optimizer (LoRA wraps layers here)."""
        return model

    def setup_model(self, resume_ckpt: dict | None) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        if resume_ckpt is not None:
            mcfg = ModelConfig.from_dict(resume_ckpt["model_config"])
            model = GPT(mcfg)
        elif cfg.init:
            from .pretrained import load_init_model

            model = load_init_model(cfg.init, cfg)
        else:
            model = self.build_model(self.tokenizer.vocab_size)
        model = self.prepare_model(model, resume_ckpt)
        if self.context > model.cfg.context_length:
            raise GptTuiError(
                f"context {self.context} is longer than the model's position table ({model.cfg.context_length})",
                f"use --context {model.cfg.context_length} or less",
            )
        self.model_ref = model.to(self.device)
        self.model = self._wrap_model(self.model_ref)
        self.optimizer = self.model_ref.configure_optimizer(
            cfg.peak_lr(), cfg.weight_decay, betas=(cfg.beta1, cfg.beta2)
        )
        # fp16 needs a gradient scaler on CUDA; MPS runs autocast without one (fp32 is its default).
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == "fp16" and self.device.type == "cuda" else None

    def _wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world > 1:
            from .distributed import wrap_model

            model = wrap_model(self, model)
        if self.cfg.compile:
            if self.device.type == "mps":
                raise GptTuiError("--compile is not supported on MPS", "drop --compile")
            model = torch.compile(model)
        return model

    def setup_schedule(self) -> None:
        cfg = self.cfg
        if cfg.max_steps is not None and cfg.epochs is not None:
            total = min(cfg.max_steps, cfg.epochs * self.steps_per_epoch)
        elif cfg.max_steps is not None:
            total = cfg.max_steps
        else:
            total = (cfg.epochs or 1) * self.steps_per_epoch
        self.total_steps = total
        if cfg.warmup_steps is None:
            self.warmup = int(0.05 * total)
        else:
            if cfg.warmup_steps > total:
                raise GptTuiError(
                    f"--warmup-steps {cfg.warmup_steps} is longer than the run ({total} steps)",
                    f"use --warmup-steps {max(0, total // 10)} or train longer",
                )
            self.warmup = cfg.warmup_steps

    # ============================================================ checkpoints
    def run_config(self) -> dict[str, Any]:
        return {
            "train": self.cfg.to_dict(),
            "model": self.model_ref.cfg.to_dict(),
            "tokenizer": {"type": self.tokenizer.spec()["type"], "vocab_size": self.tokenizer.vocab_size,
                          "fingerprint": self.tokenizer.fingerprint()},
            "device": str(self.device),
            "dtype": self.dtype,
            "world_size": self.world,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "n_params": self.model_ref.num_params(),
            "torch": torch.__version__,
        }

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.model_ref.state_dict()

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "kind": "full",
            "model": self.model_state(),
            "model_config": self.model_ref.cfg.to_dict(),
            "optimizer": self.optimizer_state(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "train_config": self.cfg.to_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.step % self.steps_per_epoch,
            "tokens_seen": self.tokens_seen,
            "best_val": self.best_val,
            "rng": ck.rng_state(),
            "tokenizer": self.tokenizer.spec(),
            "world_size": self.world,
            "extra": self.checkpoint_extra(),
            # where the data stream stands: the order is a pure function of (seed, epoch)
            "data": {"seed": self.cfg.seed, "epoch": self.epoch, "step_in_epoch": self.step % self.steps_per_epoch,
                     "windows_done": (self.step % self.steps_per_epoch) * self.global_batch * self.cfg.grad_accum,
                     "train_windows": self.data.train.n_windows, "tokens": self.data.n_tokens},
            "guard": {"recent_losses": list(self._recent_losses), "bad_steps": self._bad_steps},
            "last_eval": list(self.last_eval) if self.last_eval else None,
            "last_eval_step": getattr(self, "last_eval_step", None),
        }

    def checkpoint_extra(self) -> dict[str, Any]:
        return {}

    def save_checkpoint(self, reason: str = "periodic") -> str | None:
        """Write a complete checkpoint of the current state (rank 0 writes; all ranks must call)."""
        prev_state = self.state
        self._set_state("saving")
        try:
            payload = self.checkpoint_payload()
            if not self.is_main:
                return None
            path = ck.checkpoint_name(self.run_dir, self.step)
            fresh = self.last_eval is not None and getattr(self, "last_eval_step", None) == self.step
            meta = {
                "step": self.step,
                "epoch": self.epoch,
                "total_steps": self.total_steps,
                "tokens_seen": self.tokens_seen,
                # losses measured at this very step (None when the last eval is older)
                "train_loss": self.last_eval[0] if fresh else None,
                "val_loss": self.last_eval[1] if fresh else None,
                "best_val": self.best_val,
                "last_loss": self._recent_losses[-1] if self._recent_losses else None,
                "n_params": self.model_ref.num_params(),
                "model": self.model_ref.cfg.to_dict(),
                "tokenizer": {"type": self.tokenizer.spec().get("type"), "vocab_size": self.tokenizer.vocab_size,
                              "fingerprint": self.tokenizer.fingerprint()},
                "kind": payload.get("kind", "full"),
                "reason": reason,
            }
            ck.save_checkpoint(path, payload, meta)
            self.last_checkpoint = path
            ck.prune(self.run_dir, self.cfg.keep_last)
            self.emit(CheckpointEvent(step=self.step, path=path, reason=reason))
            return path
        finally:
            self._set_state(prev_state if prev_state != "saving" else "running")

    def _restore(self, obj: dict[str, Any]) -> None:
        missing = self.state_mismatch(obj["model"])
        if missing:
            raise CheckpointError(
                f"checkpoint {obj['_path']} does not fit this model ({'; '.join(missing[:4])})",
                "resume with the checkpoint's own settings or start a new run",
            )
        self.load_model_state(obj["model"])
        if obj.get("optimizer"):
            self.load_optimizer_state(obj["optimizer"])
        if self.scaler and obj.get("scaler"):
            self.scaler.load_state_dict(obj["scaler"])
        self.step = int(obj["step"])
        self.tokens_seen = int(obj.get("tokens_seen", 0))
        self.best_val = obj.get("best_val")
        if obj.get("world_size", 1) == self.world:
            ck.set_rng_state(obj["rng"])
        guard = obj.get("guard") or {}
        self._recent_losses.extend(guard.get("recent_losses", []))
        self._bad_steps = int(guard.get("bad_steps", 0))
        if obj.get("last_eval"):
            self.last_eval = tuple(obj["last_eval"])
            self.last_eval_step = obj.get("last_eval_step")
        data = obj.get("data") or {}
        if data.get("train_windows") not in (None, self.data.train.n_windows):
            self.config_changes.append(
                f"data: {data['train_windows']} -> {self.data.train.n_windows} training windows "
                "(the data order from here on differs from the original run's)")
        self.restore_extra(obj.get("extra") or {})
        self.last_checkpoint = obj["_path"]
        self.restored = {"path": obj["_path"], "step": self.step, "skipped": obj.get("_skipped", [])}

    def state_mismatch(self, state: dict[str, torch.Tensor]) -> list[str]:
        """How a saved model state differs from the live model (empty when it fits)."""
        return describe_shape_mismatch(self.model_ref, state)

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model_ref.load_state_dict(state)

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def restore_extra(self, extra: dict[str, Any]) -> None:
        pass

    # =============================================================== training
    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _set_state(self, state: str, message: str = "") -> None:
        if state != self.state:
            self.state = state
            self.emit(StateEvent(state=state, step=self.step, message=message))

    def micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != getattr(self, "_order_epoch", None):
            self._order = self.data.order(epoch)
            self._order_epoch = epoch
        index = in_epoch * self.cfg.grad_accum + micro
        x, y = self.data.train_batch(epoch, index, self.cfg.batch_size, self.rank, self.world, self._order)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def no_sync(self, micro: int) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on inner micro-steps (DDP)."""
        if self.world > 1 and micro < self.cfg.grad_accum - 1 and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step; returns (loss, grad norm, skipped)."""
        cfg = self.cfg
        lr = lr_at(self.step, self.total_steps, cfg, self.warmup)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.micro_batch(self.step, micro)
            with self.no_sync(micro):
                with self.autocast():
                    loss = self.model(x, y) / cfg.grad_accum
                if self.scaler:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model_ref.parameters() if p.requires_grad]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        loss_v = self.reduce_loss(total)
        gnorm_v = float(gnorm)
        finite = math.isfinite(loss_v) and math.isfinite(gnorm_v)
        if self.scaler and math.isfinite(loss_v):
            # fp16: on overflowing gradients the scaler skips the update itself and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            finite = True
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_v, gnorm_v, not finite

    def reduce_loss(self, loss: torch.Tensor) -> float:
        if self.world > 1:
            from .distributed import all_reduce_mean

            return all_reduce_mean(loss)
        return float(loss)

    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.context * self.world

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        was = self.model_ref.training
        self.model_ref.eval()
        out = []
        try:
            for split in ("train", "val"):
                losses = []
                for x, y in self.data.eval_batches(split, self.cfg.eval_batches, self.cfg.batch_size):
                    with self.autocast():
                        losses.append(self.model_ref(x.to(self.device), y.to(self.device)).float())
                out.append(float(torch.stack(losses).mean()) if losses else 0.0)  # one device sync per split
        finally:
            self.model_ref.train(was)
        train_loss, val_loss = out
        self.last_eval = (train_loss, val_loss)
        self.last_eval_step = self.step
        if self.best_val is None or val_loss < self.best_val:
            self.best_val = val_loss
        self.emit(EvalEvent(step=self.step, train_loss=train_loss, val_loss=val_loss, tokens_seen=self.tokens_seen))
        return train_loss, val_loss

    def epoch_samples(self) -> None:
        """The per-epoch sample(s): a continuation of --prompt."""
        prompt = self.cfg.prompt
        if isinstance(self.tokenizer, CharTokenizer) and self.tokenizer.unknown(prompt):
            prompt = self.tokenizer.decode(self.data.train.tokens[:1].tolist())
        settings = SampleSettings(max_new_tokens=self.cfg.sample_tokens, temperature=0.8, top_k=50,
                                  seed=self.cfg.seed + self.step)
        text = self.generate_text(prompt, settings)
        self._last_sample_step = self.step
        self.emit(SampleEvent(step=self.step, epoch=self.epoch, text=text, prompt=prompt))

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise GptTuiError("the prompt is empty", "type some text to start from")
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def generate_text(self, prompt: str, settings: SampleSettings, on_token: Callable[[str], None] | None = None) -> str:
        """Generate from the live weights without disturbing training (own RNG, eval mode, no grad)."""
        idx = self.encode_prompt(prompt)
        eot = self.tokenizer.eot_id
        ids: list[int] = []
        emitted = ""
        for nxt in generate_stream(self.model_ref, idx, settings, eot, self._cmd.cancel_generation.is_set,
                                   self.autocast):
            t = int(nxt[0])
            if eot is not None and t == eot:
                break
            ids.append(t)
            if on_token is not None:
                text = self.tokenizer.decode(ids)
                if not text.endswith("\ufffd"):
                    on_token(text[len(emitted):])
                    emitted = text
        text = self.tokenizer.decode(ids)
        if on_token is not None and len(text) > len(emitted):
            on_token(text[len(emitted):])
        return text

    def _serve_generate(self, req: GenerateRequest) -> None:
        t0 = time.perf_counter()
        n = 0
        prompt = req.prompt if (req.raw or self.prompt_template is None) else self.prompt_template(req.prompt)

        def on_token(piece: str) -> None:
            nonlocal n
            n += 1
            self.emit(GenerateEvent(request_id=req.request_id, text=piece, prompt=req.prompt))

        try:
            self.generate_text(prompt, req.settings, on_token)
        except GptTuiError as e:
            self.emit(GenerateEvent(request_id=req.request_id, text=f"[{e}]", prompt=req.prompt, done=True))
            return
        dt = max(1e-9, time.perf_counter() - t0)
        self.emit(GenerateEvent(request_id=req.request_id, text="", prompt=req.prompt, done=True, tokens_per_sec=n / dt))

    def process_commands(self) -> None:
        """Carry out queued commands; loops here (no compute) while paused."""
        announced = False
        while True:
            self.sync_commands()
            self._drain_commands()
            if self._cmd.stop.is_set() or not self._cmd.paused.is_set():
                break
            if not announced:
                self._set_state("paused", self._pause_message)
                self._pause_message = ""
                announced = True
            self.wait_while_paused()
        if announced and not self._cmd.stop.is_set():
            self._set_state("running")

    def wait_while_paused(self) -> None:
        time.sleep(0.05)

    def sync_commands(self) -> None:
        """Under torchrun, every rank takes rank 0's commands and flags here (engine.distributed)."""
        exchange = getattr(self._cmd, "exchange", None)
        if exchange is not None:
            exchange()

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._cmd.queue.get_nowait()
            except queue.Empty:
                return
            self.run_command(kind, arg)

    def run_command(self, kind: str, arg: Any) -> None:
        if kind == "checkpoint":
            self.save_checkpoint("requested")
        elif kind == "eval":
            self.evaluate()
        elif kind == "generate":
            self._serve_generate(arg)

    def fit(self) -> str:
        """Train to the end (or a stop); returns the final state: finished, stopped or paused-diverged."""
        cfg = self.cfg
        self._pause_message = ""
        self._stop_save = getattr(self, "_stop_save", True)
        self._set_state("running")
        t_start = time.perf_counter()
        step_tokens = self.tokens_per_step()
        peak = peak_flops(self.device, self.dtype)
        fpt = self.model_ref.flops_per_token(self.context)
        sample_every = 0 if str(cfg.sample_every) == "epoch" else int(cfg.sample_every)
        try:
            while self.step < self.total_steps:
                self.process_commands()
                if self._cmd.stop.is_set():
                    break
                t0 = time.perf_counter()
                # No device sync beyond the loss and grad norm the step event reports: the GPU finishes
                # the optimizer step while the next batch is prepared (step times are right on average).
                loss, gnorm, skipped = self.train_step()
                dt = time.perf_counter() - t0
                self.step += 1
                self.tokens_seen += step_tokens
                tps = step_tokens / max(dt, 1e-9)
                peak = peak or peak_flops(self.device, self.dtype)  # a first run's quick probe ends during the first steps
                self.emit(
                    StepEvent(
                        step=self.step, epoch=self.epoch if self.step % self.steps_per_epoch else self.epoch - 1,
                        loss=loss, lr=self.optimizer.param_groups[0]["lr"], grad_norm=gnorm,
                        tokens_seen=self.tokens_seen, tokens_per_sec=tps, step_time=dt,
                        mfu=(fpt * tps / peak) if peak else None, memory_mb=memory_mb(self.device), skipped=skipped,
                    )
                )
                self._guard(loss, skipped)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if (sample_every and self.step % sample_every == 0) or (
                    str(cfg.sample_every) == "epoch" and end_of_epoch
                ):
                    self.epoch_samples()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint("periodic")
            final = "finished" if self.step >= self.total_steps else "stopped"
            if final == "finished" or self._stop_save:
                if final == "finished":
                    self.evaluate()
                    if str(cfg.sample_every) != "0" and self._last_sample_step != self.step:
                        self.epoch_samples()
                    self.on_finish()
                self.save_checkpoint("final" if final == "finished" else "stop")
            self._set_state(final, f"{self.step} steps in {time.perf_counter() - t_start:.1f}s")
            self._serve_after_finish()
            return final
        except DivergenceError as e:
            self.emit(FailedEvent(step=self.step, error=str(e), last_checkpoint=self.last_checkpoint))
            self._set_state("failed", str(e))
            raise
        except Exception as e:
            msg = f"{type(e).__name__}: {e}" if not isinstance(e, GptTuiError) else str(e)
            oom = self._oom_error() if isinstance(e, torch.OutOfMemoryError) else None
            if oom is not None:
                msg = str(oom)
            self.emit(FailedEvent(step=self.step, error=msg, last_checkpoint=self.last_checkpoint))
            self._set_state("failed", msg)
            if oom is not None:
                raise oom from None
            raise
        finally:
            close_loggers(getattr(self, "loggers", []))
            if self.metrics is not None:
                self.metrics.close()

    def _oom_error(self) -> GptTuiError:
        """Out of memory: name the last good checkpoint and settings that need less memory."""
        cfg, last = self.cfg, self.last_checkpoint or "none yet"
        problem = (f"out of memory at step {self.step + 1} (batch {cfg.batch_size} x context {self.context}); "
                   f"last good checkpoint: {last}")
        if cfg.batch_size > 1:
            p = next(i for i in range(2, cfg.batch_size + 1) if cfg.batch_size % i == 0)
            b, a = cfg.batch_size // p, cfg.grad_accum * p
            how = f"--resume {self.run_dir} " if self.last_checkpoint else ""
            fix = f"run again with {how}--batch-size {b} --grad-accum {a} (the same tokens per step)"
        else:
            fix = f"start a new run with --context {max(1, self.context // 2)} or a smaller --preset"
        return GptTuiError(problem, fix)

    def _serve_after_finish(self) -> None:
        """Carry out what is still queued; with a UI, keep serving (generate, eval) until stopped."""
        self._drain_commands()
        while self.with_ui and not self._cmd.stop.is_set():
            time.sleep(0.05)
            self._drain_commands()

    def on_finish(self) -> None:
        """Hook run after the last step (finetuning writes its test responses here)."""

    def _guard(self, loss: float, skipped: bool) -> None:
        """Divergence guard: skipped non-finite steps and loss spikes."""
        cfg = self.cfg
        reason = None
        if skipped:
            self._bad_steps += 1
            self._log(f"step {self.step}: non-finite loss or gradient norm; update skipped", "warning")
            if self._bad_steps >= cfg.max_bad_steps:
                reason = f"{self._bad_steps} non-finite steps in a row at step {self.step}"
        else:
            self._bad_steps = 0
            if cfg.spike_factor > 0 and len(self._recent_losses) >= 20:
                mean = sum(self._recent_losses) / len(self._recent_losses)
                if loss > cfg.spike_factor * mean:
                    reason = f"loss {loss:.3f} at step {self.step} is over {cfg.spike_factor:g}x its recent mean {mean:.3f}"
            self._recent_losses.append(loss)
        if reason is None:
            return
        last = self.last_checkpoint or "none yet"
        msg = f"training diverged: {reason}; last good checkpoint: {last}"
        if self.pause_on_divergence:
            self._pause_message = msg + " (lower --lr and --resume, or press p to continue)"
            self._log(msg, "error")
            self._bad_steps = 0
            self.pause()
        else:
            raise DivergenceError(msg, f"lower --lr and resume with --resume {self.run_dir}")
