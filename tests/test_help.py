"""`--help` says what the code does, and reads at 80 columns; --debug shows tracebacks."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path

import pytest

from engine.config import (
    CHAR_PRESETS,
    DEMO_EPOCHS,
    DEMO_LR,
    FINETUNE_DEFAULTS,
    LORA_LR,
    TrainConfig,
    default_text,
    finetune_defaults,
)
from engine.model import PRESETS
from tests.conftest import run_cli
from tui.cmd_train import FINETUNE_ONLY, NOT_FOR_FINETUNE, train_settings

OPTION = re.compile(r"^  (?:-\w, )?(--[\w-]+)")


def help_blocks(text: str) -> dict[str, str]:
    """Each option's help as one line (click wraps at 80 columns, breaking after hyphens)."""
    blocks: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        m = OPTION.match(line)
        if m:
            name = m.group(1).split("/")[0]
            blocks[name] = line.strip()
        elif name and line.startswith(" " * 20) and line.strip():
            prev = blocks[name]
            blocks[name] = prev + ("" if prev.endswith("-") else " ") + line.strip()
        else:
            name = None
    return blocks


@pytest.fixture(scope="module")
def train_help() -> str:
    r = run_cli("train", "--help", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def finetune_help() -> str:
    r = run_cli("finetune", "--help", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_train_flag_shows_the_codes_default(train_help: str) -> None:
    blocks = help_blocks(train_help)
    for f in fields(TrainConfig):
        if f.name in FINETUNE_ONLY:
            assert flag(f.name) not in blocks, f.name
            continue
        assert f"(default: {default_text(f.name)})" in blocks[flag(f.name)], (f.name, blocks[flag(f.name)])


def test_every_finetune_flag_shows_finetunings_default(finetune_help: str) -> None:
    blocks = help_blocks(finetune_help)
    built = {k: v for k, v in finetune_defaults(0).items() if k != "tokenizer"}
    for f in fields(TrainConfig):
        if f.name in NOT_FOR_FINETUNE:
            assert flag(f.name) not in blocks, f.name
            continue
        text = blocks[flag(f.name)]
        if f.name == "lr":
            assert f"(default: {built['lr']:g}; {LORA_LR:g} with --lora-rank)" in text
        elif f.name in built:
            assert f"(default: {built[f.name]})" in text, (f.name, text)
        else:
            assert f"(default: {default_text(f.name)})" in text, (f.name, text)
    assert finetune_defaults(16)["lr"] == LORA_LR and finetune_defaults(0)["lr"] == FINETUNE_DEFAULTS["lr"]


def test_defaults_in_words_match_what_the_code_does(train_help: str) -> None:
    blocks = help_blocks(train_help)
    lr = blocks["--lr"]
    for preset in PRESETS:  # the lr each preset trains with is the one help names for it
        peak = TrainConfig(preset=preset).peak_lr()
        assert f"{peak:g} for {preset}" in lr or (preset.startswith("gpt2") and f"{peak:g} for the GPT-2 sizes" in lr)
    tok = blocks["--tokenizer"]
    for preset in PRESETS:
        chosen = TrainConfig(preset=preset).effective_tokenizer()
        assert (preset in CHAR_PRESETS) == (chosen == "char")
    assert f"char for {' and '.join(CHAR_PRESETS)}, gpt2 for the others" in tok
    # epochs: 3 on the embedded demo corpus (no --data), else 1
    assert f"1; {DEMO_EPOCHS} on the embedded demo corpus" in blocks["--epochs"]
    assert train_settings({}, {})[0].epochs == DEMO_EPOCHS
    assert train_settings({}, {})[0].peak_lr() == DEMO_LR and f"{DEMO_LR:g} for tiny on the embedded demo" in lr
    assert train_settings({"preset": "small"}, {})[0].peak_lr() == TrainConfig(preset="small").peak_lr()
    assert train_settings({"lr": 5e-4}, {})[0].peak_lr() == 5e-4
    from engine.setup import schedule

    cfg = train_settings({"data": ["my.txt"]}, {})[0]
    assert cfg.epochs is None and schedule(cfg, 10)[0] == 10
    # threads: every core headless, fewer beside the dashboard on a busy machine
    assert "every core headless" in blocks["--threads"]
    from engine.device import default_threads

    assert default_threads(with_ui=False) == (os.cpu_count() or 1)
    assert 1 <= default_threads(with_ui=True) <= (os.cpu_count() or 1)
    ctx = blocks["--context"]
    for preset, shape in PRESETS.items():
        assert f"{preset} {shape['context_length']}" in ctx
        assert TrainConfig(preset=preset).effective_context() == shape["context_length"]


@pytest.mark.parametrize("command", ["train", "finetune", "sample", "generate", "status", "attach", "bench", "prepare"])
def test_help_reads_at_80_columns(command: str) -> None:
    r = run_cli(command, "--help", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    long = [line for line in r.stdout.splitlines() if len(line) > 80]
    assert not long, long
    # options name their value (N, X, TEXT, PATH ...), not typer's <str>; train and finetune have no arguments
    pattern = r"<(str|int|float)>" if command in ("train", "finetune") else r"--[\w-]+ <(str|int|float)>"
    assert not re.search(pattern, r.stdout), r.stdout


def test_debug_shows_the_traceback_of_a_failing_train(tmp_path: Path) -> None:
    args = ("train", "--headless", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run"))
    plain = run_cli(*args)
    assert plain.returncode == 2
    assert plain.stderr.startswith("gpt-tui: error: data path") and plain.stderr.count("\n") == 1
    assert "Traceback" not in plain.stderr
    debug = run_cli(args[0], "--debug", *args[1:])
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr and "DataError" in debug.stderr
    assert debug.stderr.rstrip().endswith(plain.stderr.rstrip())  # the same line after the traceback
