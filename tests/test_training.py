"""The training loop: learning, schedule, accumulation, metrics, commands from another thread."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from engine.config import TrainConfig, load_toml
from engine.errors import GptTuiError
from engine.events import read_metrics
from engine.recorder import Recorder
from engine.sampling import SampleSettings
from engine.setup import lr_at
from engine.trainer import EngineOptions, Trainer
from tests.conftest import tiny_config


def steps_of(run: Path) -> list[dict]:
    return [r for r in read_metrics(str(run / "metrics.jsonl")) if r["type"] == "step"]


def test_loss_falls_and_run_dir_is_complete(corpus: Path, tmp_path: Path):
    out = tmp_path / "run"
    t = Trainer(tiny_config(corpus, out, max_steps=60, eval_every=20, sample_every="epoch", n_embd=64))
    t.setup()
    assert t.fit() == "finished"
    recs = read_metrics(str(out / "metrics.jsonl"))
    steps = [r for r in recs if r["type"] == "step"]
    assert len(steps) == 60
    first = sum(r["loss"] for r in steps[:5]) / 5
    last = sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first * 0.8, (first, last)
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_sec", "time"):
        assert key in steps[0]
    evals = [r for r in recs if r["type"] == "eval"]
    assert {"step", "train_loss", "val_loss"} <= set(evals[0]) and evals[-1]["step"] == 60
    samples = [r for r in recs if r["type"] == "sample"]
    assert samples and {"step", "epoch", "text"} <= set(samples[0])
    ckpts = [r for r in recs if r["type"] == "checkpoint"]
    assert ckpts and Path(ckpts[-1]["path"]).exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 60 and cfg["model"]["n_embd"] == 64 and cfg["tokenizer"]["type"] == "char"


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1e-3, initial_lr=1e-4, min_lr=1e-5)
    assert lr_at(0, 100, cfg, 10) == pytest.approx(1e-4)
    assert lr_at(5, 100, cfg, 10) == pytest.approx(5.5e-4)
    assert lr_at(10, 100, cfg, 10) == pytest.approx(1e-3)
    assert lr_at(55, 100, cfg, 10) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(100, 100, cfg, 10) == pytest.approx(1e-5)


def test_gradient_accumulation_matches_a_bigger_batch(corpus: Path, tmp_path: Path):
    a = Trainer(tiny_config(corpus, tmp_path / "a", batch_size=4, grad_accum=1, max_steps=4))
    b = Trainer(tiny_config(corpus, tmp_path / "b", batch_size=2, grad_accum=2, max_steps=4))
    for t in (a, b):
        t.setup()
        t.fit()
    la = [r["loss"] for r in steps_of(tmp_path / "a")]
    lb = [r["loss"] for r in steps_of(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-4)


def test_gradient_clipping_bounds_the_update(corpus: Path, tmp_path: Path):
    t = Trainer(tiny_config(corpus, tmp_path / "r", grad_clip=1e-6, max_steps=3, lr=1.0, warmup_steps=0))
    t.setup()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    # with a clip this small, AdamW's normalized step still moves weights by about lr; we only check
    # the reported norm is the pre-clip norm and training stayed finite
    assert all(r["grad_norm"] > 1e-6 for r in steps_of(tmp_path / "r"))
    assert any((before[k] != v).any() for k, v in t.model.state_dict().items())


def test_epochs_bound_the_run(corpus: Path, tmp_path: Path):
    t = Trainer(tiny_config(corpus, tmp_path / "r", max_steps=None, epochs=2, batch_size=16, context=64))
    t.setup()
    assert t.total_steps == 2 * t.steps_per_epoch
    t.fit()
    epochs = [r["epoch"] for r in steps_of(tmp_path / "r")]
    assert epochs[0] == 0 and epochs[-1] == 1


def run_in_thread(t: Trainer) -> threading.Thread:
    th = threading.Thread(target=t.fit, daemon=True)
    th.start()
    return th


def done(rec: Recorder, rid: int) -> bool:
    gen = rec.snapshot().generations.get(rid)
    return gen is not None and gen.done is not None


def wait_for(cond, timeout: float = 30.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_pause_stops_compute_and_resume_continues(corpus: Path, tmp_path: Path):
    rec = Recorder()
    t = Trainer(tiny_config(corpus, tmp_path / "r", max_steps=100000, eval_every=0), rec, options=EngineOptions.interactive())
    t.setup()
    th = run_in_thread(t)
    wait_for(lambda: t.step >= 3)
    t.pause()
    wait_for(lambda: rec.state == "paused")
    frozen = t.step
    time.sleep(0.4)
    assert t.step == frozen
    t.request_checkpoint()
    wait_for(lambda: rec.last_checkpoint is not None and rec.last_checkpoint.step == frozen)
    t.resume()
    wait_for(lambda: t.step > frozen + 2)
    t.stop(save=True)
    th.join(30)
    assert not th.is_alive() and rec.state == "stopped"
    assert Path(rec.last_checkpoint.path).exists()


def test_generation_from_live_weights_does_not_disturb_training(corpus: Path, tmp_path: Path):
    """The same run with generations in the middle gives exactly the same losses."""
    plain = Trainer(tiny_config(corpus, tmp_path / "plain", max_steps=12, dropout=0.1))
    plain.setup()
    plain.fit()

    rec = Recorder()
    t = Trainer(tiny_config(corpus, tmp_path / "gen", max_steps=12, dropout=0.1), rec, options=EngineOptions.interactive())
    t.setup()
    t.pause()
    th = run_in_thread(t)
    rid = t.request_generate("It had", SampleSettings(max_new_tokens=20, temperature=1.0, seed=3))
    wait_for(lambda: done(rec, rid))
    t.resume()
    wait_for(lambda: t.step >= 6)
    rid2 = t.request_generate("What", SampleSettings(max_new_tokens=10))
    wait_for(lambda: t.state == "finished" and done(rec, rid2))
    t.stop()  # with a UI the engine serves requests after the run until it is stopped
    th.join(60)
    assert not th.is_alive()
    snap = rec.snapshot()
    assert len(snap.generations[rid].text) > 0 and snap.generations[rid2].done is not None
    assert [r["loss"] for r in steps_of(tmp_path / "gen")] == [r["loss"] for r in steps_of(tmp_path / "plain")]


def test_eval_on_request(corpus: Path, tmp_path: Path):
    rec = Recorder()
    t = Trainer(tiny_config(corpus, tmp_path / "r", max_steps=100000, eval_every=0), rec, options=EngineOptions.interactive())
    t.setup()
    th = run_in_thread(t)
    t.request_eval()
    wait_for(lambda: len(rec.snapshot().evals) >= 1)
    t.stop(save=False)
    th.join(30)
    assert not th.is_alive()


def test_betas_and_weight_init_reach_the_run(corpus: Path, tmp_path: Path):
    t = Trainer(tiny_config(corpus, tmp_path / "run", beta2=0.999, weight_init="torch", max_steps=2))
    t.setup()
    assert all(g["betas"] == (0.9, 0.999) for g in t.optimizer.param_groups)
    assert float(t.model.tok_emb.weight.detach().std()) > 0.5  # N(0, 1), not GPT-2's 0.02
    t.fit()
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert cfg["beta2"] == 0.999 and cfg["weight_init"] == "torch"
    for bad in (dict(beta2=1.0), dict(beta1=-0.1), dict(weight_init="xavier")):
        with pytest.raises(GptTuiError):
            tiny_config(corpus, tmp_path / "bad", **bad).validate()


def test_toml_config_file(tmp_path: Path):
    p = tmp_path / "run.toml"
    p.write_text('[train]\npreset = "small"\nbatch-size = 4\nlr = 3e-4\ndata = "x.txt"\n')
    d = load_toml(str(p))
    assert d == {"preset": "small", "batch_size": 4, "lr": 3e-4, "data": ["x.txt"]}
    p.write_text("bogus_setting = 1\n")
    with pytest.raises(GptTuiError, match="unknown setting"):
        load_toml(str(p))


def test_recorder_memory_stays_flat():
    from engine.events import StepEvent

    rec = Recorder(max_points=256)
    for i in range(100_000):
        rec.emit(StepEvent(step=i + 1, epoch=0, loss=1.0, lr=1e-3, grad_norm=1.0, tokens_seen=i, tokens_per_sec=1.0,
                           step_time=0.1))
    snap = rec.snapshot()
    assert len(snap.steps) < 256 and snap.steps[0][0] == 1 and snap.steps[-1][0] > 99_000


def test_the_first_sample_comes_no_later_than_the_first_eval(corpus: Path, tmp_path: Path):
    """Samples at each epoch's end would leave the screen without text for most of a first epoch:
    the first eval brings one (and a run that evaluates late gets one after FIRST_SAMPLE_S anyway)."""
    rec = Recorder()
    t = Trainer(tiny_config(corpus, tmp_path / "r", max_steps=40, eval_every=7, sample_every="epoch", epochs=None), rec)
    t.setup()
    assert t.steps_per_epoch > 7  # the first epoch ends after the first eval
    t.fit()
    snap = rec.snapshot()
    assert snap.samples and snap.evals
    assert snap.samples[0].step <= snap.evals[0].step == 7
    assert [s.step for s in snap.samples].count(7) == 1

    quiet = Recorder()  # samples off: none early either
    t = Trainer(tiny_config(corpus, tmp_path / "q", max_steps=10, eval_every=7, sample_every="0"), quiet)
    t.setup()
    t.fit()
    assert not quiet.snapshot().samples


def test_a_run_without_early_evals_samples_after_a_while(corpus: Path, tmp_path: Path, monkeypatch):
    import engine.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "FIRST_SAMPLE_S", 0.0)  # "a while" is at once here
    rec = Recorder()
    t = Trainer(tiny_config(corpus, tmp_path / "r", max_steps=30, eval_every=0, sample_every="epoch"), rec)
    t.setup()
    t.fit()
    first = rec.snapshot().samples[0]
    assert first.step == 1 and first.step < t.steps_per_epoch
