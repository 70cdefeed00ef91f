"""The divergence guard: non-finite steps never reach the weights; repeats and spikes stop or pause."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import DivergenceError
from engine.events import read_metrics
from engine.recorder import Recorder
from engine.trainer import EngineOptions, Trainer
from tests.conftest import run_cli, tiny_config
from tests.faults import assert_one_clear_line, faulty_trainer, run_faulty_cli
from tests.test_cli import TINY


def faulty(spec: str) -> Any:
    """A Trainer constructor whose runs' losses go bad at the steps of ``spec`` (see tests.faults)."""
    return lambda *args, **kw: faulty_trainer(spec, *args, **kw)


class Snapshots:
    """Copies of the weights and optimizer moments after every step."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def emit(self, e) -> None:
        if e.type == "step":
            t = self.trainer
            state = {k: v.clone() for k, v in t.model.state_dict().items()}
            for i, s in t.optimizer.state_dict()["state"].items():
                state[f"opt{i}"] = s["exp_avg"].clone()
            self.after[e.step] = state


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fault", ["nan", "infgrad"])
def test_non_finite_step_is_skipped_and_weights_unchanged(corpus: Path, tmp_path: Path, fault: str):
    snaps = Snapshots()
    t = faulty(f"{fault}@4")(tiny_config(corpus, tmp_path / "run", max_steps=8), snaps)
    snaps.trainer = t
    t.setup()
    assert t.fit() == "finished"
    assert same(snaps.after[3], snaps.after[4])  # the bad step changed nothing
    assert not same(snaps.after[4], snaps.after[5])  # the next one trains again
    assert all(torch.isfinite(v).all() for v in snaps.after[8].values())
    recs = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    steps = {r["step"]: r for r in recs if r["type"] == "step"}
    assert steps[4]["skipped"] is True and [s for s, r in steps.items() if r["skipped"]] == [4]
    if fault == "nan":
        assert math.isnan(steps[4]["loss"])
    else:
        assert math.isfinite(steps[4]["loss"]) and not math.isfinite(steps[4]["grad_norm"])
    assert any(r["type"] == "log" and "step 4" in r["message"] and "skipped" in r["message"] for r in recs)


def test_repeated_non_finite_steps_stop_a_headless_run(corpus: Path, tmp_path: Path):
    run = tmp_path / "run"
    # two bad steps in a row are tolerated (max 3); three stop the run
    t = faulty("nan@3,4;nan@7,8,9")(tiny_config(corpus, run, max_steps=20, checkpoint_every=2))
    t.setup()
    with pytest.raises(DivergenceError) as err:
        t.fit()
    msg = str(err.value)
    assert "3 non-finite steps in a row at step 9" in msg
    assert str(run / "checkpoints" / "step-00000008.pt") in msg and "lower --lr" in msg
    assert t.step == 9
    failed = [r for r in read_metrics(str(run / "metrics.jsonl")) if r["type"] == "failed"]
    assert failed and failed[0]["last_checkpoint"].endswith("step-00000008.pt")


def test_loss_spike_stops_a_headless_run_only_when_asked(corpus: Path, tmp_path: Path):
    calm = faulty("spike@25")(tiny_config(corpus, tmp_path / "a", max_steps=28, eval_every=0))
    calm.setup()
    assert calm.fit() == "finished"  # --spike-factor defaults to 0: off
    t = faulty("spike@25")(tiny_config(corpus, tmp_path / "b", max_steps=28, eval_every=0, spike_factor=3.0))
    t.setup()
    with pytest.raises(DivergenceError, match=r"at step 25 is over 3x its recent mean"):
        t.fit()


def test_dashboard_run_pauses_on_divergence_and_continues(corpus: Path, tmp_path: Path):
    rec = Recorder()
    t = faulty("nan@5,6,7")(tiny_config(corpus, tmp_path / "run", max_steps=12, checkpoint_every=4), rec,
                            options=EngineOptions(pause_on_divergence=True))
    t.setup()
    result: dict[str, str] = {}
    th = threading.Thread(target=lambda: result.setdefault("end", t.fit()), daemon=True)
    th.start()
    deadline = time.time() + 60
    while rec.snapshot().state != "paused" and time.time() < deadline:
        time.sleep(0.02)
    snap = rec.snapshot()
    assert snap.state == "paused" and t.paused
    assert "3 non-finite steps in a row at step 7" in snap.state_message
    assert "step-00000004.pt" in snap.state_message
    assert t.step == 7
    t.resume()
    th.join(60)
    assert result.get("end") == "finished" and t.step == 12


@pytest.mark.slow  # two real CLI processes
def test_cli_stops_with_exit_3_and_names_the_last_checkpoint(corpus: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = run_faulty_cli("nan@5,6,7", "train", "--headless", "--data", str(corpus), *TINY, "--max-steps", "20",
                       "--checkpoint-every", "2", "--out", str(run))
    assert r.returncode == 3, r.stderr
    line = assert_one_clear_line(r, "training diverged", "lower --lr", "--resume")
    assert str(run / "checkpoints" / "step-00000006.pt") in line  # skipped steps leave the weights finite
    # lowering the LR and resuming works (the fault is gone in a plain process)
    again = run_cli("train", "--headless", "--resume", str(run), "--lr", "5e-4")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "lr: " in again.stdout


def test_cli_spike_factor_flag(corpus: Path, tmp_path: Path):
    r = run_faulty_cli("spike@25", "train", "--headless", "--data", str(corpus), *TINY, "--max-steps", "30",
                       "--spike-factor", "4", "--out", str(tmp_path / "run"))
    assert r.returncode == 3, r.stderr
    assert_one_clear_line(r, "over 4x its recent mean")
