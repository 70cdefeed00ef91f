"""gpt-tui runs: the state of each run directory as recorded on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_cli
from tui.cmd_runs import list_runs, run_state


def make_run(root: Path, name: str, records: list[dict], pid: int | None = None, max_steps: int = 50) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"train": {"max_steps": max_steps}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if pid is not None:
        (d / "control.json").write_text(json.dumps({"socket": "x", "pid": pid}))
    return d


def step(n: int) -> dict:
    return {"type": "step", "step": n, "loss": 3.0, "tokens_seen": n * 1000}


def gone_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_runs_states_and_figures(tmp_path: Path) -> None:
    start = {"type": "start"}
    evals = [{"type": "eval", "step": 5, "val_loss": 2.5}, {"type": "eval", "step": 10, "val_loss": 2.25},
             {"type": "eval", "step": 15, "val_loss": 2.75}]
    running = {"type": "state", "state": "running", "step": 0}
    make_run(tmp_path, "a-done", [start, running, step(20), *evals, {"type": "state", "state": "finished", "step": 20}])
    make_run(tmp_path, "b-stop", [start, running, step(7), {"type": "state", "state": "stopped", "step": 7}])
    make_run(tmp_path, "c-fail", [start, running, step(3), {"type": "failed", "error": "boom"}])
    make_run(tmp_path, "d-live", [start, running, step(4)], pid=os.getpid())
    make_run(tmp_path, "e-dead", [start, running, step(9)], pid=gone_pid())
    (tmp_path / "not-a-run").mkdir()
    rows = {r.name: r for r in list_runs(str(tmp_path))}
    assert {n: r.state for n, r in rows.items()} == {
        "a-done": "finished", "b-stop": "stopped", "c-fail": "failed", "d-live": "live", "e-dead": "dead"}
    done = rows["a-done"]
    assert (done.step, done.total, done.best_val, done.tokens) == (20, 50, 2.25, 20_000)
    assert rows["e-dead"].best_val is None
    assert run_state(str(tmp_path / "d-live")) == ("live", 4)


def test_runs_cli_table_and_bad_folder(tmp_path: Path) -> None:
    make_run(tmp_path, "only", [{"type": "start"}, step(12), {"type": "eval", "step": 12, "val_loss": 1.5},
                                {"type": "state", "state": "finished", "step": 12}], max_steps=12)
    r = run_cli("runs", str(tmp_path))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("only"))
    assert "finished" in line and "12/12" in line and "1.5000" in line and "12.0k" in line and "ago" in line
    bad = run_cli("runs", str(tmp_path / "nowhere"))
    assert bad.returncode != 0 and "is not a folder" in bad.stderr and "Traceback" not in bad.stderr
