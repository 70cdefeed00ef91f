"""A trainer's state to a checkpoint and back: what makes ``--resume`` continue exactly.

:func:`capture` gathers the weights (through the strategy: adapters only for LoRA, gathered
for FSDP), the optimizer, every RNG stream, the data position, the divergence guard, the last
eval and the live changes; :func:`restore` puts them back into a set-up trainer.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import checkpoint as ck
from .config import LiveChange
from .errors import CheckpointError
from .events import read_metrics
from .setup import replayed_changes

if TYPE_CHECKING:
    from .trainer import Trainer


def capture(t: Trainer, reason: str) -> tuple[ck.Checkpoint, ck.CheckpointMeta] | None:
    """The checkpoint of ``t`` now (every rank must call: FSDP gathers; None on the other ranks)."""
    model_state = t.strategy.model_state(t.model)
    opt_state = t.strategy.optimizer_state(t.model, t.optimizer)
    if not t.is_main:
        return None
    cfg, tok = t.cfg, t.tokenizer
    in_epoch = t.step % t.steps_per_epoch
    ckpt = ck.Checkpoint(
        model=model_state, model_config=t.model.cfg.to_dict(), tokenizer=tok.spec(), train_config=cfg.to_dict(),
        kind=t.strategy.kind, step=t.step, epoch=t.epoch_of_step(t.step), tokens_seen=t.tokens_seen,
        best_val=t.best_val, optimizer=opt_state, scaler=t.scaler.state_dict() if t.scaler else None,
        rng=ck.rng_state(), world_size=t.world, extra=t.task.checkpoint_extra(t), lora=t.strategy.lora_info(),
        data={"seed": cfg.seed, "epoch": t.step // t.steps_per_epoch, "step_in_epoch": in_epoch,
              "windows_done": in_epoch * cfg.batch_size * t.world * cfg.grad_accum,
              "train_windows": t.data.train.n_windows, "tokens": t.data.n_tokens},
        guard=t.guard.state(), last_eval=list(t.last_eval) if t.last_eval else None,
        last_eval_step=t.last_eval_step, changes=[vars(c) for c in t.changes])
    fresh = t.last_eval is not None and t.last_eval_step == t.step
    meta = ck.CheckpointMeta(
        step=t.step, kind=t.strategy.kind, reason=reason, epoch=ckpt.epoch, total_steps=t.total_steps,
        tokens_seen=t.tokens_seen, train_loss=t.last_eval[0] if fresh and t.last_eval else None,
        val_loss=t.last_eval[1] if fresh and t.last_eval else None, best_val=t.best_val,
        last_loss=t.guard.last_loss, n_params=t.model.num_params(), model=t.model.cfg.to_dict(),
        tokenizer={"type": tok.spec().get("type"), "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint()})
    return ckpt, meta


def restore(t: Trainer, c: ck.Checkpoint) -> None:
    """Continue from ``c``: weights, optimizer, RNG, data position, guard, last eval, live changes."""
    missing = t.strategy.mismatch(t.model, c.model)
    if missing:
        raise CheckpointError(f"checkpoint {c.path} does not fit this model ({'; '.join(missing[:4])})",
                              "resume with the checkpoint's own settings or start a new run")
    t.strategy.load_model_state(t.model, c.model)
    if c.optimizer:
        t.strategy.load_optimizer_state(t.model, t.optimizer, c.optimizer)
    if t.scaler and c.scaler:
        t.scaler.load_state_dict(c.scaler)
    t.step, t.tokens_seen, t.best_val = c.step, c.tokens_seen, c.best_val
    t.last_sample_step = c.step  # the early first sample is a new run's: a resumed one keeps its schedule
    if c.world_size == t.world and c.rng:
        ck.set_rng_state(c.rng)
    t.guard.load(c.guard)
    if c.last_eval:
        t.last_eval, t.last_eval_step = (c.last_eval[0], c.last_eval[1]), c.last_eval_step
    windows = (c.data or {}).get("train_windows")
    if windows not in (None, t.data.train.n_windows):
        t.config_changes.append(f"data: {windows} -> {t.data.train.n_windows} training windows "
                                "(the data order from here on differs from the original run's)")
    t.changes = [LiveChange(**d) for d in c.changes]
    recorded = replayed_changes(read_metrics(os.path.join(t.run_dir, "metrics.jsonl")), len(t.changes))
    t.replay = [LiveChange(r["setting"], r["new"], r.get("old"), int(r["step"]), r.get("source", "")) for r in recorded]
    t.last_checkpoint = c.path
