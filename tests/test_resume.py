"""Exact resume: a run interrupted at step k and resumed is the same run, to the last bit (CPU)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ck
from engine.events import read_metrics
from engine.recorder import Recorder
from engine.trainer import EngineOptions, Trainer
from tests.conftest import run_cli, tiny_config
from tests.test_cli import TINY


def by_step(run: Path, kind: str = "step", field: str = "loss") -> dict[int, float]:
    """The last record of each step (a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: r[field] for r in read_metrics(str(run / "metrics.jsonl")) if r["type"] == kind}


class StopAt:
    """A sink that stops its trainer right after step ``k`` (as a signal or the dashboard's q would)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.trainer: Trainer | None = None

    def emit(self, e) -> None:
        if e.type == "step" and e.step == self.k:
            self.trainer.stop(save=True)


def final_state(run: Path) -> dict:
    return ck.load_checkpoint(str(run))


def assert_same_tensors(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tensors(x, y)
    else:
        assert a == b


VARIANTS = {
    "plain": dict(batch_size=16),
    "dropout+accum": dict(batch_size=8, grad_accum=2, dropout=0.2),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_interrupted_and_resumed_run_is_bit_identical(corpus: Path, tmp_path: Path, variant: str):
    kw = dict(max_steps=45, eval_every=10, **VARIANTS[variant])
    ref_run = tmp_path / "ref"
    ref = Trainer(tiny_config(corpus, ref_run, **kw))
    ref.setup()
    assert ref.fit() == "finished"
    spe = ref.steps_per_epoch
    assert 2 * spe < 45, spe  # the run crosses two epoch boundaries
    ref_loss, ref_epoch, ref_val = by_step(ref_run), by_step(ref_run, field="epoch"), by_step(ref_run, "eval", "val_loss")
    ref_final = final_state(ref_run)

    # mid-epoch, at the end of an epoch, right after an epoch boundary, late in the second epoch
    for k in (7, spe, spe + 1, 2 * spe - 3):
        run = tmp_path / f"k{k}"
        stopper = StopAt(k)
        first = Trainer(tiny_config(corpus, run, **kw), stopper)
        stopper.trainer = first
        first.setup()
        assert first.fit() == "stopped" and first.step == k
        second = Trainer(tiny_config(corpus, run, resume=str(run), **kw))
        second.setup()
        assert second.resumed.step == k and second.step == k and second.config_changes == []
        assert second.fit() == "finished"
        loss, epoch = by_step(run), by_step(run, field="epoch")
        after = range(k + 1, 46)
        assert [loss[s] for s in after] == [ref_loss[s] for s in after], f"k={k}"
        assert [epoch[s] for s in after] == [ref_epoch[s] for s in after], f"k={k}"
        assert {s: v for s, v in by_step(run, "eval", "val_loss").items() if s > k} == {
            s: v for s, v in ref_val.items() if s > k}
        got = final_state(run)
        for key in ("model", "optimizer", "rng", "step", "epoch", "tokens_seen", "best_val", "data", "guard"):
            assert_same_tensors(getattr(got, key), getattr(ref_final, key))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resume_on_cuda_matches_within_float_tolerance(corpus: Path, tmp_path: Path):
    kw = dict(max_steps=30, batch_size=8, grad_accum=2, dropout=0.1, device="cuda", eval_every=0)
    ref = Trainer(tiny_config(corpus, tmp_path / "ref", **kw))
    ref.setup()
    ref.fit()
    run = tmp_path / "run"
    stopper = StopAt(13)
    first = Trainer(tiny_config(corpus, run, **kw), stopper)
    stopper.trainer = first
    first.setup()
    first.fit()
    second = Trainer(tiny_config(corpus, run, resume=str(run), **kw))
    second.setup()
    second.fit()
    ref_loss, loss = by_step(tmp_path / "ref"), by_step(run)
    after = list(range(14, 31))
    assert [loss[s] for s in after] == pytest.approx([ref_loss[s] for s in after], rel=1e-3)


def test_paused_and_checkpointed_run_resumes_exactly(corpus: Path, tmp_path: Path):
    kw = dict(max_steps=30, dropout=0.1, eval_every=0)
    ref = Trainer(tiny_config(corpus, tmp_path / "ref", **kw))
    ref.setup()
    ref.fit()

    run = tmp_path / "run"
    rec = Recorder()
    t = Trainer(tiny_config(corpus, run, **kw), rec, options=EngineOptions.interactive())
    t.setup()
    th = threading.Thread(target=t.fit, daemon=True)
    th.start()

    def wait(cond, what: str) -> None:
        deadline = time.time() + 60
        while not cond():
            assert time.time() < deadline, what
            time.sleep(0.01)

    wait(lambda: rec.snapshot().last_step is not None and rec.snapshot().last_step.step >= 8, "steps")
    t.pause()  # as the dashboard's p, then its checkpoint key
    wait(lambda: rec.snapshot().state == "paused", "pause")
    t.request_checkpoint()
    wait(lambda: rec.snapshot().last_checkpoint is not None, "checkpoint")
    saved = rec.snapshot().last_checkpoint
    k = t.step
    assert saved.reason == "requested" and saved.step == k and 8 <= k < 30
    t.stop(save=False)
    th.join(60)
    assert ck.resolve_checkpoint(str(run)) == saved.path

    again = Trainer(tiny_config(corpus, run, resume=saved.path, **kw))
    again.setup()
    assert again.step == k
    again.fit()
    ref_loss, loss = by_step(tmp_path / "ref"), by_step(run)
    assert [loss[s] for s in range(k + 1, 31)] == [ref_loss[s] for s in range(k + 1, 31)]


def test_resume_notices_changed_data(corpus: Path, tmp_path: Path):
    run = tmp_path / "run"
    t = Trainer(tiny_config(corpus, run, max_steps=4))
    t.setup()
    t.fit()
    corpus.write_text(corpus.read_text() * 2)
    again = Trainer(tiny_config(corpus, run, max_steps=8, resume=str(run)))
    again.setup()
    assert any("training windows" in c and "data order" in c for c in again.config_changes)


@pytest.mark.slow  # two real CLI processes
def test_cli_resume_extends_a_run_with_its_own_settings(corpus: Path, tmp_path: Path):
    run = tmp_path / "run"
    first = run_cli("train", "--headless", "--data", str(corpus), *TINY, "--threads", "1", "--max-steps", "12",
                    "--checkpoint-every", "4", "--out", str(run))
    assert first.returncode == 0, first.stderr
    r = run_cli("train", "--headless", "--resume", str(run), "--max-steps", "20")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "at step 12" in r.stdout
    assert "changed on resume: max_steps: 12 -> 20" in r.stdout
    assert "cpu fp32" in r.stdout  # the saved --dtype, not this machine's default
    assert sorted(by_step(run)) == list(range(1, 21))
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["max_steps"] == 20 and saved["threads"] == 1 and saved["dtype"] == "fp32"
    assert ck.read_meta(ck.resolve_checkpoint(str(run)))["step"] == 20


@pytest.mark.slow  # two real CLI processes
def test_resume_from_an_older_checkpoint_starts_a_new_branch(corpus: Path, tmp_path: Path):
    run = tmp_path / "run"
    t = Trainer(tiny_config(corpus, run, max_steps=12, checkpoint_every=4, keep_last=5, eval_every=0))
    t.setup()
    t.fit()
    older = str(run / "checkpoints" / "step-00000004.pt")
    assert Path(older).exists()
    r = run_cli("train", "--headless", "--resume", older, "--max-steps", "10", "--lr", "5e-4")
    assert r.returncode == 0, r.stderr
    assert "at step 4" in r.stdout and "lr: None -> 0.0005" in r.stdout
    # the new branch's last checkpoint (step 10) is the newest, not the abandoned step 12
    assert ck.read_meta(ck.resolve_checkpoint(str(run)))["step"] == 10
    assert Path(ck.checkpoint_name(str(run), 8)).name == "step-00000008-2.pt"  # step 8 of both branches kept
