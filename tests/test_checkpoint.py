"""Checkpoint files: complete contents, atomic writes, safe loading, retention, a full disk."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import checkpoint as ck
from engine.checkpoint import io as ck_io
from engine.errors import CheckpointError
from engine.events import read_metrics
from engine.model import GPT, ModelConfig
from engine.trainer import Trainer
from tests.conftest import REPO, run_cli, tiny_config
from tests.faults import assert_one_clear_line, disk_full_writer


def trained(corpus: Path, run: Path, **kw) -> Trainer:
    t = Trainer(tiny_config(corpus, run, **{"max_steps": 6, **kw}))
    t.setup()
    t.fit()
    return t


def rewrite_meta(pt: Path) -> None:
    """Make a file's meta.json match its current bytes (as an attacker or a bad copy could)."""
    import hashlib

    meta = ck.read_meta(str(pt)) or {"format": ck.FORMAT, "file": pt.name}
    meta.update(bytes=pt.stat().st_size, sha256=hashlib.sha256(pt.read_bytes()).hexdigest())
    Path(ck.meta_path(str(pt))).write_text(json.dumps(meta))


# ----------------------------------------------------------------- contents
def test_checkpoint_holds_the_whole_training_state(corpus: Path, tmp_path: Path):
    t = trained(corpus, tmp_path / "run", max_steps=7, eval_every=7, grad_accum=2)
    path = ck.resolve_checkpoint(str(tmp_path / "run"))
    obj = ck.load_checkpoint(path)
    assert obj.step == 7 and obj.epoch == 7 // t.steps_per_epoch and obj.tokens_seen == t.tokens_seen
    assert set(obj.model) == set(t.model.state_dict())
    assert obj.optimizer["state"] and obj.optimizer["param_groups"][0]["lr"] == t.optimizer.param_groups[0]["lr"]
    assert obj.train_config["grad_accum"] == 2 and obj.model_config["n_embd"] == 32
    assert obj.data["seed"] == 1337 and obj.data["step_in_epoch"] == 7 % t.steps_per_epoch
    assert obj.data["windows_done"] == 7 * 4 * 2 and obj.data["train_windows"] == t.data.train.n_windows
    assert {"python", "numpy", "torch"} <= set(obj.rng)
    assert obj.tokenizer["type"] == "char" and obj.tokenizer["chars"] == "".join(t.tokenizer.chars)
    assert obj.best_val == t.best_val and len(obj.guard["recent_losses"]) == 7


