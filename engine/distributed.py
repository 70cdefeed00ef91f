"""Data parallelism under torchrun: DDP (or FSDP with ``--fsdp``) and ranks that agree on commands.

``torchrun --nproc_per_node N $(which gpt-tui) train --headless ...`` starts N copies of the
trainer. Each reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from torchrun, joins the process group
(NCCL on CUDA, gloo on CPU) and trains on its own slice of every global batch
(:meth:`engine.data.TextData.train_batch`). Rank 0 alone writes metrics and checkpoints, prints
and serves the control channel; the other ranks send their stdout and stderr to
``RUN/rank-N.log``.

Commands reach rank 0 only (from the control channel, the dashboard or a signal), so at every
step boundary the ranks exchange them (:class:`DistCommands`): rank 0's pause flag and command
queue, and any rank's stop request, travel over a CPU (gloo) group, and every rank carries out the
same commands at the same step. A paused rank 0 keeps exchanging about 20 times a second, so the
other ranks wait in that exchange instead of in a gradient all-reduce that the NCCL watchdog
would time out.

Checkpoints are always single-process checkpoints: DDP's weights are rank 0's; FSDP gathers the
full model and optimizer state to rank 0 and stores the optimizer state in the plain
``torch.optim`` layout. The data order is a pure function of seed, epoch and step, and on resume
with a different number of ranks the global batch is kept (:func:`keep_global_batch`), so a
checkpoint from N ranks continues on M ranks where it left off.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import queue
import random
import re
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from .errors import GptTuiError

# How long a rank may wait for rank 0 in a command exchange or the data barrier (tokenizing a
# large corpus, writing a large checkpoint, a long generation): much longer than NCCL's 10 minutes.
CONTROL_TIMEOUT = datetime.timedelta(hours=6)

# Substrings of the errors gloo and NCCL raise when a peer process is gone.
_PEER_ERRORS = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
                "nccl", "gloo", "timed out", "timeout", "connection refused", "peer")


class RankLostError(GptTuiError):
    """Another process of the torchrun job is gone."""


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(trainer: Any) -> None:
    """Join torchrun's process group and make ``trainer`` a rank of it.

    Sets ``trainer.rank``, ``trainer.world`` and ``trainer.is_main``; agrees on the run directory;
    sends the stdout/stderr of ranks other than 0 to ``RUN/rank-N.log``; replaces the trainer's
    command state with :class:`DistCommands` so every rank acts on rank 0's commands.
    """
    from .device import resolve_device

    rank, world, local_rank = world_from_env()
    device = resolve_device(trainer.cfg.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend)
        except Exception as e:  # noqa: BLE001
            raise GptTuiError(
                f"could not join the torchrun job as rank {rank} of {world} ({type(e).__name__}: {str(e)[:160]})",
                "check torchrun's --nnodes/--node-rank/--rdzv-endpoint (or --master-addr/--master-port)",
            ) from None
    trainer.rank, trainer.world, trainer.is_main = rank, world, rank == 0
    trainer._dist_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    cfg = trainer.cfg
    if not cfg.out and not cfg.resume:
        # One run directory for all ranks (each would otherwise stamp its own time).
        name = [os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))]
        dist.broadcast_object_list(name, src=0, group=trainer._dist_group)
        cfg.out = name[0]
    if rank != 0:
        redirect_output(os.path.join(_run_dir(cfg), f"rank-{rank}.log"))
    trainer._cmd = DistCommands(trainer)
    _wrap_collective_errors(trainer)
    atexit.register(_shutdown, trainer)


def _run_dir(cfg: Any) -> str:
    """The run directory this config trains into (as ``Trainer.setup`` works it out)."""
    if cfg.out:
        return os.path.abspath(cfg.out)
    from .checkpoint import resolve_checkpoint

    path = resolve_checkpoint(cfg.resume)
    return os.path.dirname(os.path.dirname(os.path.abspath(path)))


def redirect_output(path: str) -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2 too) at ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115


def _shutdown(trainer: Any) -> None:
    # Only after a clean end: with a lost peer, tearing down NCCL can block.
    if dist.is_initialized() and trainer.state in ("finished", "stopped"):
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def main_first(trainer: Any) -> Iterator[None]:
    """Rank 0 runs the block first (tokenizing into the shared cache), then the others."""
    group = getattr(trainer, "_dist_group", None)
    if trainer.world > 1 and group is not None and not trainer.is_main:
        dist.barrier(group=group)
    yield
    if trainer.world > 1 and group is not None and trainer.is_main:
        dist.barrier(group=group)


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


def all_reduce_mean(t: torch.Tensor) -> float:
    """The mean of a scalar over all ranks."""
    t = t.detach().clone().float()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / dist.get_world_size()


# ============================================================== collective faults
def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception looks like a collective that failed because a peer is gone."""
    if isinstance(e, GptTuiError):
        return False
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in msg for s in _PEER_ERRORS)


