"""Signals and crashes of a real headless training process.

SIGTERM or SIGINT: a checkpoint at the next step boundary, then exit 0. A second signal:
exit 130 at once. ``kill -9`` at any moment: the newest complete checkpoint still loads and
a partial file is never chosen.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import checkpoint as ck
from engine.events import read_metrics
from tests.conftest import run_cli
from tests.test_cli import TINY
from tests.test_resume import by_step


def start(*args: str, log: Path) -> subprocess.Popen:
    """``gpt-tui train --headless ...`` in the background, its output to ``log``.out/.err."""
    exe = Path(sys.executable).parent / "gpt-tui"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.Popen([str(exe), "train", "--headless", *args], env=env,
                            stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"))


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(str(run / "metrics.jsonl")) if r["type"] == kind]


def wait_for(run: Path, proc: subprocess.Popen, kind: str, n: int, timeout: float = 120) -> None:
    """Wait until ``run`` has logged ``n`` records of ``kind`` (steps, checkpoints)."""
    deadline = time.time() + timeout
    while len(records(run, kind)) < n:
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.time() < deadline, f"no {n} {kind} records"
        time.sleep(0.02)


def assert_disk_intact(run: Path) -> int:
    """Every complete checkpoint verifies, and the one a resume picks loads; returns its step."""
    cks = ck.list_checkpoints(str(run))
    assert cks, "no complete checkpoint"
    for _, p, _ in cks:
        ck.verify_checkpoint(p)
    obj = ck.load_checkpoint(str(run))
    assert obj.skipped == []
    return obj.step


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_0(corpus: Path, tmp_path: Path, sig: int):
    run = tmp_path / "run"
    proc = start("--data", str(corpus), *TINY, "--max-steps", "100000", "--out", str(run), log=tmp_path / "log")
    wait_for(run, proc, "step", 3)
    proc.send_signal(sig)
    assert proc.wait(60) == 0
    out, err = Path(f"{tmp_path / 'log'}.out").read_text(), Path(f"{tmp_path / 'log'}.err").read_text()
    assert "saving a checkpoint at the next step" in err and "Traceback" not in err
    assert "stopped" in out
    last_step = max(by_step(run))
    _, path, meta = ck.list_checkpoints(str(run))[-1]
    assert meta["reason"] == "stop" and meta["step"] == last_step
    assert assert_disk_intact(run) == last_step
    assert records(run, "state")[-1]["state"] == "stopped"


def test_second_signal_exits_at_once_with_the_disk_intact(corpus: Path, tmp_path: Path):
    run = tmp_path / "run"
    # a model whose checkpoints take a while to write, saved every step: signals land mid-save
    proc = start("--data", str(corpus), *TINY, "--n-embd", "192", "--n-head", "4", "--n-layer", "2",
                 "--checkpoint-every", "1", "--keep-last", "2", "--max-steps", "100000", "--out", str(run),
                 log=tmp_path / "log")
    wait_for(run, proc, "checkpoint", 2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.005)  # the second lands while the first one's stop and save are under way
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    err = Path(f"{tmp_path / 'log'}.err").read_text()
    assert "exiting now; checkpoints on disk are intact" in err and "Traceback" not in err
    assert_disk_intact(run)


@pytest.mark.slow
def test_resume_after_sigterm_matches_an_uninterrupted_run(corpus: Path, tmp_path: Path):
    # an eval every step slows the steps (so the signal lands mid-run) without changing them
    args = ["--data", str(corpus), *TINY, "--max-steps", "150", "--eval-every", "1", "--eval-batches", "8",
            "--dropout", "0.1", "--threads", "1"]
    ref = run_cli("train", "--headless", *args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = start(*args, "--out", str(run), log=tmp_path / "log")
    wait_for(run, proc, "step", 20)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    k = assert_disk_intact(run)
    assert 20 <= k < 150
    r = run_cli("train", "--headless", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    ref_loss, loss = by_step(tmp_path / "ref"), by_step(run)
    assert [loss[s] for s in range(k + 1, 151)] == [ref_loss[s] for s in range(k + 1, 151)]


@pytest.mark.slow
def test_kill_9_while_saving_never_leaves_a_partial_checkpoint(corpus: Path, tmp_path: Path):
    run = tmp_path / "run"
    args = ["--data", str(corpus), *TINY, "--n-embd", "192", "--n-head", "4", "--n-layer", "2",
            "--checkpoint-every", "1", "--keep-last", "2", "--max-steps", "80", "--eval-every", "0"]
    rng = random.Random(4)
    leftovers = 0
    for i in range(4):
        before = len(records(run, "checkpoint")) if run.exists() else 0
        proc = start(*(["--resume", str(run)] if i else [*args, "--out", str(run)]), log=tmp_path / f"log{i}")
        wait_for(run, proc, "checkpoint", before + 1)
        if i % 2:
            time.sleep(rng.uniform(0.0, 0.4))  # a random moment (most of a step's time is the save)
        else:
            deadline = time.time() + 30  # the moment a temporary checkpoint file is being written
            while not any(n.endswith(".part") for n in os.listdir(run / "checkpoints")) and time.time() < deadline:
                time.sleep(0.001)
        proc.kill()
        proc.wait(30)
        names = os.listdir(run / "checkpoints")
        complete = {Path(p).name for _, p, _ in ck.list_checkpoints(str(run))}
        leftovers += sum(n.endswith(".part") or (n.endswith(".pt") and n not in complete) for n in names)
        assert_disk_intact(run)
    r = run_cli("train", "--headless", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    assert "finished" in r.stdout
    assert sorted(by_step(run)) == list(range(1, 81))
    assert [s for s, _, _ in ck.list_checkpoints(str(run))][-1] == 80
    print(f"kills that interrupted a write: {leftovers} of 4")
