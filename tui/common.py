"""Helpers shared by the CLI commands: error handling, terminal detection, signals."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

DEBUG = {"on": os.environ.get("GPT_TUI_DEBUG") == "1"}


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit."""
    print(f"gpt-tui: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def friendly_errors(fn: F) -> F:
    """Turn user errors (and out-of-memory) into one stderr line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from engine.errors import GptTuiError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except GptTuiError as e:
            if DEBUG["on"]:
                traceback.print_exc()
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            print("gpt-tui: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001
            if DEBUG["on"]:
                traceback.print_exc()
            fail(describe_exception(e) + " (run with --debug for the traceback)", 1)

    return wrapper  # type: ignore[return-value]


def describe_exception(e: BaseException) -> str:
    from engine.errors import is_out_of_memory

    if is_out_of_memory(e):
        return "out of memory: lower --batch-size or --context (or raise --grad-accum to keep the effective batch)"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:300]


WEB_PAGE_ENV = "GPT_TUI_WEB"
"""Set to 1 in the command each browser page of ``--web`` runs (tui/web.py): the page is its terminal."""


def served_to_browser() -> bool:
    """Whether this process draws into a browser page (textual-serve's web driver) instead of a terminal."""
    return os.environ.get(WEB_PAGE_ENV) == "1" or os.environ.get("TEXTUAL_DRIVER", "").endswith(":WebDriver")


METAVARS = {int: "N", float: "X", str: "TEXT"}


def name_metavars(app: typer.Typer) -> None:
    """Give every option and argument of ``app``'s commands a plain metavar (``N``, ``X``, ``TEXT``,
    ``RUN_DIR``) where none is set, so ``--help`` never shows typer's ``<str>`` / ``<int>``."""
    import inspect
    import typing

    for command in app.registered_commands:
        fn = command.callback
        if fn is None:
            continue
        try:
            hints = typing.get_type_hints(inspect.unwrap(fn))
        except (NameError, TypeError):
            hints = {}
        for name, param in inspect.signature(fn).parameters.items():
            info = param.default
            if not isinstance(info, typer.models.ParameterInfo) or info.metavar is not None:
                continue
            hint = hints.get(name, param.annotation)
            kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            if kinds[0] is bool:
                continue
            if isinstance(info, typer.models.ArgumentInfo):
                info.metavar = name.upper()
            else:
                info.metavar = METAVARS.get(kinds[0], "TEXT")


def has_terminal() -> bool:
    """A terminal the dashboard can draw on (Textual draws on stderr), or a browser page (``--web``)."""
    if served_to_browser():
        return True
    term = os.environ.get("TERM", "")
    return sys.stdin.isatty() and sys.stderr.isatty() and term not in ("", "dumb")


def run_app(app: typer.Typer, argv: list[str]) -> int:
    """Run the typer app on ``argv``; usage errors (unknown flag, bad value) as one line; the exit code."""
    from .entry import report_cli_error

    try:
        code = app(args=argv, standalone_mode=False)
    except typer.TyperException as e:  # every click error: usage errors, a bare `gpt-tui`
        return report_cli_error(e)
    except typer.Abort:
        print("gpt-tui: aborted", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


class SignalStopper:
    """First SIGINT/SIGTERM: stop at the next step boundary with a checkpoint; second: exit at once.

    ``note`` says what the first signal does now (default: a checkpoint at the next step).
    """

    def __init__(self, on_stop: Callable[[], None], note: Callable[[], str] | None = None,
                 signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.on_stop = on_stop
        self.note = note or (lambda: "saving a checkpoint at the next step")
        self.count = 0
        self.signals = [s for s in signals if s is not None]
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalStopper:
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            print(f"\ngpt-tui: {signal.Signals(signum).name}: {self.note()} (signal again to exit at once)",
                  file=sys.stderr, flush=True)
            self.on_stop()
        else:
            print("gpt-tui: exiting now; checkpoints on disk are intact", file=sys.stderr, flush=True)
            os._exit(130)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def signal_note(trainer: Any) -> str:
    """What the first signal does now, in words."""
    if trainer.state == "finishing":
        return "stopping the end-of-run work (the final checkpoint is already saved)"
    return "saving a checkpoint at the next step"


def tokenize_progress() -> Callable[[int, int], None]:
    """A progress bar on stderr for tokenizing corpora of 4 MB or more."""
    state = {"last": 0.0, "shown": False}

    def progress(done: int, total: int) -> None:
        now = time.time()
        if done < total and now - state["last"] < 0.5:
            return
        state["last"] = now
        if total > 4 << 20 or state["shown"]:
            state["shown"] = True
            width = 30
            filled = int(width * done / max(1, total))
            end = "\n" if done >= total else "\r"
            print(f"tokenizing [{'#' * filled}{'.' * (width - filled)}] {done / 2**20:.1f}/{total / 2**20:.1f} MB",
                  end=end, file=sys.stderr, flush=True)

    return progress
