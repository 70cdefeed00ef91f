"""The dashboard's keys: one table that gives both the bindings and the help screen."""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding


@dataclass(frozen=True)
class Key:
    """One key of the dashboard."""

    keys: str
    """Textual key names, comma-separated."""
    action: str
    label: str
    """Its word in the footer."""
    help: str
    """What it does, for the help screen."""
    viewer_help: str | None = None
    """What it does in a viewer (``gpt-tui attach``), where the run is another process's."""
    show: bool = True
    """In the footer."""
    priority: bool = False
    commands: bool = False
    """It commands the run: absent for a read-only viewer."""
    display: str | None = None
    """How the help screen writes the key."""


DASHBOARD_KEYS: tuple[Key, ...] = (
    Key("p", "pause", "pause", "pause / resume training (at the next step boundary)", commands=True),
    Key("p", "resume", "resume", "resume training", commands=True, display=""),  # the footer's p while paused
    Key("c", "checkpoint", "checkpoint", "write a checkpoint now", commands=True),
    Key("g", "generate", "generate", "generate from the live weights (a full-screen panel)", commands=True),
    Key("e", "eval", "eval", "evaluate train and val loss now", commands=True),
    Key("s", "settings", "set", "change the learning rate, eval interval, target ... live", commands=True),
    Key("plus", "lr_scale(2.0)", "lr x2", "double the peak learning rate", show=False, commands=True, display="+ / -"),
    Key("minus", "lr_scale(0.5)", "lr /2", "halve the peak learning rate", show=False, commands=True, display=""),
    Key("h", "history", "changes", "the history of live changes", show=False),
    Key("o", "overlay", "compare", "overlay another run's curves (pick from runs/)", show=False),
    Key("m", "system", "system", "show or hide the system pane (CPU, memory, GPU, data wait)", show=False),
    Key("x", "toggle_axis", "axis", "chart x axis: steps or tokens", show=False),
    Key("y", "toggle_log", "log y", "loss chart y axis: linear or log", show=False),
    Key("w", "toggle_window", "window", "charts: the whole run or the recent window (the last 20% of the steps, at least 50)",
        show=False),
    Key("b", "toggle_bpb", "bpb", "val loss in nats per token or bits per byte", show=False),
    Key("ctrl+s", "screenshot", "screenshot", "save an SVG screenshot into the run directory", show=False),
    Key("ctrl+p", "command_palette", "palette", "command palette (themes, screenshot ...)", show=False),
    Key("tab", "focus_next", "", "focus the samples pane (arrows scroll)", show=False),
    Key("question_mark", "help", "help", "this help", display="?"),
    Key("q", "quit_run", "quit", "save a checkpoint and quit", viewer_help="close the viewer (the run goes on)"),
    Key("ctrl+c,ctrl+q", "quit_run", "quit", "save a checkpoint and quit (twice: quit at once)", show=False,
        priority=True, viewer_help="close the viewer (the run goes on)", display="ctrl+c / ctrl+q"),
)


def bindings(keys: tuple[Key, ...] = DASHBOARD_KEYS) -> list[Binding]:
    return [Binding(k.keys, k.action, k.label, show=k.show, priority=k.priority,
                    key_display=k.display if k.display and "/" not in k.display else None) for k in keys]


def help_rows(viewer: bool, controls: bool, keys: tuple[Key, ...] = DASHBOARD_KEYS) -> list[tuple[str, str]]:
    """(key, what it does) for the help screen of the dashboard, a viewer, or a read-only viewer."""
    rows = []
    for k in keys:
        if (k.commands and not controls) or k.display == "":
            continue
        what = k.viewer_help if viewer and k.viewer_help else k.help
        if k.action == "lr_scale(2.0)":
            what = "double / halve the peak learning rate"
        rows.append((k.display or k.keys, what))
    return rows


def commanding_actions(keys: tuple[Key, ...] = DASHBOARD_KEYS) -> set[str]:
    """Actions that command the run (off for a read-only viewer)."""
    return {k.action.split("(")[0] for k in keys if k.commands}
