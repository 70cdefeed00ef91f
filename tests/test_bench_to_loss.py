"""benchmarks/bench_to_loss.py: gpt-tui and the book's code race to a val loss on the same windows."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, shared


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# The book's ch05 (its training loop) imports matplotlib and tqdm at the top.
needs_book = pytest.mark.skipif(not all(_has(m) for m in ("llms_from_scratch", "matplotlib", "tqdm")),
                                reason="needs llms-from-scratch (pip install --no-deps) with matplotlib and tqdm")


@pytest.mark.slow
@needs_book
def test_quick_race_reports_both_sides_on_the_same_windows() -> None:
    data = shared("tinyshakespeare", "input.txt")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_to_loss.py"), "--quick", "--quiet",
                        "--threads", "1", "--data", str(data)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "target: val loss <= 3.0000" in out
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^(gpt-tui adamw|book \(simple\)) \(.*?\)\s+(\S+)", out, re.M)}
    assert set(rows) == {"gpt-tui adamw", "book (simple)"}, out
    assert rows["gpt-tui adamw"].isdigit(), out  # gpt-tui reached val 3.0 within the quick run's 300 steps
    assert int(rows["gpt-tui adamw"]) % 10 == 1  # estimates after step 1, 11, 21, ... as the book's loop
    if rows["book (simple)"].isdigit():
        assert re.search(r"gpt-tui adamw vs book: wall time \d+\.\d\dx", out), out
    assert "load average" in out
