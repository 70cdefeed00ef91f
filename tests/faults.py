"""Fault injection for tests (non-finite or spiking losses, out of memory, a full disk) and
helpers to check the CLI's one-line errors.

In-process tests call :func:`install` (or use :class:`LossFault` directly); subprocess tests
run the real CLI through this module, which installs the faults and then calls
``tui.cli.main()``::

    python -m tests.faults "nan@3,4;enospc@2" train --headless ...

Fault specs, joined with ``;``:

- ``nan@S,...``: the loss of optimizer step S (1-based, as in metrics.jsonl) is NaN
- ``infgrad@S,...``: the loss is finite but its gradient is infinite
- ``spike@S,...``: the loss is multiplied by 20
- ``oom@S``: step S raises ``torch.OutOfMemoryError``
- ``enospc@N``: the N-th checkpoint write (1-based) and every later one find the disk full
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from typing import Any

import torch

from engine import checkpoint as ck
from engine.checkpoint import io as ck_io
from engine.strategy import Strategy
from engine.trainer import Trainer


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * float("inf")


class LossFault(torch.nn.Module):
    """Wraps a model; at chosen steps of ``trainer`` (anything with a ``step``) the training loss is made bad."""

    def __init__(self, model: torch.nn.Module, trainer: Any, faults: dict[str, set[int]]) -> None:
        super().__init__()
        self.inner = model
        self.trainer = trainer
        self.faults = faults

    def forward(self, *args: Any, **kw: Any) -> torch.Tensor:
        out = self.inner(*args, **kw)
        step = self.trainer.step + 1
        if not self.training or out.dim() != 0:
            return out
        if step in self.faults.get("oom", ()):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        if step in self.faults.get("nan", ()):
            return out * float("nan")
        if step in self.faults.get("infgrad", ()):
            return _InfGrad.apply(out)
        if step in self.faults.get("spike", ()):
            return out * 20.0
        return out


def parse(spec: str) -> dict[str, set[int]]:
    """``"nan@3,4;oom@7"`` -> ``{"nan": {3, 4}, "oom": {7}}``."""
    out: dict[str, set[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, _, steps = part.partition("@")
        out.setdefault(kind, set()).update(int(s) for s in steps.split(",") if s)
    return out


class FaultyStrategy(Strategy):
    """The plain strategy, with the model wrapped in a :class:`LossFault` (give it its trainer after)."""

    def __init__(self, faults: dict[str, set[int]]) -> None:
        self.faults = faults
        self.trainer: Trainer | None = None

    @property
    def step(self) -> int:
        return self.trainer.step if self.trainer is not None else 0

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return LossFault(model, self, self.faults)


def faulty_trainer(spec: str | dict[str, set[int]], *args: Any, **kw: Any) -> Trainer:
    """A Trainer whose loss goes bad at the steps of ``spec``."""
    strategy = FaultyStrategy(parse(spec) if isinstance(spec, str) else spec)
    t = Trainer(*args, strategy=strategy, **kw)
    strategy.trainer = t
    return t


def install(spec: str) -> None:
    """Patch the engine for the faults in ``spec`` (for the rest of this process)."""
    faults = parse(spec)
    if faults.keys() & {"nan", "infgrad", "spike", "oom"}:
        import engine.runner

        def make_trainer(cfg: Any, sink: Any = None, **kw: Any) -> Trainer:
            return faulty_trainer(faults, cfg, sink, **kw)

        engine.runner.make_trainer = make_trainer
    if "enospc" in faults:
        full_from = min(faults["enospc"])
        saves = {"n": 0}
        save = ck.save_checkpoint

        def counting_save(path: str, ckpt: Any, meta: Any) -> str:
            saves["n"] += 1
            return save(path, ckpt, meta)

        def write(self: Any, b: bytes) -> int:
            if saves["n"] >= full_from:
                self.error = OSError(errno.ENOSPC, "No space left on device")
                raise self.error
            self.h.update(b)
            return self.f.write(b)

        ck.save_checkpoint = counting_save
        ck_io._HashingWriter.write = write  # type: ignore[method-assign]


def disk_full_writer(after_bytes: int = 0):
    """A replacement for ``_HashingWriter.write`` that fails with ENOSPC after some bytes."""
    state = {"n": 0}

    def write(self: Any, b: bytes) -> int:
        state["n"] += len(b)
        if state["n"] > after_bytes:
            self.error = OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        self.h.update(b)
        return self.f.write(b)

    return write


def run_faulty_cli(spec: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the real CLI (``tui.cli.main``) in a subprocess with the faults of ``spec`` installed."""
    from tests.conftest import REPO

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, "-m", "tests.faults", spec, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO))


def assert_one_clear_line(r: subprocess.CompletedProcess, *words: str) -> str:
    """A failed command printed exactly one ``gpt-tui: error:`` line naming ``words``, no traceback."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("gpt-tui: error: "), line
    assert ": " in line[len("gpt-tui: error: "):], f"no fix named: {line}"
    for w in words:
        assert w in line, (w, line)
    return line


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = ["gpt-tui", *sys.argv[2:]]
    from tui.cli import main

    main()
