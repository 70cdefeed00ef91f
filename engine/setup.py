"""Before the loop: the settings of a resumed run, the device, the model and the schedule.

:meth:`engine.trainer.Trainer.setup` calls these in order. Nothing here keeps state; each
function takes what it needs and returns what it made.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint
from .config import MIN_LR_DIVISOR, SAFE_ON_RESUME, WARMUP_SHARE, TrainConfig
from .device import (
    autocast_factory,
    default_threads,
    keep_freed_memory,
    peak_flops,
    resolve_device,
    resolve_dtype,
    setup_device_flags,
)
from .errors import CheckpointError, GptTuiError
from .events import RunStarted
from .model import GPT, PRESETS, ModelConfig
from .strategy import Strategy

KEEP_MEMORY_FROM_PARAMS = 4_000_000
"""Models this big get :func:`engine.device.keep_freed_memory` on CPU (it speeds up ``gpt2``-sized
steps and slows the ``tiny`` preset: the README's speed section has the figures)."""


# ------------------------------------------------------------------ the process
def expected_params(cfg: TrainConfig) -> int | None:
    """About how many parameters the run's model will have, before it is built (None: unknown)."""
    source = cfg.resume or cfg.init
    if source:
        from .weights import expected_params as recorded

        return recorded(source)
    preset = PRESETS[cfg.preset]
    layers, width = cfg.n_layer or preset["n_layer"], cfg.n_embd or preset["n_embd"]
    vocab = 50257 if cfg.effective_tokenizer() == "gpt2" else 256
    blocks = 0 if preset.get("arch") == "bigram" else 12 * layers * width * width
    return blocks + vocab * width


def prepare_process(cfg: TrainConfig) -> None:
    """Process-wide settings, called by the launcher before the engine thread starts: on CPU,
    keep freed memory in the process for models of 4M parameters or more."""
    try:
        cpu = resolve_device(cfg.device).type == "cpu"
    except GptTuiError:  # reported by setup
        return
    n_params = expected_params(cfg)
    if cpu and (n_params is None or n_params >= KEEP_MEMORY_FROM_PARAMS):
        keep_freed_memory()


# ------------------------------------------------------------------ resuming
def _given(cfg: TrainConfig, saved: TrainConfig, explicit: frozenset[str] | None, k: str) -> Any:
    return getattr(cfg, k) if explicit is None or k in explicit else getattr(saved, k)


def safe_on_resume(saved: TrainConfig, new: TrainConfig, explicit: frozenset[str] | None) -> set[str]:
    """Settings that may change on resume: SAFE_ON_RESUME, plus batch size and accumulation
    when their product (the windows per step, hence the data order) stays the same."""
    per_step = _given(new, saved, explicit, "batch_size") * _given(new, saved, explicit, "grad_accum")
    return SAFE_ON_RESUME | ({"batch_size", "grad_accum"} if per_step == saved.batch_size * saved.grad_accum else set())


def resume_config(cfg: TrainConfig, explicit: frozenset[str] | None, ckpt: Checkpoint, world: int,
                  ) -> tuple[TrainConfig, list[str]]:
    """The checkpoint's settings plus the safe changes given now, and a note per change.

    ``explicit`` names the settings given on the command line (None: every setting of ``cfg``
    counts as given). Any other change is refused with one line.
    """
    saved = TrainConfig.from_dict(ckpt.train_config)
    safe = safe_on_resume(saved, cfg, explicit)
    changes, unsafe = [], []
    merged = saved.to_dict()
    for k, v in cfg.to_dict().items():
        if k in ("resume", "out") or (explicit is not None and k not in explicit) or getattr(saved, k) == v:
            continue
        (changes if k in safe else unsafe).append(f"{k}: {getattr(saved, k)!r} -> {v!r}")
        merged[k] = v
    table = ckpt.model_config.get("context_length")
    if table and cfg.context and cfg.context > table and (explicit is None or "context" in explicit):
        raise CheckpointError(
            f"--context {cfg.context} is longer than the position table of the checkpoint's weights ({table})",
            f"use --context {table} or less, or start a new run",
        )
    if unsafe:
        raise GptTuiError(f"cannot resume with changed setting(s) {'; '.join(unsafe)}",
                          "drop those flags (they are fixed by the checkpoint) or start a new run")
    merged["resume"] = cfg.resume
    merged["out"] = cfg.out or ckpt.run_dir
    resumed = TrainConfig.from_dict(merged)
    changes += keep_global_batch(resumed, ckpt.world_size, world)
    return resumed, changes


def keep_global_batch(cfg: Any, saved_world: int, world: int) -> list[str]:
    """Rescale ``cfg`` so that ``batch_size * grad_accum * world`` equals the checkpoint's.

    The per-rank micro-batch is kept where gradient accumulation can take up the difference,
    else the micro-batch changes. Returns a note per change (shown as "changed on resume").
    """
    if saved_world == world:
        return []
    total = cfg.batch_size * cfg.grad_accum * saved_world
    old = (cfg.batch_size, cfg.grad_accum)
    if total % (cfg.batch_size * world) == 0:
        cfg.grad_accum = total // (cfg.batch_size * world)
    elif total % (cfg.grad_accum * world) == 0:
        cfg.batch_size = total // (cfg.grad_accum * world)
    elif total % world == 0:
        cfg.batch_size, cfg.grad_accum = total // world, 1
    else:
        return [f"global batch: {total} -> {cfg.batch_size * cfg.grad_accum * world} windows "
                f"({saved_world} -> {world} ranks; {total} does not divide among {world})"]
    notes = []
    for name, before in zip(("batch_size", "grad_accum"), old, strict=True):
        after = getattr(cfg, name)
        if after != before:
            notes.append(f"{name}: {before} -> {after} (global batch of {total} kept on {world} rank(s) instead of {saved_world})")
    return notes


def replayed_changes(metrics: list[dict], kept: int) -> list[dict]:
    """Live changes recorded in metrics.jsonl after the ``kept`` ones a resumed checkpoint holds.

    A run resumed from an older checkpoint starts a new branch: a ``start`` record with
    ``resumed_changes`` n drops the changes of the abandoned branch after the first n.
    """
    timeline: list[dict] = []
    for rec in metrics:
        if rec.get("type") == "start" and rec.get("resumed_step"):
            del timeline[int(rec.get("resumed_changes") or 0):]
        elif rec.get("type") == "change":
            timeline.append(rec)
    return timeline[kept:]


# ------------------------------------------------------------------ device
def compute_setup(cfg: TrainConfig, device: torch.device, ui_threads: bool) -> tuple[str, Callable]:
    """Device flags and threads; returns (dtype, autocast factory)."""
    setup_device_flags(device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or default_threads(ui_threads))
    dtype = resolve_dtype(cfg.dtype, device)
    return dtype, autocast_factory(device, dtype)


def run_device(cfg: TrainConfig, local_rank: int | None) -> torch.device:
    device = resolve_device(cfg.device)
    if local_rank is not None and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


# ------------------------------------------------------------------ model
def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def build_model(cfg: TrainConfig, vocab_size: int, context: int, resume: Checkpoint | None,
                strategy: Strategy, log: Callable[[str], None]) -> GPT:
    """The model to train: from the checkpoint's architecture, the ``--init`` weights or the preset."""
    seed_everything(cfg.seed)
    if resume is not None:
        model = GPT(ModelConfig.from_dict(resume.model_config))
    elif cfg.init:
        from .weights import load_init_model

        model = load_init_model(cfg.init, cfg.dropout, cfg.context)
    else:
        model = GPT(cfg.model_config(vocab_size), weight_init=cfg.weight_init)
    model = strategy.prepare(model, resume, log)
    if context > model.cfg.context_length:
        raise GptTuiError(
            f"context {context} is longer than the model's position table ({model.cfg.context_length})",
            f"use --context {model.cfg.context_length} or less",
        )
    return model


def make_optimizer(cfg: TrainConfig, model: GPT) -> torch.optim.Optimizer:
    from .optim import build_optimizer  # AdamW (the model's configure_optimizer) or Muon + AdamW

    return build_optimizer(model, cfg)


def steps_per_epoch(data: Any, per_step: int, context: int) -> int:
    """Optimizer steps in one pass over the train split at ``per_step`` windows a step (at least one)."""
    n = data.steps_per_epoch(per_step)
    if n < 1:
        raise GptTuiError(f"the train split has {data.train.n_windows} examples (windows of {context} "
                          f"tokens or records), fewer than one step's batch of {per_step}",
                          "lower --batch-size, --grad-accum or --context, or give more data")
    return n


# ------------------------------------------------------------------ schedule
def schedule(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, warm-up steps) of the run."""
    if cfg.max_steps is not None and cfg.epochs is not None:
        total = min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    elif cfg.max_steps is not None:
        total = cfg.max_steps
    else:
        total = (cfg.epochs or 1) * steps_per_epoch
    if cfg.warmup_steps is None:
        return total, int(WARMUP_SHARE * total)
    if cfg.warmup_steps > total:
        raise GptTuiError(f"--warmup-steps {cfg.warmup_steps} is longer than the run ({total} steps)",
                          f"use --warmup-steps {max(0, total // 10)} or train longer")
    return total, cfg.warmup_steps


def lr_at(step: int, total: int, cfg: TrainConfig, warmup: int) -> float:
    """Linear warm-up from ``initial_lr`` to ``lr``, then cosine decay to ``min_lr``."""
    peak = cfg.peak_lr()
    floor = cfg.min_lr if cfg.min_lr is not None else peak / MIN_LR_DIVISOR
    if warmup > 0 and step < warmup:
        return cfg.initial_lr + (peak - cfg.initial_lr) * step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def run_config(cfg: TrainConfig, model: GPT, tokenizer: Any, device: torch.device, dtype: str, world: int,
               total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
    """What ``RUN/config.json`` says about the run."""
    return {
        "train": cfg.to_dict(), "model": model.cfg.to_dict(),
        "tokenizer": {"type": tokenizer.spec()["type"], "vocab_size": tokenizer.vocab_size,
                      "fingerprint": tokenizer.fingerprint()},
        "device": str(device), "dtype": dtype, "world_size": world, "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch, "n_params": model.num_params(), "torch": torch.__version__,
    }


def run_started(t: Any) -> RunStarted:
    """The first event of a run set up by ``t`` (an ``engine.trainer.Trainer``)."""
    return RunStarted(
        run_dir=t.run_dir, config=t.cfg.to_dict(), n_params=t.model.num_params(),
        n_trainable=sum(p.numel() for p in t.model.parameters() if p.requires_grad), device=str(t.device),
        dtype=t.dtype, total_steps=t.total_steps, steps_per_epoch=t.steps_per_epoch,
        resumed_from=t.resumed.path if t.resumed else None, resumed_step=t.step,
        config_changes=t.config_changes, flops_per_token=t.model.flops_per_token(t.context),
        peak_flops=peak_flops(t.device, t.dtype), world_size=t.world,
        resumed_changes=len(t.changes), replayed=[vars(c) for c in t.replay], peak_lr=t.cfg.peak_lr())


def run_path(cfg: TrainConfig) -> str:
    from .runs import new_run_path

    return os.path.abspath(cfg.out) if cfg.out else new_run_path()


def oom_error(cfg: TrainConfig, context: int, step: int, run_dir: str, last: str | None) -> GptTuiError:
    """Out of memory: name the last good checkpoint and settings that need less memory."""
    problem = (f"out of memory at step {step + 1} (batch {cfg.batch_size} x context {context}); "
               f"last good checkpoint: {last or 'none yet'}")
    if cfg.batch_size > 1:
        p = next(i for i in range(2, cfg.batch_size + 1) if cfg.batch_size % i == 0)
        how = f"--resume {run_dir} " if last else ""
        fix = (f"run again with {how}--batch-size {cfg.batch_size // p} --grad-accum {cfg.grad_accum * p} "
               "(the same tokens per step)")
    else:
        fix = f"start a new run with --context {max(1, context // 2)} or a smaller --preset"
    return GptTuiError(problem, fix)
