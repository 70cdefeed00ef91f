"""Data parallelism under torchrun (gloo on CPU): equal losses, N-to-M resume, FSDP, commands, a lost rank."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.config import TrainConfig
from engine.control import ControlClient, ControlError
from engine.events import read_metrics
from engine.setup import keep_global_batch

from .conftest import SMALL_TEXT, run_cli

BIN = Path(sys.executable).parent
TORCHRUN = shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")

# Constant learning rate (no warm-up, no decay) and no dropout: a run's steps do not depend on
# its length or on random masks, so runs of different lengths and rank counts compare step by step.
TINY = ["--preset", "tiny", "--tokenizer", "char", "--context", "32", "--n-layer", "1", "--n-head", "2",
        "--n-embd", "32", "--dropout", "0", "--lr", "1e-3", "--min-lr", "1e-3", "--warmup-steps", "0",
        "--eval-every", "0", "--eval-batches", "2", "--sample-every", "0", "--dtype", "fp32", "--device", "cpu",
        "--threads", "1"]


def torchrun(*args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), str(BIN / "gpt-tui"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_ran(r: subprocess.CompletedProcess, out: Path) -> None:
    """The torchrun job succeeded (else: its output and rank 1's log)."""
    log = out / "rank-1.log"
    rank1 = log.read_text()[-2000:] if log.exists() else "(no rank-1.log)"
    assert r.returncode == 0, f"stdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-3000:]}\nrank 1:\n{rank1}"


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(run / "metrics.jsonl")) if r["type"] == "step"}


def assert_same_curve(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=2e-5), (step, a[step], b[step])


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Six steps of one process with a global batch of 4 (on the same text as the ``corpus`` fixture)."""
    d = tmp_path_factory.mktemp("single")
    text = d / "corpus.txt"
    text.write_text(SMALL_TEXT, encoding="utf-8")
    r = run_cli("train", "--headless", "--data", str(text), *TINY, "--batch-size", "4", "--max-steps", "6",
                "--out", str(d / "one"), env={"OMP_NUM_THREADS": "1", "GPT_TUI_CACHE": str(d / "cache")})
    assert r.returncode == 0, r.stderr
    return losses(d / "one")


@pytest.mark.slow
@needs_torchrun
def test_two_ranks_match_one_and_resume_on_one(corpus: Path, tmp_path: Path, single_run: dict[int, float]) -> None:
    out = tmp_path / "two"
    r = torchrun("train", "--headless", "--data", str(corpus), *TINY, "--batch-size", "2", "--max-steps", "6",
                 "--checkpoint-every", "3", "--out", str(out))
    assert_ran(r, out)
    assert_same_curve(losses(out), single_run)
    assert r.stdout.count("run ") == 1 and r.stdout.count("finished") == 1  # rank 0 alone prints
    assert (out / "rank-1.log").exists() and not (out / "rank-0.log").exists()
    start = next(x for x in read_metrics(str(out / "metrics.jsonl")) if x["type"] == "start")
    assert start["world_size"] == 2
    steps = [x for x in read_metrics(str(out / "metrics.jsonl")) if x["type"] == "step"]
    assert all(x["tokens_seen"] == x["step"] * 4 * 32 for x in steps)  # tokens of both ranks

    # The step-3 checkpoint of 2 ranks continues on 1 rank exactly where it left off.
    ckpt = next(p for step, p, _ in list_checkpoints(str(out)) if step == 3)
    assert load_checkpoint(ckpt).world_size == 2
    resumed = tmp_path / "resumed"
    r = run_cli("train", "--headless", "--resume", ckpt, "--max-steps", "6", "--out", str(resumed),
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "grad_accum: 1 -> 2 (global batch of 4 kept" in r.stdout
    assert_same_curve(losses(resumed), {s: v for s, v in single_run.items() if s > 3})


@pytest.mark.slow
@needs_torchrun
def test_fsdp_matches_and_its_checkpoint_loads_in_one_process(corpus: Path, tmp_path: Path,
                                                             single_run: dict[int, float]) -> None:
    out = tmp_path / "fsdp"
    r = torchrun("train", "--headless", "--fsdp", "--data", str(corpus), *TINY, "--batch-size", "2",
                 "--max-steps", "6", "--checkpoint-every", "3", "--out", str(out))
    assert_ran(r, out)
    assert_same_curve(losses(out), single_run)
    ckpt = next(p for step, p, _ in list_checkpoints(str(out)) if step == 3)
    obj = load_checkpoint(ckpt)
    assert isinstance(next(iter(obj.optimizer["state"])), int)  # the plain torch.optim layout
    resumed = tmp_path / "resumed"
    r = run_cli("train", "--headless", "--resume", ckpt, "--max-steps", "6", "--out", str(resumed),
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert_same_curve(losses(resumed), {s: v for s, v in single_run.items() if s > 3})


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of a rank among torchrun's children (from their environment)."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise AssertionError(f"no rank {rank} under torchrun {launcher}")


def _wait(pred, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@needs_torchrun
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds ranks through /proc (Linux)")
def test_commands_reach_every_rank_and_a_lost_rank_stops_the_job(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "job"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(BIN / "gpt-tui"), "train", "--headless",
         "--data", str(corpus), *TINY, "--batch-size", "2", "--max-steps", "1000000", "--checkpoint-every", "1000",
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        client = ControlClient(str(out), timeout=5)

        def serving() -> bool:
            try:
                return client.call("status")["step"] > 0
            except ControlError:
                return False

        _wait(serving, 120, "rank 0's control channel")
        assert client.call("status")["world_size"] == 2
        stream = client.subscribe()
        client.call("pause")
        assert stream.wait_for(lambda e: e.get("state") == "paused", 60)
        step = client.call("status")["step"]
        time.sleep(1.0)  # both ranks wait in the flag exchange, not in a gradient all-reduce
        assert client.call("status")["step"] == step
        client.call("checkpoint")
        saved = stream.wait_for(lambda e: e.get("type") == "checkpoint", 60)
        assert saved is not None and saved["step"] == step
        client.call("resume")
        _wait(lambda: client.call("status")["step"] > step + 5, 60, "training to go on")
        stream.close()

        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "lost contact with another process of the torchrun job" in output
    assert f"--resume {out}" in output
    last = list_checkpoints(str(out))[-1][1]
    assert load_checkpoint(last).step >= step  # the last checkpoint is whole
    failed = [r for r in read_metrics(str(out / "metrics.jsonl")) if r["type"] == "failed"]
    assert failed and "lost contact" in failed[-1]["error"]


def test_keep_global_batch_across_rank_counts() -> None:
    cfg = TrainConfig(batch_size=4, grad_accum=1)
    notes = keep_global_batch(cfg, saved_world=2, world=1)
    assert (cfg.batch_size, cfg.grad_accum) == (4, 2) and "global batch of 8" in notes[0]
    cfg = TrainConfig(batch_size=4, grad_accum=1)
    keep_global_batch(cfg, saved_world=1, world=2)
    assert (cfg.batch_size, cfg.grad_accum) == (2, 1)
    cfg = TrainConfig(batch_size=8, grad_accum=4)
    keep_global_batch(cfg, saved_world=2, world=4)
    assert cfg.batch_size * cfg.grad_accum * 4 == 64 and cfg.batch_size == 8
    cfg = TrainConfig(batch_size=3, grad_accum=1)
    notes = keep_global_batch(cfg, saved_world=1, world=2)
    assert (cfg.batch_size, cfg.grad_accum) == (3, 1) and "does not divide" in notes[0]
    assert keep_global_batch(TrainConfig(), 2, 2) == []

