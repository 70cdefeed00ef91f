"""``gpt-tui compare RUN [RUN ...]``: runs' loss curves on one chart, what differs and how each did."""

from __future__ import annotations

import re

import typer

from .common import friendly_errors


def parse_size(text: str) -> tuple[int, int]:
    """``120x40`` -> (120, 40)."""
    from engine.errors import GptTuiError

    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or not (40 <= int(m.group(1)) <= 1000 and 12 <= int(m.group(2)) <= 500):
        raise GptTuiError(f"--size {text!r} is not COLSxROWS", "give e.g. --size 120x40 (at least 40x12)")
    return int(m.group(1)), int(m.group(2))


def register(app: typer.Typer) -> None:
    """Add ``gpt-tui compare`` to ``app``."""

    @app.command()
    @friendly_errors
    def compare(
        runs: list[str] = typer.Argument(..., metavar="RUN", show_default=False,
                                         help="Run directories, or folders of runs (every run under each)."),
        svg: str = typer.Option(None, "--svg", metavar="FILE", show_default=False,
                                help="Write the comparison to FILE as an SVG instead of opening the screen."),
        size: str = typer.Option("120x40", "--size", metavar="COLSxROWS", help="Size of the --svg picture."),
    ) -> None:
        """Compare runs: train and val loss on one chart (x: steps or tokens), the settings that differ, and
        each run's final train loss, best val loss and its step, steps and tokens. Runs still training are
        re-read every 2 s. Keys: x axis, y log, arrows scroll the table, q quit."""
        from engine.errors import GptTuiError

        from .common import has_terminal
        from .compare import compare_runs, resolve_runs, write_svg

        paths = resolve_runs(runs)
        if svg:
            write_svg(paths, svg, parse_size(size))
            print(f"wrote {svg} ({len(paths)} runs)")
            return
        if not has_terminal():
            raise GptTuiError("compare needs a terminal to draw on",
                              "run it in a terminal, or write a picture with --svg FILE")
        compare_runs(paths)
