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

import contextlib
import datetime
import os
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .commands import LocalCommands
from .errors import GptTuiError, RankLostError
from .model import GPT
from .runs import launched_by_torchrun, new_run_path, run_dir_of_config  # noqa: F401  (the first re-exported)
from .strategy import Strategy

# How long a rank may wait for rank 0 in a command exchange or the data barrier (tokenizing a
# large corpus, writing a large checkpoint, a long generation): much longer than NCCL's 10 minutes.
CONTROL_TIMEOUT = datetime.timedelta(hours=6)

# Substrings of the errors gloo and NCCL raise when a peer process is gone.
_PEER_ERRORS = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
                "nccl", "gloo", "timed out", "timeout", "connection refused", "peer")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class DistContext:
    """This process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int
    group: Any
    """A gloo group for commands and barriers (never times out on a slow rank 0)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (tokenizing into the shared cache), then the others."""
        if not self.is_main:
            dist.barrier(group=self.group)
        yield
        if self.is_main:
            dist.barrier(group=self.group)


def init_distributed(cfg: Any) -> tuple[DistContext, str | None]:
    """Join torchrun's process group and agree on the run directory (returned: the ``--out`` every
    rank uses); the stdout/stderr of ranks other than 0 go to ``RUN/rank-N.log``."""
    from .device import resolve_device

    rank, world, local_rank = world_from_env()
    device = resolve_device(cfg.device)
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
    ctx = DistContext(rank, world, local_rank, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))
    out = cfg.out
    if not out and not cfg.resume:
        # One run directory for all ranks (each would otherwise stamp its own time).
        name = [new_run_path()]
        dist.broadcast_object_list(name, src=0, group=ctx.group)
        out = name[0]
    if rank != 0:
        redirect_output(os.path.join(run_dir_of_config(out, cfg.resume) or ".", f"rank-{rank}.log"))
    return ctx, out


def join(cfg: Any) -> tuple[Any, DistContext, DistCommands, Strategy]:
    """Under torchrun: ``cfg`` with the agreed run directory, the context, the agreed commands and
    the parallel strategy (DDP, or FSDP with ``--fsdp``, around plain or LoRA)."""
    from .strategy import strategy_for

    ctx, out = init_distributed(cfg)
    cfg = cfg.replace(out=out)
    inner = strategy_for(cfg)
    strategy = FSDPStrategy(inner, ctx) if cfg.fsdp else DDPStrategy(inner, ctx)
    return cfg, ctx, DistCommands(ctx, fsdp=cfg.fsdp), strategy


def leave() -> None:
    """Leave the job after a clean end (with a lost peer, tearing NCCL down can block: not then)."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


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


# ============================================================== collective faults
def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception looks like a collective that failed because a peer is gone."""
    if isinstance(e, GptTuiError):
        return False
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in msg for s in _PEER_ERRORS)


def rank_lost(ctx: DistContext, e: BaseException) -> RankLostError:
    """The one-line error for a lost peer (the trainer adds the step and the last checkpoint)."""
    first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [""])[0])  # gloo's source location
    first = first.split(". ")[0][:120]
    return RankLostError(
        f"rank {ctx.rank}: lost contact with another process of the torchrun job ({type(e).__name__}: {first})",
        "see torchrun's report and RUN/rank-*.log, then continue with --resume RUN")


# ============================================================ agreed commands
class DistCommands(LocalCommands):
    """The trainer's commands under torchrun: requests on any rank, acted on as all ranks agree.

    The controller side (pause, stop, queued commands) records requests; :meth:`exchange`, called
    by every rank at every step boundary and while paused, turns rank 0's requests, and a stop
    asked of any rank, into the flags and commands that all ranks act on.
    """

    def __init__(self, ctx: DistContext, fsdp: bool = False) -> None:
        super().__init__()
        self.ctx, self.fsdp = ctx, fsdp
        self._agreed: list[tuple[str, Any]] = []
        self._agreed_paused = self._agreed_stop = False
        self._agreed_save = True

    def exchange(self) -> None:
        """One round: agree on pause, stop (and whether to save) and rank 0's commands."""
        ctx = self.ctx
        cmds = super().take() if ctx.is_main else []
        stop_code = (1 if self._save else 2) if self._stop.is_set() else 0
        flags = torch.tensor([int(ctx.is_main and self._paused.is_set()), stop_code, len(cmds)], dtype=torch.int64)
        try:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=ctx.group)
            if int(flags[2]):
                box = [[_shareable(c) for c in cmds] if ctx.is_main else []]
                dist.broadcast_object_list(box, src=0, group=ctx.group)
                cmds = box[0]
        except Exception as e:
            if is_peer_failure(e):
                raise rank_lost(ctx, e) from e
            raise
        paused, stop, _ = (int(v) for v in flags)
        self._agreed_paused = bool(paused)
        if stop and not self._agreed_stop:
            self._agreed_stop, self._agreed_save = True, stop == 1
        for kind, arg in cmds:
            if kind == "generate" and not ctx.is_main and not self.fsdp:
                continue  # DDP: rank 0 generates from its own replica
            self._agreed.append((kind, arg))

    def take(self) -> list[tuple[str, Any]]:
        out, self._agreed = self._agreed, []
        return out

    def is_paused(self) -> bool:
        return self._agreed_paused

    def stop_requested(self) -> bool:
        return self._agreed_stop

    def save_on_stop(self) -> bool:
        return self._agreed_save

    def generation_cancelled(self) -> bool:
        """Under FSDP every rank runs the generation, so they agree on its cancelling (a collective)."""
        if not self.fsdp:
            return super().generation_cancelled()
        t = torch.tensor([int(super().generation_cancelled())])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctx.group)
        return bool(t.item())


