"""Shared fixtures: an isolated cache, small corpora, tiny configs, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; GPT_TUI_SHARED_DATA points elsewhere (e.g. from a git worktree).
SHARED_DATA = Path(os.environ.get("GPT_TUI_SHARED_DATA") or REPO.parent / "shared" / "data")

# One process of the suite never needs more than a couple of torch threads.
os.environ.setdefault("OMP_NUM_THREADS", "2")

SMALL_TEXT = (
    "It had always been his fate to have women say such things of him: the fact should be set down in "
    "extenuation. What struck me now was that, for the first time, he resented the tone. I had seen him, "
    "so often, basking under similar tributes--was it the conjugal note that robbed them of their savour? "
) * 40


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own GPT_TUI_CACHE (token files, corpora, measured peaks)."""
    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("GPT_TUI_CACHE", str(d))
    return d


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small English text file (about 12 KB)."""
    p = tmp_path / "corpus.txt"
    p.write_text(SMALL_TEXT, encoding="utf-8")
    return p


def shared(*parts: str) -> Path:
    """A file of ../shared/data, or skip the test when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (../shared/data is only beside the repository in development and CI)")
    return p


def tiny_config(data: Path | str, out: Path | str, **kw):
    """A TrainConfig for a very small, fast char-level run."""
    from engine.config import TrainConfig

    base = dict(
        data=[str(data)], preset="tiny", tokenizer="char", context=32, n_layer=1, n_head=2, n_embd=32,
        batch_size=4, max_steps=10, eval_every=5, eval_batches=2, sample_every="0", out=str(out),
        dtype="fp32", device="cpu", threads=1, sample_tokens=10,
    )
    base.update(kw)
    return TrainConfig(**base)


def run_cli(*args: str, timeout: float = 180, env: dict | None = None, cwd: str | Path | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:  # noqa: A002
    """Run the real ``gpt-tui`` console script in a subprocess."""
    exe = Path(sys.executable).parent / "gpt-tui"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tui.cli"]
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "2")
    if env:
        full_env.update(env)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd, input=input)
