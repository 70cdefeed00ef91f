"""Commands for runs in other processes: attach, status, pause, resume, checkpoint, eval, set, stop."""

from __future__ import annotations

from typing import Any

import typer

from .common import friendly_errors
from .format import fmt_value

RUN_DIR = typer.Argument(..., help="The run directory (the --out of `gpt-tui train`).", show_default=False,
                         metavar="RUN_DIR")
WAIT = typer.Option(30.0, "--wait", help="Seconds to wait for the run to act on it (0: do not wait).")


def _is_state(*states: str) -> Any:
    return lambda rec: rec.get("type") == "state" and rec.get("state") in states


def _command(run_dir: str, cmd: str, done: Any, wait: float, **args: Any) -> dict[str, Any] | None:
    """Send ``cmd`` and wait (up to ``wait`` s) for the first event matching ``done``; returns it."""
    from engine.control import ControlClient

    client = ControlClient(run_dir)
    stream = client.subscribe()
    try:
        client.call(cmd, **args)
        return stream.wait_for(done, wait) if wait > 0 else None
    finally:
        stream.close()


def _status_line(st: dict[str, Any]) -> str:
    total = st.get("total_steps")
    steps = f"step {st['step']}/{total}" if total else f"step {st['step']}"
    ranks = f", {st['world_size']} ranks" if st.get("world_size", 1) > 1 else ""
    last = st.get("last_checkpoint") or "none yet"
    return f"{st['state']} at {steps} (pid {st['pid']}{ranks}); last checkpoint: {last}"


STATUS_HELP = """Print the state of a run: live (running or paused), or how it ended.

Exit status: 0 running, paused, finished or stopped; 1 the run failed; 3 its process died
before finishing (continue it with --resume); 2 not a run directory."""
STATUS_EXIT = {"finished": 0, "stopped": 0, "live": 0, "failed": 1, "dead": 3}
"""``gpt-tui status``'s exit status for a run whose process has ended (0 while it runs)."""


