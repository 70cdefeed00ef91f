"""The ``gpt-tui`` command line: the root command, its registration and the entry point.

Every command lives in a ``cmd_*`` module; this module is imported by nothing.
"""

from __future__ import annotations

import sys

import typer

from . import (
    cmd_compare,
    cmd_dist,
    cmd_gpt2,
    cmd_logs,
    cmd_prepare,
    cmd_runs,
    cmd_sample,
    cmd_speed,
    cmd_train,
)
from .common import DEBUG, name_metavars
from .entry import show_version

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help that reads at 80 columns
    help="Train GPT-style language models from scratch and watch them learn.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors (any command takes it)."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=show_version,
                                 help="Print gpt-tui's version and exit."),
) -> None:
    if debug:
        DEBUG["on"] = True


for _m in (cmd_train, cmd_gpt2, cmd_sample, cmd_speed, cmd_dist, cmd_prepare, cmd_runs, cmd_compare, cmd_logs):
    _m.register(app)
name_metavars(app)


def _take_debug(argv: list[str]) -> list[str]:
    """``--debug`` anywhere before ``--`` turns tracebacks on (``gpt-tui train --debug`` as well)."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" in argv[:end]:
        DEBUG["on"] = True
        return [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return argv


def main() -> None:
    """Entry point: usage errors (unknown flag, bad value) as one line, like every other error."""
    from .common import run_app

    sys.exit(run_app(app, _take_debug(sys.argv[1:])))


if __name__ == "__main__":
    main()
