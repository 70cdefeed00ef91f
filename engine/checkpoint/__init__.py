"""Checkpoints: :mod:`.io` writes and checks the files, :mod:`.format` owns what they hold."""

from .format import (
    FORMAT,
    Checkpoint,
    CheckpointMeta,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
    upgrade,
)
from .io import (
    best_checkpoint,
    by_write_time,
    check_new_run_dir,
    checkpoint_name,
    ckpt_dir,
    list_checkpoints,
    meta_path,
    prune,
    read_meta,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
    verify_checkpoint,
    write_json_atomic,
)

__all__ = [
    "FORMAT", "Checkpoint", "CheckpointMeta", "best_checkpoint", "by_write_time", "check_new_run_dir",
    "checkpoint_name", "ckpt_dir", "list_checkpoints", "load_checkpoint", "meta_path", "prune", "read_checkpoint_meta",
    "read_meta", "resolve_checkpoint", "rng_state", "set_rng_state", "save_checkpoint", "upgrade", "verify_checkpoint",
    "write_json_atomic",
]
