"""``gpt-tui train --detach``: the run goes on in a background process.

The same command line runs again with ``--headless`` instead of ``--detach`` (and an ``--out``
when none was given) in a new session, so it survives the terminal closing and SSH hanging up;
its stdout and stderr go to ``RUN/train.log``. We wait until its control channel answers (or it
fails, when the log's last line is the reason) and print how to attach.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from engine.runs import TRAIN_LOG as LOG_NAME  # noqa: E402

from .common import fail

READY_TIMEOUT = 120.0  # seconds to wait for the channel (tokenizing a large corpus may take longer)


def _run_dir(cfg: Any) -> tuple[str, list[str]]:
    """The run directory of ``cfg`` and the flags to add so the background run uses it."""
    from engine.runs import new_run_path, run_dir_of_config

    known = run_dir_of_config(cfg.out, cfg.resume) if cfg is not None else None
    if known:
        return known, []
    out = new_run_path()
    return out, ["--out", out]


def background_args(argv: list[str], extra: list[str]) -> list[str]:
    """The command line of the background run: ``--detach`` dropped, ``--headless`` and ``extra`` added."""
    args = [a for a in argv[1:] if a != "--detach"]
    if "--headless" not in args:
        args.append("--headless")
    return args + extra


def detach_run(argv: list[str], cfg: Any = None) -> None:
    """Start the run described by ``argv`` in the background and print how to attach to it."""
    run_dir, extra = _run_dir(cfg)
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, LOG_NAME)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} gpt-tui {' '.join(background_args(argv, extra))}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tui.cli", *background_args(argv, extra)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=env,
        )
    ready = _wait_ready(proc, run_dir, log_path)
    if ready is False and proc.returncode == 0:
        print(f"the background run already ended: see {log_path}")
        return
    if ready is False:
        fail(f"the background run exited with status {proc.returncode}: {_last_line(log_path)} (log: {log_path})",
             proc.returncode or 1)
    state = "training" if ready else "starting (still setting up)"
    print(f"{state} in the background: pid {proc.pid}, run {run_dir}\n"
          f"  log:    {log_path}\n"
          f"  attach: gpt-tui attach {run_dir}\n"
          f"  pause:  gpt-tui pause {run_dir}   (resume: gpt-tui resume {run_dir})\n"
          f"  set:    gpt-tui set {run_dir} lr=3e-4   (any live setting)\n"
          f"  stop:   gpt-tui stop {run_dir}")


def _wait_ready(proc: subprocess.Popen, run_dir: str, log_path: str) -> bool | None:
    """True once the run's channel answers, False when the process exited first, None on timeout."""
    from engine.control import ControlClient, ControlError

    client = ControlClient(run_dir, timeout=2.0)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            st = client.call("status")
            if st.get("pid") == proc.pid:
                return True
        except ControlError:
            pass
        time.sleep(0.2)
    return None


def _last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"
