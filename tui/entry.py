"""Entry-point helpers: ``gpt-tui --version`` and click's usage errors as one line.

Only typer's public API is used: every error click raises derives from ``typer.TyperException``;
usage errors carry the ``ctx`` of the command they concern.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

import typer


def package_version() -> str:
    """gpt-tui's version, from the installed package's metadata."""
    try:
        return version("gpt-tui")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def show_version(value: bool) -> None:
    """``--version`` callback: print ``gpt-tui X.Y.Z`` and exit."""
    if value:
        print(f"gpt-tui {package_version()}")
        raise typer.Exit(0)


def report_cli_error(e: typer.TyperException) -> int:
    """Print a click error (unknown flag, bad value, no command) and return its exit code."""
    code = getattr(e, "exit_code", 2)
    if type(e).__name__ == "NoArgsIsHelpError":  # bare `gpt-tui`: the help text (typer tells it apart by name too)
        e.show()  # type: ignore[attr-defined]
        return code
    if hasattr(e, "ctx"):  # a usage error
        ctx = e.ctx  # type: ignore[attr-defined]
        cmd = ctx.command_path if ctx is not None else "gpt-tui"
        print(f"gpt-tui: error: {e.format_message().rstrip('.')}: see `{cmd} --help`", file=sys.stderr)
        return code
    print(f"gpt-tui: error: {e.format_message()}", file=sys.stderr)
    return code
