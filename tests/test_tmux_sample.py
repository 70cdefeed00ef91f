"""``gpt-tui sample`` end to end in a real terminal (tmux) on a run that ``gpt-tui train`` made."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import run_cli

GPT_TUI = str(Path(sys.executable).parent / "gpt-tui")
TINY_RUN = ["--preset", "tiny", "--tokenizer", "char", "--context", "32", "--n-layer", "1", "--n-head", "2",
            "--n-embd", "32", "--batch-size", "4", "--max-steps", "10", "--eval-every", "5", "--eval-batches", "2",
            "--sample-every", "5", "--checkpoint-every", "5", "--sample-tokens", "10", "--prompt", "It",
            "--dtype", "fp32", "--device", "cpu", "--threads", "1", "--headless"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


SOCKET = f"gpt-tui-sample-{os.getpid()}"  # a private tmux server: no other client resizes its window


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", "-L", SOCKET, *args], capture_output=True, text=True, timeout=30).stdout


def screen(session: str) -> str:
    return tmux("capture-pane", "-t", session, "-p")


def wait_screen(session: str, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = screen(session)
        if text in s:
            return s
        time.sleep(0.2)
    size = tmux("display", "-p", "-t", session, "#{window_width}x#{window_height}").strip()
    raise AssertionError(f"{text!r} never appeared on the {size} screen:\n{screen(session)}")


def wait_regex(session: str, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = screen(session)
        if re.search(pattern, s):
            return s
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} never matched the screen:\n{screen(session)}")


def keys(session: str, *k: str) -> None:
    tmux("send-keys", "-t", session, *k)
    time.sleep(0.3)  # typing speed: focus changes land before the next keys


def test_sample_in_tmux(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = run_cli("train", "--data", str(corpus), *TINY_RUN, "--out", str(run), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    history = tmp_path / "history.md"
    session = f"gpt-tui-sample-{os.getpid()}"
    env = f"GPT_TUI_CACHE={os.environ['GPT_TUI_CACHE']} TERM=xterm-256color OMP_NUM_THREADS=1"
    try:
        tmux("-f", "/dev/null", "new-session", "-d", "-s", session, "-x", "140", "-y", "45",
             f"env -u COLUMNS -u LINES {env} {GPT_TUI} sample {run} --history {history}; echo SAMPLE-EXIT=$?; sleep 60")
        wait_screen(session, "step-00000010.pt (step 10)")  # the newest checkpoint
        wait_screen(session, "Enter generates")

        # type a prompt and generate
        keys(session, "-l", "It had")
        keys(session, "Enter")
        s = wait_screen(session, "done ·")
        assert "tokens/s" in s and "1. 'It had'" in s

        # a long generation, stopped with Ctrl+C: set max new tokens from the keyboard
        keys(session, "Tab", "Tab", "Tab", "Tab")  # prompt -> temperature -> top-k -> top-p -> max new
        keys(session, "C-a", "C-k")
        keys(session, "-l", "1000000")
        wait_screen(session, "1000000")
        keys(session, "Enter")
        wait_screen(session, "generating ·")
        keys(session, "C-c")
        s = wait_screen(session, "stopped ·")
        assert "2. 'It had'" in s and "(stopped)" in s

        # save the history
        keys(session, "C-s")
        wait_screen(session, "saved 2 sample(s)")
        saved = history.read_text(encoding="utf-8")
        assert saved.count("\n## ") == 2 and "n=1000000" in saved

        # the timeline: both checkpoints sampled, and the samples training recorded
        keys(session, "F2")
        s = wait_screen(session, "2 checkpoint sample(s), 2 recorded sample(s)")
        assert s.index("step 5") < s.index("step 10")
        assert "sampled from its checkpoint" in s and "recorded during training" in s and "val loss" in s

        # the token view of what was generated
        keys(session, "F3")
        s = wait_screen(session, "char tokens")
        assert "longer than the context 32" in s
        # the tenth candidate's row: rank, id, piece, filtered and raw probability
        wait_regex(session, r"\b10 +\d+ +'.+' +(\d\.\d{3}|cut) +\d\.\d{3}")

        keys(session, "F1")
        wait_screen(session, "History (Enter recalls)")
        keys(session, "C-q")
        wait_screen(session, "SAMPLE-EXIT=0", timeout=20)
    finally:
        tmux("kill-server")
