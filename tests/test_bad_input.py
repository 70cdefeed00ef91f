"""Bad input through the real CLI: one clear stderr line (problem and fix), non-zero exit, no
traceback, and nothing lost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ck
from engine.events import read_metrics
from engine.trainer import Trainer
from tests.conftest import SMALL_TEXT, run_cli, tiny_config
from tests.faults import assert_one_clear_line, run_faulty_cli
from tests.test_cli import TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny char-level run (context 32) shared by the tests of this module."""
    d = tmp_path_factory.mktemp("trained")
    corpus = d / "corpus.txt"
    corpus.write_text(SMALL_TEXT, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT_TUI_CACHE", str(d / "cache"))
        t = Trainer(tiny_config(corpus, d / "run", max_steps=4))
        t.setup()
        t.fit()
    return d / "run"


def train(*args: str) -> tuple:
    return ("train", "--headless", *TINY, "--max-steps", "4", *args)


def check(r, *words: str) -> str:
    return assert_one_clear_line(r, *words)


# ------------------------------------------------------------------- data
def test_missing_data(tmp_path: Path):
    check(run_cli(*train("--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r"))),
          "nope.txt does not exist", "check the path")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, words", [
    (b"", ("is empty", "give a file with text")),
    (b"  \n\n \t\n", ("is empty",)),
    (bytes(range(256)) * 40, ("looks binary", "UTF-8")),
    ("caf\u00e9 au lait, tr\u00e8s bien\n".encode("latin-1") * 200, ("not UTF-8", "iconv")),
], ids=["empty", "blank", "binary", "latin1"])
def test_unusable_data_file(tmp_path: Path, content: bytes, words: tuple):
    f = tmp_path / "data.txt"
    f.write_bytes(content)
    check(run_cli(*train("--data", str(f), "--out", str(tmp_path / "r"))), *words)


def test_data_folder_without_text_files(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "img.png").write_bytes(b"\x89PNG")
    check(run_cli(*train("--data", str(tmp_path / "d"))), "holds no text files")


def test_data_too_short_for_the_context(tmp_path: Path):
    f = tmp_path / "short.txt"
    f.write_text("far too short for a context of 32\n", encoding="utf-8")
    check(run_cli(*train("--data", str(f))), "train split has", "context is 32", "lower --context")


def test_validation_split_too_short(tmp_path: Path):
    f = tmp_path / "text.txt"
    f.write_text(SMALL_TEXT[:3000], encoding="utf-8")
    check(run_cli(*train("--data", str(f), "--val-ratio", "0.005")), "val split has", "raise --val-ratio")


def test_data_too_short_for_one_batch(tmp_path: Path):
    f = tmp_path / "text.txt"
    f.write_text(SMALL_TEXT[:1500], encoding="utf-8")
    check(run_cli(*train("--data", str(f), "--batch-size", "64")), "fewer than one step's batch", "--batch-size")


# --------------------------------------------------------------- settings
@pytest.mark.parametrize("args, words", [
    (("--preset", "huge"), ("unknown preset 'huge'", "tiny")),
    (("--tokenizer", "bpe"), ("unknown tokenizer 'bpe'", "gpt2")),
    (("--device", "tpu"), ("unknown device 'tpu'", "cpu")),
    (("--lr", "0"), ("--lr must be positive",)),
    (("--lr", "-0.001"), ("--lr must be positive",)),
    (("--batch-size", "0"), ("--batch-size must be positive",)),
    (("--context", "-4"), ("--context must be positive",)),
    (("--max-steps", "0"), ("--max-steps must be positive",)),
    (("--epochs", "0"), ("--epochs must be positive",)),
    (("--warmup-steps", "10"), ("--warmup-steps 10 is longer than the run (4 steps)", "use --warmup-steps")),
    (("--n-embd", "30", "--n-head", "4"), ("n_embd 30 is not divisible by n_head 4", "multiple")),
])
def test_bad_setting(corpus: Path, tmp_path: Path, args: tuple, words: tuple):
    check(run_cli(*train("--data", str(corpus), "--out", str(tmp_path / "r"), *args)), *words)
    assert not (tmp_path / "r" / "checkpoints").exists() or not os.listdir(tmp_path / "r" / "checkpoints")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_where_there_is_none(corpus: Path):
    check(run_cli("train", "--headless", "--data", str(corpus), "--device", "cuda", "--max-steps", "2"),
          "CUDA was asked for", "--device cpu")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_where_there_is_none(corpus: Path):
    check(run_cli("train", "--headless", "--data", str(corpus), "--device", "mps", "--max-steps", "2"),
          "MPS was asked for", "--device cpu")


def test_unknown_flag_is_one_line():
    r = run_cli("train", "--bogus")
    assert r.returncode == 2
    check(r, "No such option: --bogus", "gpt-tui train --help")
    check(run_cli("train", "--batch-size", "many"), "--batch-size", "gpt-tui train --help")