def _shareable(cmd: tuple[str, Any]) -> tuple[str, Any]:
    """Give a generation a fixed seed, so that every rank (under FSDP) samples the same tokens."""
    kind, arg = cmd
    if kind == "generate" and arg.settings.seed is None:
        arg.settings.seed = random.SystemRandom().randrange(2**31)
    return kind, arg


# ==================================================================== models
class DDPStrategy(Strategy):
    """Data parallel: each rank a full replica (DistributedDataParallel); weights and optimizer as ``inner``'s."""

    def __init__(self, inner: Strategy, ctx: DistContext) -> None:
        self.inner, self.ctx = inner, ctx
        self.kind = inner.kind

    def prepare(self, model: GPT, resume: Any, log: Any) -> GPT:
        return self.inner.prepare(model, resume, log)

    def wrap(self, model: GPT, device: torch.device) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def no_sync(self, module: torch.nn.Module, last_micro: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_micro else module.no_sync()

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        t = value.detach().clone().float()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.ctx.world

    def model_state(self, model: GPT) -> dict[str, torch.Tensor]:
        return self.inner.model_state(model)

    def mismatch(self, model: GPT, state: dict[str, torch.Tensor]) -> list[str]:
        return self.inner.mismatch(model, state)

    def load_model_state(self, model: GPT, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_model_state(model, state)

    def optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self.inner.optimizer_state(model, optimizer)

    def load_optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        self.inner.load_optimizer_state(model, optimizer, state)

    def lora_info(self) -> dict[str, Any] | None:
        return self.inner.lora_info()

    def translate_error(self, error: BaseException) -> Exception | None:
        return rank_lost(self.ctx, error) if is_peer_failure(error) else None


class FSDPStrategy(DDPStrategy):
    """Fully sharded (PyTorch's FSDP2): each rank holds a shard; checkpoints gather the full model
    and optimizer state to rank 0, the optimizer's in the plain ``torch.optim`` layout."""

    def wrap(self, model: GPT, device: torch.device) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        if hasattr(model, "hidden"):
            register_fsdp_forward_method(model, "hidden")  # generation calls hidden() directly
        return model

    def plain(self, value: torch.Tensor) -> torch.Tensor:
        return value.full_tensor() if hasattr(value, "full_tensor") else value

    @contextlib.contextmanager
    def no_sync(self, module: torch.nn.Module, last_micro: bool) -> Iterator[None]:
        module.set_requires_gradient_sync(last_micro)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    def model_state(self, model: GPT) -> dict[str, torch.Tensor]:
        """The full model state on rank 0 (every rank must call), with every name a plain model has."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_full_options(cpu_offload=True))
        if not self.ctx.is_main:
            return {}
        # Tied weights may come back under one name only; a plain state_dict has both.
        by_param: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in full:
                by_param.setdefault(id(p), name)
        for name, p in model.named_parameters(remove_duplicate=False):
            if name not in full and id(p) in by_param:
                full[name] = full[by_param[id(p)]]
        return full

    def load_model_state(self, model: GPT, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_full_options())

    def optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full optimizer state on rank 0 in the plain ``torch.optim`` layout (ids, not names)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
        if not self.ctx.is_main:
            return {}
        index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
        groups = [dict(g, params=[index[n] for n in g["params"]]) for g in full["param_groups"]]
        return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}

    def load_optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        names = _param_names(model, optimizer)
        named = {
            "state": {names[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in state["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, named, options=_full_options())


def _full_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _param_names(model: GPT, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order of the optimizer's groups (the plain state dict's numbering)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
