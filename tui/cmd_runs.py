"""``gpt-tui runs [DIR]``: the runs under a folder, one line each, from what they wrote to disk."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import typer

from .common import friendly_errors


@dataclass
class RunRow:
    """What ``gpt-tui runs`` shows of one run directory."""

    name: str
    state: str  # live, finished, stopped, failed, dead
    step: int
    total: int | None
    best_val: float | None
    tokens: int
    changed: float  # mtime of metrics.jsonl (or the folder)


def run_state(run_dir: str) -> tuple[str, int]:
    """live, finished, stopped, failed or dead (recorded as running but its process is gone), and the step."""
    from engine.control import read_info
    from engine.runs import FINAL_STATES, RunDir, pid_alive

    state, step = RunDir(run_dir).last_state()
    if state in FINAL_STATES:
        return str(state), step
    info = read_info(run_dir) or {}
    return ("live" if pid_alive(info.get("pid")) else "dead"), step


def _figures(run_dir: str) -> tuple[float | None, int]:
    """Best val loss and the tokens seen, from metrics.jsonl."""
    from engine.events import read_metrics

    best, tokens = None, 0
    for rec in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        if rec.get("type") == "step":
            tokens = int(rec.get("tokens_seen") or tokens)
        elif rec.get("type") == "eval" and isinstance(rec.get("val_loss"), (int, float)):
            v = float(rec["val_loss"])
            if math.isfinite(v) and (best is None or v < best):
                best = v
    return best, tokens


def _total(run_dir: str) -> int | None:
    from engine.runs import RunDir

    saved = RunDir(run_dir).saved_config()
    total = saved.get("total_steps", (saved.get("train") or {}).get("max_steps"))
    return int(total) if isinstance(total, int) else None


def read_row(run_dir: str) -> RunRow:
    state, step = run_state(run_dir)
    best, tokens = _figures(run_dir)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    changed = os.path.getmtime(metrics if os.path.exists(metrics) else run_dir)
    return RunRow(os.path.basename(os.path.normpath(run_dir)), state, step, _total(run_dir), best, tokens, changed)


def list_runs(root: str) -> list[RunRow]:
    """Every run directory directly under ``root`` (or ``root`` itself when it is one), newest change last."""
    from engine.runs import RunDir

    if RunDir(root).is_run():
        return [read_row(root)]
    dirs = [os.path.join(root, d) for d in sorted(os.listdir(root))]
    return sorted((read_row(d) for d in dirs if RunDir(d).is_run()), key=lambda r: r.changed)


def format_rows(rows: list[RunRow], now: float | None = None) -> str:
    from .format import ago, fmt_count

    now = time.time() if now is None else now
    lines = [f"{'name':<24} {'state':<9} {'step/total':>13} {'best val':>9} {'tokens':>8}  changed"]
    for r in rows:
        steps = f"{r.step:,}/{r.total:,}" if r.total else f"{r.step:,}"
        best = f"{r.best_val:.4f}" if r.best_val is not None else "-"
        lines.append(f"{r.name[:24]:<24} {r.state:<9} {steps:>13} {best:>9} {fmt_count(r.tokens):>8}  "
                     f"{ago(now - r.changed)}")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add ``gpt-tui runs`` to ``app``."""

    @app.command()
    @friendly_errors
    def runs(
        root: str = typer.Argument("runs", help="Folder of run directories (default runs/), or one run."),
        watch: bool = typer.Option(False, "--watch", "-w", help="Redraw every 2 s until Ctrl+C."),
    ) -> None:
        """The runs under a folder: state (live, finished, stopped, failed, dead), step/total, best val,
        tokens and when each last changed."""
        from engine.errors import GptTuiError

        if not os.path.isdir(root):
            raise GptTuiError(f"{root} is not a folder", "give the folder that holds the run directories, e.g. runs/")
        _show(root, watch)


def _show(root: str, watch: bool) -> None:
    rows = list_runs(root)
    if not watch:
        print(format_rows(rows) if rows else f"no runs under {root}")
        return
    try:
        while True:
            rows = list_runs(root)
            print("\x1b[H\x1b[2J" + (format_rows(rows) if rows else f"no runs under {root}"), flush=True)
            time.sleep(2.0)
    except KeyboardInterrupt:
        return
