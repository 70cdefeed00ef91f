"""A checkpoint written by an earlier release still loads and resumes bit-exactly.

``tests/data/checkpoint_v1`` was written by gpt-tui at commit b106d0d (format ``gpt-tui/1``,
the command in its SOURCE.json): a 10-step char-level run with dropout, checkpointed at step 5.
Its metrics.jsonl holds the losses of the uninterrupted run's steps 6-10.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine import checkpoint as ck
from engine.errors import CheckpointError
from engine.events import read_metrics

FIXTURE = Path(__file__).parent / "data" / "checkpoint_v1"


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(run / "metrics.jsonl")) if r["type"] == "step"}


@pytest.fixture
def old_run(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    corpus = tmp_path / "corpus.txt"
    shutil.copy(FIXTURE / "corpus.txt", corpus)
    return run, corpus


def test_old_checkpoint_loads(old_run: tuple[Path, Path]):
    run, _ = old_run
    c = ck.load_checkpoint(str(run))
    assert c.step == 5 and c.path.endswith("step-00000005.pt")
    assert c.optimizer and c.optimizer["state"], "the optimizer state came back"
    assert c.model["tok_emb.weight"].shape == (31, 32)
    assert c.changes == [] and c.meta["format"] == "gpt-tui/1"


def test_upgrade_lifts_version_1():
    old = {"format": "gpt-tui/1", "batch_in_epoch": 3, "step": 7}
    new = ck.upgrade(old)
    assert new["format"] == ck.FORMAT and "batch_in_epoch" not in new and new["changes"] == []
    with pytest.raises(CheckpointError, match="format"):
        ck.upgrade({"format": "gpt-tui/99"})


def test_old_checkpoint_resumes_bit_exactly(old_run: tuple[Path, Path]):
    from engine.config import TrainConfig
    from engine.trainer import Trainer

    run, corpus = old_run
    expected = _losses(run)
    cfg = TrainConfig(resume=str(run), data=[str(corpus)], threads=1)
    t = Trainer(cfg, explicit={"resume", "data", "threads"})
    t.setup()
    assert t.step == 5
    t.fit()
    got = _losses(run)
    steps = range(6, 11)
    same_machine = _cpu() == json.loads((FIXTURE / "SOURCE.json").read_text())["cpu"]
    for s in steps:
        if same_machine:
            assert got[s] == expected[s], (s, got[s], expected[s])
        else:  # another CPU's kernels may round differently
            assert got[s] == pytest.approx(expected[s], rel=1e-5), s
