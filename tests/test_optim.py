"""--optimizer: AdamW as before, or Muon for the blocks' matrices with AdamW for the rest."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from engine.config import TrainConfig
from engine.errors import GptTuiError
from engine.model import GPT, ModelConfig
from engine.optim import MuonAdamW, build_optimizer, muon_param_names
from engine.setup import lr_at
from engine.trainer import Trainer
from tests.conftest import run_cli, tiny_config
from tests.test_distributed import TINY, assert_ran, losses, needs_torchrun, torchrun
from tests.test_resume import StopAt, assert_same_tensors, by_step, final_state

MODEL = ModelConfig(vocab_size=40, context_length=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def grads(model: GPT, seed: int) -> None:
    """Give every parameter the gradient of a loss on random tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (3, 16), generator=g)
    y = torch.randint(0, 40, (3, 16), generator=g)
    model.zero_grad(set_to_none=True)
    model(x, y).backward()


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest() -> None:
    model = GPT(MODEL)
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1))
    assert isinstance(opt, MuonAdamW) and isinstance(opt, torch.optim.Optimizer)
    muon, adamw = opt.optimizers[1], opt.optimizers[0]
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert in_muon == set(muon_param_names(model)) == {
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_adamw == {n for n, _ in model.named_parameters()} - in_muon
    assert {"tok_emb.weight", "pos_emb.weight", "head.weight", "ln_f.weight", "blocks.0.mlp.fc.bias"} <= in_adamw
    # the first group is the run's lr (the trainer reports it); every group scales relative to it
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 1.0, 20.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, pytest.approx(0.1 * 1e-3 / 0.02)]
    assert opt.param_groups[2]["adjust_lr_fn"] == "original"


def test_adamw_is_the_models_own_configure_optimizer() -> None:
    model = GPT(MODEL)
    opt = build_optimizer(model, TrainConfig(lr=3e-4))
    ref = model.configure_optimizer(3e-4, 0.1, betas=(0.9, 0.95))
    assert type(opt) is torch.optim.AdamW and "lr_scale" not in opt.param_groups[0]
    assert opt.state_dict() == ref.state_dict()