def rank_lost(trainer: Any, e: BaseException) -> RankLostError:
    """The one-line error for a lost peer, naming the last checkpoint and how to resume."""
    first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [""])[0])  # gloo's source location
    first = first.split(". ")[0][:120]
    run_dir = getattr(trainer, "run_dir", None) or "the run directory"
    last = trainer.last_checkpoint or "none written yet"
    return RankLostError(
        f"rank {trainer.rank}: lost contact with another process of the torchrun job at step {trainer.step} "
        f"({type(e).__name__}: {first}); last checkpoint: {last}",
        f"see torchrun's report and {run_dir}/rank-*.log, then continue with --resume {run_dir}",
        exit_code=1,
    )


def _wrap_collective_errors(trainer: Any) -> None:
    """Turn a peer's death during a training step into :class:`RankLostError`."""
    step = trainer.train_step

    def train_step(*args: Any, **kw: Any) -> Any:
        try:
            return step(*args, **kw)
        except Exception as e:
            if is_peer_failure(e):
                raise rank_lost(trainer, e) from e
            raise

    trainer.train_step = train_step


# ============================================================ agreed commands
class _AgreedFlag:
    """A flag set from any thread (requested) whose value the engine reads only as agreed by all ranks."""

    def __init__(self) -> None:
        self.requested = False
        self.agreed = False

    def set(self) -> None:
        self.requested = True

    def clear(self) -> None:
        self.requested = False

    def is_set(self) -> bool:
        return self.agreed


class _AgreedQueue:
    """Commands put from any thread; the engine gets only those handed out by an exchange."""

    def __init__(self) -> None:
        self.pending: queue.Queue = queue.Queue()
        self.agreed: queue.Queue = queue.Queue()

    def put(self, item: Any) -> None:
        self.pending.put(item)

    def get_nowait(self) -> Any:
        return self.agreed.get_nowait()

    def take_pending(self) -> list[Any]:
        out = []
        while True:
            try:
                out.append(self.pending.get_nowait())
            except queue.Empty:
                return out


