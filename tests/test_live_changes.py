"""Live changes end to end: ``gpt-tui set`` against a detached run, refusals, and an exact CPU resume of a
run whose settings changed while it trained (the change after the checkpoint replayed from metrics.jsonl)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from engine import checkpoint as ck
from engine.control import ControlClient, ControlError
from engine.events import read_metrics
from engine.trainer import Trainer
from tests.conftest import run_cli, tiny_config
from tests.test_attach import LONG_RUN, status
from tests.test_distributed import BIN, TORCHRUN, needs_torchrun
from tests.test_distributed import TINY as DIST_TINY
from tests.test_resume import by_step


def changes_in(run: Path) -> list[dict]:
    return [r for r in read_metrics(str(run / "metrics.jsonl")) if r["type"] == "change"]


def wait_steps(run: Path, more_than: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = status(run)["step"]
        if step > more_than:
            return step
        time.sleep(0.1)
    raise AssertionError(f"{run} did not train past step {more_than}")


@pytest.mark.slow
def test_set_changes_a_detached_run_and_refuses_bad_values(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = run_cli("train", "--data", str(corpus), *LONG_RUN, "--lr", "1e-3", "--warmup-steps", "0", "--out", str(run),
                "--detach", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert f"set:    gpt-tui set {run}" in r.stdout
    try:
        wait_steps(run, 0)
        r = run_cli("set", str(run), "lr=3e-4", "eval-every=50")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert len(lines) == 2 and lines[0].startswith("step ") and lines[0].endswith(": lr 1e-3 -> 3e-4"), lines
        assert lines[1].endswith(": eval-every 0 -> 50"), lines
        at = int(lines[0].split()[1].rstrip(":"))

        r = run_cli("set", str(run), "lr=x0.5", "sample_every=epoch", "target-val-loss=0.01")  # never reached here
        assert r.returncode == 0, r.stderr
        assert [ln.split(": ", 1)[1] for ln in r.stdout.splitlines()] == [
            "lr 3e-4 -> 1.5e-4", "sample-every 0 -> epoch", "target-val-loss off -> 0.01"]

        # refused: one line on stderr, a non-zero status, nothing sent, and the run goes on
        before = len(changes_in(run))
        for args, said in (
            (["lr=-1"], "lr must be above 0, got -1"),
            (["lr=0"], "lr must be above 0, got 0"),
            (["eval-every=1e-3"], "eval-every must be a whole number, got '1e-3'"),
            (["lr=1e-3", "batch-size=4"], "cannot change batch-size live: it cannot change while the run trains"),
            (["colour=blue"], "cannot change colour live: there is no such setting"),
            (["lr"], "expected NAME=VALUE, got 'lr'"),
        ):
            r = run_cli("set", str(run), *args)
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"gpt-tui: error: {said}"), (args, r.stderr)
            assert "Traceback" not in r.stderr and r.stdout == ""
        assert len(changes_in(run)) == before  # lr=1e-3 next to the refused batch-size was not sent either
        step = status(run)["step"]
        assert status(run)["state"] == "running"
        wait_steps(run, step)

        recorded = changes_in(run)
        assert [(c["setting"], c["old"], c["new"], c["source"]) for c in recorded] == [
            ("lr", 1e-3, 3e-4, "shell"), ("eval_every", 0, 50, "shell"), ("lr", 3e-4, 1.5e-4, "shell"),
            ("sample_every", "0", "epoch", "shell"), ("target_val_loss", None, 0.01, "shell")]
        assert recorded[0]["step"] == recorded[1]["step"] == at
        lrs = by_step(run, field="lr")
        # from the next step on the run trains at the new peak (no warm-up; the decay over 1e6 steps is tiny)
        assert lrs[at] == pytest.approx(1e-3, rel=1e-4) and lrs[at + 1] == pytest.approx(3e-4, rel=1e-4)
    finally:
        said = run_cli("stop", str(run), "--no-save").stdout
    assert "the run stopped" in said


class ChangeAt:
    """A sink that asks its trainer for live changes when given steps are reported (as the
    dashboard or ``gpt-tui set`` would), and stops it with a checkpoint after ``stop_at``."""

    def __init__(self, changes: dict[int, list[tuple[str, str]]], checkpoint_at: int | None = None,
                 stop_at: int | None = None) -> None:
        self.changes, self.checkpoint_at, self.stop_at = changes, checkpoint_at, stop_at
        self.trainer: Trainer | None = None

    def emit(self, e) -> None:
        if e.type != "step":
            return
        for setting, value in self.changes.get(e.step, []):
            self.trainer.change(setting, value, source="test")
        if e.step == self.checkpoint_at:
            self.trainer.request_checkpoint()
        if e.step == self.stop_at:
            self.trainer.stop(save=False)


def test_resume_after_live_changes_is_bit_identical(corpus: Path, tmp_path: Path) -> None:
    kw = dict(max_steps=40, eval_every=10, batch_size=8, dropout=0.1, lr=2e-3)
    plan = {6: [("lr", "x0.5")], 11: [("eval-every", "4")], 24: [("lr", "3e-3")]}

    ref_run = tmp_path / "ref"
    sink = ChangeAt(plan)
    ref = Trainer(tiny_config(corpus, ref_run, **kw), sink)
    sink.trainer = ref
    ref.setup()
    assert ref.fit() == "finished"
    ref_loss, ref_lr = by_step(ref_run), by_step(ref_run, field="lr")
    ref_val = by_step(ref_run, "eval", "val_loss")
    assert [(c.step, c.setting, c.new) for c in ref.changes] == [(6, "lr", 1e-3), (11, "eval_every", 4), (24, "lr", 3e-3)]
    assert 12 in ref_val and 16 in ref_val  # evals every 4 after step 11

    # The same run, checkpointed at step 17 (after two changes), trained on past the third change, then
    # stopped without a checkpoint: the third change is only in metrics.jsonl.
    run = tmp_path / "run"
    sink = ChangeAt(plan, checkpoint_at=17, stop_at=30)
    first = Trainer(tiny_config(corpus, run, **kw), sink)
    sink.trainer = first
    first.setup()
    assert first.fit() == "stopped" and first.step == 30
    saved = ck.load_checkpoint(str(run))
    assert saved.step == 17
    assert [(c["step"], c["setting"], c["old"], c["new"], c["source"]) for c in saved.changes] == [
        (6, "lr", 2e-3, 1e-3, "test"), (11, "eval_every", 10, 4, "test")]
    assert saved.train_config["lr"] == 1e-3 and saved.train_config["eval_every"] == 4

    # Resumed with no one asking for anything: the third change comes back from metrics.jsonl.
    # (as `gpt-tui train --resume RUN` with no other flag: every setting from the checkpoint)
    second = Trainer(tiny_config(corpus, run, resume=saved.path, **kw), explicit=frozenset({"resume"}))
    second.setup()
    assert second.config_changes == [] and second.cfg.lr == 1e-3 and second.cfg.eval_every == 4
    assert second.step == 17 and [(c.step, c.setting, c.new) for c in second.replay] == [(24, "lr", 3e-3)]
    assert second.fit() == "finished"
    loss, lr, val = by_step(run), by_step(run, field="lr"), by_step(run, "eval", "val_loss")
    after = range(18, 41)
    assert [loss[s] for s in after] == [ref_loss[s] for s in after]
    assert [lr[s] for s in after] == [ref_lr[s] for s in after]
    assert lr[25] > lr[24] * 2  # the replayed change is in force
    assert {s: v for s, v in val.items() if s > 17} == {s: v for s, v in ref_val.items() if s > 17}

    recorded = changes_in(run)
    assert [(c["step"], c["setting"], c["new"], c["source"]) for c in recorded] == [
        (6, "lr", 1e-3, "test"), (11, "eval_every", 4, "test"), (24, "lr", 3e-3, "test"),
        (24, "lr", 3e-3, "replay (test)")]
    final = ck.load_checkpoint(str(run))
    assert final.step == 40 and [(c["step"], c["setting"], c["new"]) for c in final.changes] == [
        (6, "lr", 1e-3), (11, "eval_every", 4), (24, "lr", 3e-3)]
    assert_same_weights(final, ck.load_checkpoint(str(ref_run)))


def assert_same_weights(a: ck.Checkpoint, b: ck.Checkpoint) -> None:
    import torch

    assert a.model.keys() == b.model.keys()
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


@pytest.mark.slow
@needs_torchrun
def test_set_reaches_every_rank_of_a_torchrun_job(corpus: Path, tmp_path: Path) -> None:
    """Rank 0 takes the change and every rank applies it at the same step: the job's losses after it
    equal those of one process given the same change at the same step (a rank left at the old rate
    would train its replica differently and the curves would part)."""
    out = tmp_path / "job"
    proc = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(BIN / "gpt-tui"), "train", "--headless",
         "--data", str(corpus), *DIST_TINY, "--batch-size", "2", "--max-steps", "1000000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        client = ControlClient(str(out), timeout=5)
        deadline = time.monotonic() + 120
        while True:  # pause as soon as the channel answers: the job and one process drift apart over many steps
            assert proc.poll() is None and time.monotonic() < deadline, "the job never served its channel"
            try:
                client.call("pause")
                break
            except ControlError:
                time.sleep(0.05)
        stream = client.subscribe()
        stream.wait_for(lambda e: e.get("state") == "paused", 60)
        stream.close()
        k = status(out)["step"]
        assert status(out)["paused"] and k < 40, k
        r = run_cli("set", str(out), "lr=2e-3")
        assert r.returncode == 0 and r.stdout.strip() == f"step {k}: lr 1e-3 -> 2e-3", (r.stdout, r.stderr)
        assert run_cli("resume", str(out)).returncode == 0
        wait_steps(out, k + 6, timeout=120)
        assert "the run stopped" in run_cli("stop", str(out), "--no-save").stdout
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    job = by_step(out)

    sink = ChangeAt({k: [("lr", "2e-3")]}, stop_at=k + 6)  # the same schedule: as long a run, stopped
    one = Trainer(tiny_config(corpus, tmp_path / "one", batch_size=4, dropout=0.0, lr=1e-3, min_lr=1e-3,
                              warmup_steps=0, eval_every=0, max_steps=1_000_000), sink)
    sink.trainer = one
    one.setup()
    one.fit()
    ref = by_step(tmp_path / "one")
    for s in range(1, k + 7):
        assert job[s] == pytest.approx(ref[s], abs=2e-5), (s, job[s], ref[s])
    assert by_step(out, field="lr")[k + 1] == pytest.approx(2e-3)


def test_changes_sent_together_apply_at_one_step_all_or_none(corpus: Path, tmp_path: Path) -> None:
    from engine.errors import GptTuiError

    t = Trainer(tiny_config(corpus, tmp_path / "run", lr=1e-3, max_steps=4, eval_every=0))
    t.setup()
    with pytest.raises(GptTuiError, match="grad-clip must be 0 or more, got -1"):
        t.change_many([("lr", "x2"), ("grad-clip", "-1")])
    assert t.queued_changes() == [] and t.commands.take() == []  # the good one was not queued either
    done = t.change_many([("lr", "x2"), ("lr", "x2"), ("eval-every", "2")], source="test")
    assert [(c.setting, c.new) for c in done] == [("lr", 2e-3), ("lr", 4e-3), ("eval_every", 2)]  # each on the last
    assert t.change("lr", "x0.5").new == 2e-3  # queued behind them: checked against them
    assert t.fit() == "finished"
    assert [(c["step"], c["setting"], c["old"], c["new"]) for c in changes_in(tmp_path / "run")] == [
        (0, "lr", 1e-3, 2e-3), (0, "lr", 2e-3, 4e-3), (0, "eval_every", 0, 2), (0, "lr", 4e-3, 2e-3)]
    assert t.cfg.lr == 2e-3 and t.cfg.eval_every == 2 and t.queued_changes() == []
    assert sorted(by_step(tmp_path / "run", "eval", "val_loss")) == [2, 4]


def test_the_dashboards_controller_and_the_trainer_share_the_queue(corpus: Path, tmp_path: Path) -> None:
    """The in-process dashboard checks changes through its own controller (StartingRun) while the trainer
    applies them: once applied, a change leaves the queue both see, so the next one is checked against
    the run's value (here a shell's change in between), not a stale queued one."""
    from engine.commands import LocalCommands
    from tui.launch import StartingRun

    commands = LocalCommands()
    t = Trainer(tiny_config(corpus, tmp_path / "run", lr=1e-3, max_steps=4, eval_every=0), commands=commands)
    run = StartingRun(t.cfg, commands, None)
    run.trainer = t
    t.setup()
    assert run.change("lr", "x2").new == 2e-3
    assert len(t.queued_changes()) == 1
    t.process_commands()
    assert t.cfg.lr == 2e-3 and run.queued_changes() == []
    t.change("lr", "1e-4", source="shell")
    t.process_commands()
    assert run.change("lr", "x2").new == 2e-4