# ------------------------------------------------------------------ resume
def test_resume_from_a_run_without_checkpoint(tmp_path: Path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-00000005.pt").write_bytes(b"partial")  # no meta.json: never complete
    check(run_cli("train", "--headless", "--resume", str(run)), "has no complete checkpoint", "without --resume")
    check(run_cli("train", "--headless", "--resume", str(tmp_path / "absent")), "does not exist")
    (tmp_path / "empty").mkdir()
    check(run_cli("train", "--headless", "--resume", str(tmp_path / "empty")), "not a gpt-tui run directory")


def test_resume_with_another_model_shape_is_refused(trained: Path):
    before = ck.list_checkpoints(str(trained))
    check(run_cli("train", "--headless", "--resume", str(trained), "--n-embd", "64"),
          "cannot resume with changed setting(s) n_embd: 32 -> 64", "start a new run")
    check(run_cli("train", "--headless", "--resume", str(trained), "--preset", "small"), "preset: 'tiny' -> 'small'")
    assert ck.list_checkpoints(str(trained)) == before


def test_resume_with_a_context_beyond_the_position_table(trained: Path):
    check(run_cli("train", "--headless", "--resume", str(trained), "--context", "64"),
          "--context 64 is longer than the position table of the checkpoint's weights (32)", "--context 32")


def test_init_with_a_context_beyond_the_position_table(trained: Path, corpus: Path, tmp_path: Path):
    pytest.importorskip("engine.pretrained")
    check(run_cli("train", "--headless", "--init", str(trained), "--data", str(corpus), "--context", "64",
                  "--max-steps", "2", "--out", str(tmp_path / "new")),
          "--context 64 is longer than the position table", "32")


def test_resume_of_a_finished_run_asks_for_more_steps(trained: Path):
    check(run_cli("train", "--headless", "--resume", str(trained)), "already finished (4 of 4 steps)", "--max-steps")


def test_new_run_into_an_existing_run_dir_is_refused(trained: Path, corpus: Path):
    before = ck.list_checkpoints(str(trained))
    metrics = (trained / "metrics.jsonl").read_bytes()
    check(run_cli(*train("--data", str(corpus), "--out", str(trained))), "already holds a run", "--resume")
    assert ck.list_checkpoints(str(trained)) == before and (trained / "metrics.jsonl").read_bytes() == metrics


def test_resume_from_a_damaged_file(trained: Path, tmp_path: Path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    check(run_cli("train", "--headless", "--resume", str(bad)), "bad.pt")


# ------------------------------------------------------------------ memory
@pytest.mark.slow  # two real CLI processes
def test_out_of_memory_suggests_settings_and_keeps_the_checkpoint(corpus: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = run_faulty_cli("oom@6", *train("--data", str(corpus), "--out", str(run), "--checkpoint-every", "2",
                                      "--max-steps", "10", "--batch-size", "4"))
    line = check(r, "out of memory at step 6 (batch 4 x context 32)",
                 f"--resume {run} --batch-size 2 --grad-accum 2", "step-00000004.pt")
    assert r.returncode == 2, line
    assert [s for s, _, _ in ck.list_checkpoints(str(run))] == [2, 4]
    ck.load_checkpoint(str(run))  # the last good checkpoint loads
    recs = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in recs if r["type"] == "step"] == [1, 2, 3, 4, 5]
    assert any(r["type"] == "failed" and "out of memory" in r["error"] for r in recs)
    # the suggested settings resume the run (the same tokens per step keep the data order)
    again = run_cli("train", "--headless", "--resume", str(run), "--batch-size", "2", "--grad-accum", "2")
    assert again.returncode == 0, again.stderr
    assert "changed on resume: batch_size: 4 -> 2" in again.stdout


# ---------------------------------------------------------------- generate
def test_generate_with_an_empty_prompt(trained: Path):
    check(run_cli("generate", str(trained), "--prompt", ""), "the prompt is empty", "type some text")


def test_generate_with_characters_outside_the_char_vocabulary(trained: Path):
    check(run_cli("generate", str(trained), "--prompt", "It had \u00e9t\u00e9 \u20ac"),
          "outside the model's char vocabulary", "'\u00e9'", "'\u20ac'", "training corpus")


def test_generate_from_a_run_without_checkpoint(tmp_path: Path):
    check(run_cli("generate", str(tmp_path), "--prompt", "x"), "not a gpt-tui run directory")


CPU_ALLOC_FAILURE = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 402653184 bytes. Error code 12 (Cannot allocate memory)")


def test_the_cpu_allocator_failing_is_out_of_memory(corpus: Path, tmp_path: Path) -> None:
    """torch raises a plain RuntimeError when CPU memory runs out: it reads as out of memory, with settings that fit."""
    from engine.errors import GptTuiError
    from engine.trainer import Trainer
    from tui.common import describe_exception

    assert describe_exception(RuntimeError(CPU_ALLOC_FAILURE)).startswith("out of memory: lower --batch-size")
    assert describe_exception(RuntimeError("something else")) == "RuntimeError: something else"

    class Starved(Trainer):
        def train_step(self):  # type: ignore[no-untyped-def]
            if self.step == 3:
                raise RuntimeError(CPU_ALLOC_FAILURE)
            return super().train_step()

    t = Starved(tiny_config(corpus, tmp_path / "run", max_steps=10))
    t.setup()
    with pytest.raises(GptTuiError, match=r"out of memory at step 4 .*--batch-size 2 --grad-accum 2"):
        t.fit()