def _ended_status(run_dir: str) -> tuple[str, int]:
    """The status line of a run with no live process, from what it wrote (metrics.jsonl), and the exit status."""
    from engine.checkpoint import list_checkpoints
    from engine.events import read_metrics
    from engine.runs import RunDir

    from .cmd_runs import run_state

    rd = RunDir(run_dir)
    state, step = run_state(rd.path)
    records = read_metrics(rd.metrics)
    total = next((r.get("total_steps") for r in reversed(records) if r.get("type") == "start"), None)
    error = next((r.get("error") for r in reversed(records) if r.get("type") == "failed"), None)
    ckpts = list_checkpoints(rd.path)
    last = ckpts[-1][1] if ckpts else "none"
    steps = f"step {step}/{total}" if total else f"step {step}"
    resume = f"; continue it with gpt-tui train --resume {run_dir}"
    line = {
        "finished": f"finished at {steps} (not running); last checkpoint: {last}",
        "stopped": f"stopped at {steps} (not running); last checkpoint: {last}{resume}",
        "failed": f"failed at {steps}: {error or 'see its metrics.jsonl'}; last checkpoint: {last}{resume}",
        "live": f"running at {steps}; its process is there but its control channel does not answer (yet)",
    }.get(state, f"dead at {steps}: its process ended without finishing; last checkpoint: {last}{resume} --detach")
    return line, STATUS_EXIT.get(state, 3)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""

    @app.command()
    @friendly_errors
    def attach(
        run_dir: str = RUN_DIR,
        web: bool = typer.Option(False, "--web", help="Serve the dashboard to a web browser instead (until Ctrl+C)."),
        port: int = typer.Option(8000, "--port", help="Port of --web."),
        host: str = typer.Option("127.0.0.1", "--host",
                                 help="Address --web binds to (anyone who reaches it controls the run)."),
    ) -> None:
        """Open the dashboard on a running run (q leaves it running), or read-only on a finished one;
        --web serves it to a browser (each page a viewer)."""
        if web:
            from .web import serve_attach

            serve_attach(run_dir, host, port)
            return
        from .launch import attach_run

        attach_run(run_dir)

    @app.command(help=STATUS_HELP)
    @friendly_errors
    def status(run_dir: str = RUN_DIR) -> None:
        from engine.control import ControlClient, ControlError
        from engine.runs import RunDir

        try:
            st = ControlClient(run_dir).call("status")
        except ControlError:
            if not RunDir(run_dir).is_run():
                raise  # not a run directory: that error, exit 2
            line, code = _ended_status(run_dir)
            print(line)
            raise typer.Exit(code) from None
        print(_status_line(st))

    @app.command()
    @friendly_errors
    def pause(run_dir: str = RUN_DIR, wait: float = WAIT) -> None:
        """Pause a running run at the end of its current step."""
        _set_paused(run_dir, True, wait)

    @app.command()
    @friendly_errors
    def resume(run_dir: str = RUN_DIR, wait: float = WAIT) -> None:
        """Resume a paused run."""
        _set_paused(run_dir, False, wait)

    @app.command()
    @friendly_errors
    def checkpoint(run_dir: str = RUN_DIR, wait: float = WAIT) -> None:
        """Write a checkpoint of a running run now (at the end of its current step)."""
        _request(run_dir, "checkpoint", wait, lambda r: f"checkpoint: {r['path']}",
                 "checkpoint requested: it is written at the end of the current step")

    @app.command(name="eval")
    @friendly_errors
    def eval_(run_dir: str = RUN_DIR, wait: float = WAIT) -> None:
        """Evaluate a running run's train and val loss now."""
        _request(run_dir, "eval", wait,
                 lambda r: f"eval step {r['step']}: train loss {r['train_loss']:.4f} | val loss {r['val_loss']:.4f}",
                 "eval requested")

    @app.command(name="set")
    @friendly_errors
    def set_(
        run_dir: str = RUN_DIR,
        changes: list[str] = typer.Argument(..., metavar="NAME=VALUE", show_default=False,
                                            help="Settings to change, e.g. lr=3e-4 (lr=x0.5 scales it), "
                                                 "eval-every=50, target-val-loss=off."),
        wait: float = WAIT,
    ) -> None:
        """Change settings of a running run at its next step (lr, eval-every, sample-every, grad-clip, ...)."""
        set_live(run_dir, changes, wait)

    @app.command()
    @friendly_errors
    def stop(
        run_dir: str = RUN_DIR,
        save: bool = typer.Option(True, "--save/--no-save", help="Write a checkpoint before stopping."),
        wait: float = typer.Option(120.0, "--wait", help="Seconds to wait for the run to stop (0: do not wait)."),
    ) -> None:
        """Stop a running run (after a checkpoint, unless --no-save)."""
        saved: list[str] = []

        def done(rec: dict[str, Any]) -> bool:
            if rec.get("type") == "checkpoint":
                saved.append(rec["path"])
            return _ended(rec)

        rec = _command(run_dir, "stop", done, wait, save=save)
        print(_outcome(rec, "", "stop requested: the run stops at the end of its current step"))
        if saved:
            print(f"checkpoint: {saved[-1]}")


from engine.runs import FINAL_STATES as _ENDED  # noqa: E402


def _set_paused(run_dir: str, paused: bool, wait: float) -> None:
    """Pause or resume a run and print what it did."""
    from engine.control import ControlClient

    st = ControlClient(run_dir).call("status")
    if st["paused"] == paused:
        print(f"already paused at step {st['step']}" if paused else "the run is not paused")
        return
    if paused:
        rec = _command(run_dir, "pause", _is_state("paused", *_ENDED), wait)
        print(_outcome(rec, "paused", "pause requested: the run pauses at the end of its current step"))
    else:
        rec = _command(run_dir, "resume", _is_state("running", *_ENDED), wait)
        print(_outcome(rec, "running", "resume requested"))