def test_meta_json_is_readable_without_torch(corpus: Path, tmp_path: Path):
    trained(corpus, tmp_path / "run", eval_every=3, checkpoint_every=3)
    code = (
        "import sys, json; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
        "from engine.checkpoint import list_checkpoints\n"
        f"print(json.dumps([m for _, _, m in list_checkpoints({str(tmp_path / 'run')!r})]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    metas = json.loads(r.stdout)
    assert [m["step"] for m in metas] == [3, 6]
    m = metas[-1]
    for key in ("step", "epoch", "tokens_seen", "train_loss", "val_loss", "last_loss", "saved_at", "bytes",
                "sha256", "n_params", "model", "tokenizer", "reason", "file", "format"):
        assert key in m, key
    assert m["reason"] == "final" and m["val_loss"] is not None and m["tokenizer"]["type"] == "char"
    assert metas[0]["val_loss"] is not None  # an eval at step 3 belongs to the step-3 checkpoint


def test_rng_state_round_trip():
    st = ck.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    ck.set_rng_state(st)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# ------------------------------------------------------------- atomic writes
def test_a_step_saved_twice_is_never_overwritten(corpus: Path, tmp_path: Path):
    t = trained(corpus, tmp_path / "run")
    first = t.last_checkpoint
    digest = ck.read_meta(first)["sha256"]
    second = t.save_checkpoint("requested")
    assert second != first and second.endswith("step-00000006-1.pt")
    assert ck.read_meta(first)["sha256"] == digest
    assert [p for _, p, _ in ck.list_checkpoints(str(tmp_path / "run"))][-2:] == [first, second]
    assert ck.resolve_checkpoint(str(tmp_path / "run")) == second


def test_incomplete_files_are_never_chosen_and_get_cleaned_up(corpus: Path, tmp_path: Path):
    run = tmp_path / "run"
    t = trained(corpus, run, max_steps=4)
    d = run / "checkpoints"
    (d / "step-00000009.pt").write_bytes(Path(t.last_checkpoint).read_bytes())  # renamed, killed before its meta
    part = d / ".tmp-abc.part"
    part.write_bytes(b"half a checkpoint")
    os.utime(part, (0, 0))
    assert ck.resolve_checkpoint(str(run)) == t.last_checkpoint
    t.save_checkpoint("requested")  # saving prunes what interrupted writes left behind
    assert not (d / "step-00000009.pt").exists() and not part.exists()


def test_newest_damaged_checkpoint_falls_back_to_an_older_one(corpus: Path, tmp_path: Path):
    run = tmp_path / "run"
    trained(corpus, run, checkpoint_every=2)
    newest = Path(ck.resolve_checkpoint(str(run)))
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    obj = ck.load_checkpoint(str(run))
    assert obj.step == 4 and obj.skipped and "step-00000006.pt" in obj.skipped[0]
    with pytest.raises(CheckpointError, match="corrupt"):
        ck.load_checkpoint(str(newest))  # a file named explicitly is never swapped for another
    t = Trainer(tiny_config(corpus, run, max_steps=6, resume=str(run)))
    t.setup()
    assert t.step == 4
    logs = [r for r in read_metrics(str(run / "metrics.jsonl")) if r["type"] == "log"]
    assert any("skipped damaged checkpoint step-00000006.pt" in r["message"] for r in logs)


# --------------------------------------------------------------- safe loading
class Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow  # two real CLI processes
def test_malicious_pickle_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    pt = run / "checkpoints" / "step-00000001.pt"
    pt.parent.mkdir(parents=True)
    torch.save({"format": ck.FORMAT, "model": {}, "x": Evil(str(marker))}, pt)
    rewrite_meta(pt)  # even with a matching checksum
    with pytest.raises(CheckpointError, match="refused: loading it needs arbitrary unpickling"):
        ck.load_checkpoint(str(run))
    r = run_cli("generate", str(pt), "--prompt", "x")
    assert_one_clear_line(r, "refused", "arbitrary unpickling", "trust")
    r = run_cli("train", "--headless", "--resume", str(run))
    assert_one_clear_line(r, "refused")
    assert not marker.exists()


def test_truncated_file_is_refused(corpus: Path, tmp_path: Path):
    t = trained(corpus, tmp_path / "run")
    pt = Path(t.last_checkpoint)
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"is truncated \(\d+ of \d+ bytes\)"):
        ck.load_checkpoint(str(pt))
    rewrite_meta(pt)  # the size and checksum now agree: the zip reader still refuses it
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ck.load_checkpoint(str(pt))
    assert_one_clear_line(run_cli("generate", str(pt), "--prompt", "It"), "truncated or corrupt")