def test_muon_needs_matrices_in_blocks(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(GptTuiError, match="has none to train"):
        build_optimizer(GPT(ModelConfig(arch="bigram", vocab_size=10, n_layer=1, n_head=1, n_embd=8)),
                        TrainConfig(optimizer="muon"))
    with pytest.raises(GptTuiError, match="unknown --optimizer"):
        TrainConfig(optimizer="sgd").validate()
    with pytest.raises(GptTuiError, match="--muon-lr must be positive"):
        TrainConfig(muon_lr=0).validate()


def test_state_dict_is_plain_and_resumes_bit_exactly() -> None:
    """Save after 3 steps, load into a fresh optimizer on a copy: the next steps are identical."""
    cfg = TrainConfig(optimizer="muon", lr=1e-3)
    model = GPT(MODEL)
    opt = build_optimizer(model, cfg)
    for s in range(3):
        grads(model, s)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain dicts, lists and tensors only
    assert sorted(saved["optimizer"]["state"]) == list(range(sum(1 for _ in model.parameters())))

    twin = GPT(MODEL)
    twin.load_state_dict(saved["model"])
    twin_opt = build_optimizer(twin, cfg)
    twin_opt.load_state_dict(saved["optimizer"])
    assert twin_opt.param_groups[-1]["params"][0] is twin.blocks[0].attn.qkv.weight
    for s in range(3, 6):
        for m, o in ((model, opt), (twin, twin_opt)):
            for g in o.param_groups:
                g["lr"] = 5e-4 * g["lr_scale"]
            grads(m, s)
            o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_same_tensors(twin_opt.state_dict(), opt.state_dict())


def test_schedule_scales_each_group_from_its_own_peak(corpus: Path, tmp_path: Path) -> None:
    t = Trainer(tiny_config(corpus, tmp_path / "run", optimizer="muon", lr=2e-3, muon_lr=0.03,
                            max_steps=20, warmup_steps=5))
    t.setup()
    for _ in range(7):
        t.train_step()
        lr = lr_at(t.step, t.total_steps, t.cfg, t.warmup)
        assert [g["lr"] for g in t.optimizer.param_groups] == [lr, lr, lr * 15.0]
        t.step += 1


def test_interrupted_and_resumed_muon_run_is_bit_identical(corpus: Path, tmp_path: Path) -> None:
    kw = dict(max_steps=30, eval_every=10, batch_size=8, grad_accum=2, dropout=0.1, optimizer="muon")
    ref_run = tmp_path / "ref"
    ref = Trainer(tiny_config(corpus, ref_run, **kw))
    ref.setup()
    assert ref.fit() == "finished"
    spe = ref.steps_per_epoch
    assert spe < 30
    ref_loss, ref_val, ref_final = by_step(ref_run), by_step(ref_run, "eval", "val_loss"), final_state(ref_run)
    for k in (7, spe + 1):
        run = tmp_path / f"k{k}"
        stopper = StopAt(k)
        first = Trainer(tiny_config(corpus, run, **kw), stopper)
        stopper.trainer = first
        first.setup()
        assert first.fit() == "stopped" and first.step == k
        second = Trainer(tiny_config(corpus, run, resume=str(run), **kw))
        second.setup()
        assert second.step == k and second.config_changes == []
        assert isinstance(second.optimizer, MuonAdamW)
        assert second.fit() == "finished"
        loss = by_step(run)
        after = range(k + 1, 31)
        assert [loss[s] for s in after] == [ref_loss[s] for s in after], f"k={k}"
        assert {s: v for s, v in by_step(run, "eval", "val_loss").items() if s > k} == {
            s: v for s, v in ref_val.items() if s > k}
        got = final_state(run)
        for key in ("model", "optimizer", "rng", "step", "tokens_seen", "best_val"):
            assert_same_tensors(getattr(got, key), getattr(ref_final, key))
        assert got.train_config["optimizer"] == "muon"


def test_optimizer_is_fixed_on_resume_and_muon_lr_is_not(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    t = Trainer(tiny_config(corpus, run, optimizer="muon", max_steps=4, lr=1e-3, min_lr=1e-3, warmup_steps=0))
    t.setup()
    t.fit()
    changed = tiny_config(corpus, run, resume=str(run), optimizer="adamw", max_steps=8)
    with pytest.raises(GptTuiError, match="optimizer: 'muon' -> 'adamw'"):
        Trainer(changed, explicit=frozenset({"resume", "optimizer", "max_steps"})).setup()  # as the CLI marks given flags
    faster = tiny_config(corpus, run, resume=str(run), muon_lr=0.05, max_steps=8)
    again = Trainer(faster, explicit=frozenset({"resume", "muon_lr", "max_steps"}))
    again.setup()
    assert sorted(again.config_changes) == ["max_steps: 4 -> 8", "muon_lr: 0.02 -> 0.05"]
    again.train_step()
    assert again.optimizer.param_groups[-1]["lr"] == pytest.approx(0.05)  # the new peak, not the saved one


def test_cli_takes_the_optimizer_flag(corpus: Path, tmp_path: Path) -> None:
    r = run_cli("train", "--help")
    assert "--optimizer" in r.stdout and "--muon-lr" in r.stdout
    r = run_cli("train", "--headless", "--data", str(corpus), "--optimizer", "lion", "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "unknown --optimizer 'lion'" in r.stderr


@pytest.mark.slow
@needs_torchrun
def test_muon_under_fsdp_matches_one_process(corpus: Path, tmp_path: Path) -> None:
    """Muon orthogonalizes whole matrices under FSDP too (DTensor gathers the shards it needs)."""
    out, one = tmp_path / "fsdp", tmp_path / "one"
    r = torchrun("train", "--headless", "--fsdp", "--optimizer", "muon", "--data", str(corpus), *TINY,
                 "--batch-size", "2", "--max-steps", "6", "--checkpoint-every", "3", "--out", str(out))
    assert_ran(r, out)
    r = run_cli("train", "--headless", "--optimizer", "muon", "--data", str(corpus), *TINY, "--batch-size", "4",
                "--max-steps", "6", "--out", str(one), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    a, b = losses(out), losses(one)
    assert a.keys() == b.keys()
    for s in a:  # Newton-Schulz runs in bf16: sharded matmuls round differently
        assert a[s] == pytest.approx(b[s], abs=5e-4), s
    ckpt = out / "checkpoints" / "step-00000003.pt"
    r = run_cli("train", "--headless", "--resume", str(ckpt), "--max-steps", "6", "--out", str(tmp_path / "res"),
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = losses(tmp_path / "res")
    for s in (4, 5, 6):
        assert res[s] == pytest.approx(b[s], abs=5e-4), s



def test_step_events_report_the_lr_schedule_whatever_the_groups_order(corpus: Path, tmp_path: Path) -> None:
    """Adapters only in the blocks' matrices under Muon: the optimizer's first group is Muon's, and the
    charts still show --lr's schedule, not Muon's rate."""
    from engine.recorder import Recorder

    base = Trainer(tiny_config(corpus, tmp_path / "base", max_steps=1, eval_every=0, sample_every="0"))
    base.setup()
    base.fit()
    rec = Recorder()
    t = Trainer(tiny_config(corpus, tmp_path / "run", init=base.last_checkpoint, optimizer="muon", lora_rank=4,
                            lora_layers="attn,mlp",
                            lr=2e-3, muon_lr=0.03, max_steps=6, warmup_steps=2, eval_every=0, sample_every="0"), rec)
    t.setup()
    t.fit()
    steps = [e for e in rec.snapshot().steps]
    assert len(steps) == 6
    for e in steps:
        assert e.lr == pytest.approx(lr_at(e.step - 1, t.total_steps, t.cfg, t.warmup))