def _request(run_dir: str, cmd: str, wait: float, report: Any, pending: str) -> None:
    """Send ``cmd`` and print the event of the same type it produces (``report`` formats it)."""
    rec = _command(run_dir, cmd, lambda r: r.get("type") == cmd or _ended(r), wait)
    print(report(rec) if rec is not None and rec.get("type") == cmd else _outcome(rec, "", pending))


def _ended(rec: dict[str, Any]) -> bool:
    return rec.get("type") == "failed" or (rec.get("type") == "state" and rec.get("state") in _ENDED)


def _outcome(rec: dict[str, Any] | None, wanted: str, pending: str) -> str:
    """What happened, from the event waited for (None: not yet)."""
    if rec is None:
        return pending
    if rec.get("type") == "failed":
        return f"the run failed at step {rec.get('step')}: {rec.get('error')}"
    state, msg = rec.get("state"), rec.get("message")
    if state != wanted and state in _ENDED:
        return f"the run {state} at step {rec.get('step')}" + (f" ({msg})" if msg else "")
    return f"{state} at step {rec.get('step')}" + (f" ({msg})" if msg else "")


def parse_assignments(items: list[str]) -> list[tuple[str, str]]:
    """``NAME=VALUE`` arguments as (setting, value); ``eval-every`` and ``eval_every`` are the same."""
    from engine.errors import GptTuiError

    out = []
    for item in items:
        name, eq, value = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not eq or not name:
            raise GptTuiError(f"expected NAME=VALUE, got {item!r}", "e.g. gpt-tui set RUN lr=3e-4 eval-every=50")
        out.append((name, value.strip()))
    return out


def set_live(run_dir: str, items: list[str], wait: float) -> None:
    """Have the run check every change, then send them as one command (applied at the same step) and
    print each as the run applies it. A refusal is one line and exit status 2; nothing is sent then."""
    from engine.control import ControlClient, ControlError
    from engine.errors import GptTuiError

    changes = [{"setting": name, "value": value} for name, value in parse_assignments(items)]
    client = ControlClient(run_dir)
    stream = client.subscribe() if wait > 0 else None  # first, so the change events cannot be missed
    try:
        try:
            sent = client.call("set", changes=changes, source="shell")["changes"]
        except ControlError as e:
            if not e.problem.startswith("the run refused set: "):
                raise
            raise GptTuiError(e.problem.removeprefix("the run refused set: "), e.fix) from None
        if stream is None:
            for r in sent:
                print(f"{_flag(r['setting'])} -> {fmt_value(r['new'])} requested: it applies at the next step")
            return
        _print_applied(stream, sent, wait)
    finally:
        if stream is not None:
            stream.close()


def _print_applied(stream: Any, sent: list[dict[str, Any]], wait: float) -> None:
    """Wait for the change events of ``sent`` (in order) and print ``step N: lr 1e-3 -> 3e-4`` for each."""
    import time

    from engine.errors import GptTuiError

    left = list(sent)
    deadline = time.monotonic() + wait  # they apply at the same step: one wait for all

    def done(rec: dict[str, Any]) -> bool:
        return _ended(rec) or (rec.get("type") == "change" and rec.get("source") == "shell"
                               and rec.get("setting") == left[0]["setting"])

    while left:
        rec = stream.wait_for(done, max(0.0, deadline - time.monotonic()))
        if rec is None:
            print(f"{_flag(left[0]['setting'])} -> {fmt_value(left[0]['new'])} requested: "
                  "it applies at the end of the current step")
            left.pop(0)
            continue
        if rec.get("type") != "change":
            raise GptTuiError(_outcome(rec, "", "") + " before the change applied", exit_code=1)
        print(f"step {rec['step']}: {_flag(rec['setting'])} {fmt_value(rec['old'])} -> {fmt_value(rec['new'])}")
        left.pop(0)


def _flag(setting: str) -> str:
    return setting.replace("_", "-")