def test_flipped_byte_in_tensor_data_is_caught_by_the_checksum(corpus: Path, tmp_path: Path):
    t = trained(corpus, tmp_path / "run")
    pt = Path(t.last_checkpoint)
    with zipfile.ZipFile(pt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        name_len = len(info.filename.encode())
    raw = bytearray(pt.read_bytes())
    extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x40
    pt.write_bytes(bytes(raw))
    silent = ck.load_checkpoint(str(pt), verify=False)  # torch itself loads it without complaint
    good = t.model.state_dict()
    assert any(not torch.equal(silent.model[k], good[k]) for k in good)
    with pytest.raises(CheckpointError, match="corrupt .its sha256 does not match"):
        ck.load_checkpoint(str(pt))
    assert_one_clear_line(run_cli("generate", str(pt), "--prompt", "It"), "sha256 does not match")


def test_loading_into_another_architecture_names_the_shapes(corpus: Path, tmp_path: Path):
    t = trained(corpus, tmp_path / "run")
    obj = ck.load_checkpoint(t.last_checkpoint)
    other = GPT(ModelConfig(vocab_size=t.tokenizer.vocab_size, context_length=32, n_layer=2, n_head=2, n_embd=48))
    from engine.strategy import Strategy

    msg = "; ".join(Strategy().mismatch(other, obj.model))
    assert "tok_emb.weight: checkpoint (" in msg and ", 32) vs model (" in msg and ", 48)" in msg
    assert "missing: blocks.1." in msg


def test_old_torch_is_refused(monkeypatch: pytest.MonkeyPatch, corpus: Path, tmp_path: Path):
    t = trained(corpus, tmp_path / "run")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(CheckpointError, match="known weights_only loading escapes"):
        ck.load_checkpoint(t.last_checkpoint)


# ------------------------------------------------------------------ retention
def test_keep_last_plus_best_val(tmp_path: Path):
    run = str(tmp_path / "run")
    vals = [3.0, 2.0, 2.5, None, 2.7, 2.6]
    for step, v in enumerate(vals, start=1):
        ck_io.write_checkpoint(ck.checkpoint_name(run, step), {"w": torch.zeros(2)}, {"step": step, "val_loss": v})
        ck.prune(run, keep_last=2)
    assert [s for s, _, _ in ck.list_checkpoints(run)] == [2, 5, 6]


def test_trainer_keeps_last_k_and_the_best(corpus: Path, tmp_path: Path):
    run = tmp_path / "run"
    trained(corpus, run, max_steps=12, checkpoint_every=2, eval_every=2, keep_last=2)
    cks = ck.list_checkpoints(str(run))
    steps = [s for s, _, _ in cks]
    assert steps[-2:] == [10, 12] and len(steps) <= 3
    best = min((m["val_loss"], s) for s, _, m in cks)[1]
    assert ck.best_checkpoint(cks).endswith(f"step-{best:08d}.pt")
    assert len(list((run / "checkpoints").glob("*.pt"))) == len(steps)


# ------------------------------------------------------------------- disk full
def test_disk_full_leaves_the_previous_checkpoint_intact(monkeypatch: pytest.MonkeyPatch, corpus: Path,
                                                         tmp_path: Path):
    run = tmp_path / "run"
    t = trained(corpus, run)
    before = ck.list_checkpoints(str(run))
    t.step += 1  # a new step to save
    monkeypatch.setattr(ck_io._HashingWriter, "write", disk_full_writer(after_bytes=4096))
    with pytest.raises(CheckpointError, match="disk full while writing .*step-00000007.pt; the previous checkpoint "
                                              "is intact: free some space"):
        t.save_checkpoint("periodic")
    assert ck.list_checkpoints(str(run)) == before
    assert sorted(os.listdir(run / "checkpoints")) == ["step-00000006.meta.json", "step-00000006.pt"]
    ck.load_checkpoint(str(run))  # verifies


def test_disk_full_on_the_meta_file_removes_the_new_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    run = str(tmp_path / "run")
    ck_io.write_checkpoint(ck.checkpoint_name(run, 1), {"w": torch.ones(2)}, {"step": 1})

    def full(path: str, obj) -> None:
        raise ck_io._write_error(path, OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(ck_io, "write_json_atomic", full)
    with pytest.raises(CheckpointError, match="disk full"):
        ck_io.write_checkpoint(ck.checkpoint_name(run, 2), {"w": torch.ones(2)}, {"step": 2})
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step-00000001.meta.json", "step-00000001.pt"]


def test_disk_full_stops_the_cli_with_one_line(corpus: Path, tmp_path: Path):
    from tests.faults import run_faulty_cli
    from tests.test_cli import TINY

    run = tmp_path / "run"
    r = run_faulty_cli("enospc@2", "train", "--headless", "--data", str(corpus), *TINY, "--max-steps", "10",
                       "--checkpoint-every", "3", "--out", str(run))
    assert_one_clear_line(r, "disk full while writing", "step-00000006.pt", "previous checkpoint is intact",
                          "free some space")
    assert [s for s, _, _ in ck.list_checkpoints(str(run))] == [3]
    ck.load_checkpoint(str(run))