class _SyncedFlag(threading.Event):
    """An event whose ``is_set`` is agreed among the ranks (a collective: all ranks call it together).

    Used for cancelling a generation under FSDP, where every rank runs the same generation.
    """

    def __init__(self, group: Any) -> None:
        super().__init__()
        self.group = group

    def is_set(self) -> bool:
        t = torch.tensor([1 if super().is_set() else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())


class DistCommands:
    """The trainer's command state under torchrun (drop-in for ``Trainer._cmd``).

    ``pause``/``stop``/``queue`` record requests; :meth:`exchange` (called by every rank at every
    step boundary and while paused, via ``Trainer.sync_commands``) turns rank 0's requests, and a
    stop asked of any rank, into the agreed flags and commands that all ranks act on.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.group = trainer._dist_group
        self.queue = _AgreedQueue()
        self.paused = _AgreedFlag()
        self.stop = _AgreedFlag()
        self.cancel_generation: threading.Event = threading.Event()

    def exchange(self) -> None:
        """One round: agree on pause, stop (and whether to save) and rank 0's commands."""
        t = self.trainer
        cmds = self.queue.take_pending() if t.is_main else []
        stop_code = 0
        if self.stop.requested:
            stop_code = 1 if getattr(t, "_stop_save", True) else 2
        flags = torch.tensor([int(t.is_main and self.paused.requested), stop_code, len(cmds)], dtype=torch.int64)
        try:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            if int(flags[2]):
                if t.is_main:
                    cmds = [_shareable(c) for c in cmds]
                box = [cmds]
                dist.broadcast_object_list(box, src=0, group=self.group)
                cmds = box[0]
        except Exception as e:
            if is_peer_failure(e):
                raise rank_lost(t, e) from e
            raise
        paused, stop, _ = (int(v) for v in flags)
        self.paused.agreed = bool(paused)
        if stop and not self.stop.agreed:
            self.stop.agreed = True
            t._stop_save = stop == 1
        fsdp = getattr(t, "fsdp", False)
        for kind, arg in cmds:
            if kind == "generate" and not t.is_main and not fsdp:
                continue  # DDP: rank 0 generates from its own replica
            self.queue.agreed.put((kind, arg))


def _shareable(cmd: tuple[str, Any]) -> tuple[str, Any]:
    """Give a generation a fixed seed, so that every rank (under FSDP) samples the same tokens."""
    kind, arg = cmd
    if kind == "generate" and arg.settings.seed is None:
        arg.settings.seed = random.SystemRandom().randrange(2**31)
    return kind, arg


# ==================================================================== models
def wrap_model(trainer: Any, model: torch.nn.Module) -> torch.nn.Module:
    """DDP (or FSDP with ``--fsdp``) around the model; the trainer keeps ``model_ref`` for its state."""
    if trainer.cfg.fsdp:
        return _wrap_fsdp(trainer, model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = trainer.device
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def _wrap_fsdp(trainer: Any, model: torch.nn.Module) -> torch.nn.Module:
    """Shard each transformer block and the rest of the model (PyTorch's FSDP2, ``fully_shard``)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)
    if hasattr(model, "hidden"):
        register_fsdp_forward_method(model, "hidden")  # generation calls hidden() directly
    trainer.fsdp = True
    trainer._cmd.cancel_generation = _SyncedFlag(trainer._dist_group)

    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    model.no_sync = no_sync  # the trainer skips gradient reduction on inner micro-steps with it
    trainer.model_state = types.MethodType(_fsdp_model_state, trainer)
    trainer.load_model_state = types.MethodType(_fsdp_load_model_state, trainer)
    trainer.optimizer_state = types.MethodType(_fsdp_optimizer_state, trainer)
    trainer.load_optimizer_state = types.MethodType(_fsdp_load_optimizer_state, trainer)
    return model


def _full_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _fsdp_model_state(self: Any) -> dict[str, torch.Tensor]:
    """The full model state on rank 0 (every rank must call), with every name a plain model has."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(self.model_ref, options=_full_options(cpu_offload=True))
    if not self.is_main:
        return {}
    # Tied weights may come back under one name only; a plain state_dict has both.
    by_param: dict[int, str] = {}
    for name, p in self.model_ref.named_parameters(remove_duplicate=False):
        if name in full:
            by_param.setdefault(id(p), name)
    for name, p in self.model_ref.named_parameters(remove_duplicate=False):
        if name not in full and id(p) in by_param:
            full[name] = full[by_param[id(p)]]
    return full


def _fsdp_load_model_state(self: Any, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(self.model_ref, state, options=_full_options())


def _param_names(trainer: Any) -> list[str]:
    """Parameter names in the order of the optimizer's groups (the plain state dict's numbering)."""
    names = {id(p): n for n, p in trainer.model_ref.named_parameters()}
    return [names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]


def _fsdp_optimizer_state(self: Any) -> dict:
    """The full optimizer state on rank 0 in the plain ``torch.optim`` layout (ids, not names)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(self.model_ref, self.optimizer, options=_full_options(cpu_offload=True))
    if not self.is_main:
        return {}
    index = {n: i for i, n in enumerate(_param_names(self))}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def _fsdp_load_optimizer_state(self: Any, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(self)
    named = {
        "state": {names[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in state["param_groups"]],
    }
    set_optimizer_state_dict(self.model_ref, self.optimizer, named, options=_full_options())
