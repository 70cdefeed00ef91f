"""Steering a run from the dashboard: the live settings form (s) and the history of changes (h)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static

from engine.commands import RunController
from engine.config import LIVE_SETTINGS, LiveChange, TrainConfig, parse_live_change
from engine.errors import GptTuiError
from engine.recorder import Snapshot

from .format import fmt_value
from .live import current_config, current_settings, history_rows

HINTS = {
    "lr": "peak LR (x0.5 scales)",
    "eval_every": "steps (0: at the end)",
    "sample_every": "steps, epoch or 0",
    "grad_clip": "grad-norm clip (0: off)",
    "spike_factor": "x recent mean (0: off)",
    "max_bad_steps": "non-finite steps in a row",
    "target_val_loss": "val loss, or off",
}


class SettingsScreen(ModalScreen[list[LiveChange] | None]):
    """A form with one field per live setting, prefilled with the run's values now.

    Enter applies the fields that were edited, all or none: each is checked first with the engine's
    own rules (``engine.config.parse_live_change``), a refused one is one line here and nothing is
    sent; the accepted ones go to the run, which applies them at its next step. Esc closes.
    """

    BINDINGS = [Binding("escape", "close", "close")]

    def __init__(self, controller: RunController, snap: Snapshot) -> None:
        super().__init__()
        self.controller = controller
        self.cfg = current_config(snap) or TrainConfig()
        now = current_settings(snap) or {name: getattr(self.cfg, name) for name in LIVE_SETTINGS}
        now["lr"] = self.cfg.peak_lr()
        self.values = {name: fmt_value(v) for name, v in now.items()}

    def compose(self) -> ComposeResult:
        with Vertical(id="set-box"):
            yield Static(Text("live settings", style="bold") + Text("  applied at the next step", style="dim"),
                         id="set-title")
            for name in LIVE_SETTINGS:
                with Horizontal(classes="set-row"):
                    yield Label(name.replace("_", "-"), classes="set-name")
                    yield Input(self.values[name], id=f"set-{name}", classes="set-input")
                    yield Label(HINTS.get(name, ""), classes="set-hint")
            yield Static("", id="set-status")
            yield Static("Enter applies · Tab next field · Esc closes", id="set-keys")

    def on_mount(self) -> None:
        self.query_one("#set-lr", Input).focus()

    def edited(self) -> list[tuple[str, str]]:
        """(setting, text) of the fields whose text differs from the value they opened with."""
        out = []
        for name in LIVE_SETTINGS:
            text = self.query_one(f"#set-{name}", Input).value.strip()
            if text != self.values[name]:
                out.append((name, text))
        return out

    def say(self, message: str, style: str = "") -> None:
        self.query_one("#set-status", Static).update(Text(message, style=style))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.apply()

    def apply(self) -> None:
        edited = self.edited()
        if not edited:
            self.say("nothing changed (Esc closes)", "dim")
            return
        try:
            for name, text in edited:  # all checked before any is sent
                parse_live_change(self.cfg, name, text)
            done = self.controller.change_many(edited, source="dashboard")  # applied at the same step
        except GptTuiError as e:
            self.say(str(e), "bold red")
            return
        self.dismiss(done)

    def action_close(self) -> None:
        self.dismiss(None)


class ChangesScreen(ModalScreen[None]):
    """Every live change of the run: step, setting, old -> new, and who asked for it."""

    BINDINGS = [Binding("escape,h,q", "close", "close")]

    def __init__(self, snap: Snapshot) -> None:
        super().__init__()
        self.rows = history_rows(snap)

    def compose(self) -> ComposeResult:
        with Vertical(id="changes-box"):
            yield Static(Text("live changes", style="bold"), id="changes-title")
            with VerticalScroll(id="changes-list"):
                yield Static(self.table(), id="changes-table")
            yield Static("Esc closes · s or + / - change settings · gpt-tui set RUN NAME=VALUE from a shell",
                         id="changes-keys")

    def table(self) -> Text:
        if not self.rows:
            return Text("no live changes yet", style="dim")
        head = ("step", "setting", "old -> new", "source")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(4)]
        t = Text()
        t.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip() + "\n", style="bold")
        for i, row in enumerate(self.rows):
            cells = [row[0].rjust(widths[0]), *(c.ljust(w) for c, w in zip(row[1:], widths[1:], strict=True))]
            t.append("  ".join(cells).rstrip() + ("\n" if i < len(self.rows) - 1 else ""))
        return t

    def action_close(self) -> None:
        self.dismiss(None)


def describe(changes: list[LiveChange]) -> str:
    """``lr -> 3e-4, eval-every -> 50`` for the status line."""
    return ", ".join(f"{c.flag} -> {fmt_value(c.new)}" for c in changes)

