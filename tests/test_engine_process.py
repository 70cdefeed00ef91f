"""The terminal dashboard's engine process: a stop while it starts is a stop, not a failure."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.recorder import Recorder
from tests.conftest import tiny_config
from tui.engine_process import ChildRun, EngineProcess, spec_of


def wait_for(cond, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.parametrize("delay", [0.0, 0.4])
def test_q_while_the_engine_starts_stops_it_quietly(corpus: Path, tmp_path: Path, delay: float) -> None:
    """q (a stop) before the child answers, as it starts or while it imports torch: it ends at once,
    the dashboard reports the run stopped (exit 0), and no checkpoint is claimed."""
    cfg = tiny_config(corpus, tmp_path / "run", max_steps=100_000)
    run, rec = ChildRun(None), Recorder()
    engine = EngineProcess(spec_of(cfg, None, None), cfg.out, run, rec)
    engine.start()
    wait_for(lambda: run.proc is not None, what="the child")
    time.sleep(delay)
    run.stop()
    engine.join(60)
    assert not engine.is_alive()
    assert engine.error is None, engine.error
    assert engine.result == "stopped" and engine.returncode in (0, -15)
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_a_stop_after_the_first_steps_saves_a_checkpoint(corpus: Path, tmp_path: Path) -> None:
    cfg = tiny_config(corpus, tmp_path / "run", max_steps=100_000)
    run, rec = ChildRun(None), Recorder()
    engine = EngineProcess(spec_of(cfg, None, None), cfg.out, run, rec)
    engine.start()
    wait_for(lambda: rec.last_step is not None and rec.last_step.step >= 3, 120, "the first steps")
    run.stop()
    engine.join(60)
    assert engine.error is None and engine.result == "stopped" and engine.returncode == 0
    assert [r for r in (tmp_path / "run").glob("checkpoints/*.pt")]
