"""The sample timeline and the token view of ``gpt-tui sample``.

Both are Textual screens that draw what :mod:`engine.inspect_tokens` computes. Model work
runs in background threads that only fill lists; the screens poll them, like the panel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Label, Static
from textual.worker import Worker, WorkerState

from engine import checkpoint as ck
from engine.errors import GptTuiError
from engine.inference import LoadedModel
from engine.inspect_tokens import (
    Candidate,
    MaskedPosition,
    TimelineEntry,
    checkpoint_samples,
    recorded_samples,
    show_piece,
    split_tokens,
    top_candidates,
)
from engine.sampling import SampleSettings

from .format import EMPTY_RESPONSE
from .sample_panel import PromptArea, describe_settings

SettingsFn = Callable[[], SampleSettings]


def _entry_widget(e: TimelineEntry) -> Static:
    head = Text(f"step {e.step}", style="bold")
    if e.epoch is not None:  # stored from 0, shown from 1 as everywhere else
        head.append(f" · epoch {e.epoch + 1}")
    head.append(f" · val loss {e.val_loss:.3f}" if e.val_loss is not None else " · val loss -")
    head.append(" · sampled from its checkpoint" if e.kind == "checkpoint" else " · recorded during training",
                style="cyan" if e.kind == "checkpoint" else "magenta")
    body = Text("\n")
    if e.error:
        body.append(e.error, style="red")
    else:
        body.append(e.prompt, style="dim")
        body.append(e.text if e.text.strip() else EMPTY_RESPONSE, style="" if e.text.strip() else "dim italic")
    return Static(head + body, classes=f"tl-entry tl-{e.kind}")


class TimelineScreen(Screen):
    """The same prompt sampled from every checkpoint of a run, with the recorded samples, by step."""

    DEFAULT_CSS = """
    TimelineScreen #tl-title { height: 1; background: $primary; padding: 0 1; text-style: bold; }
    TimelineScreen #tl-bar { height: 3; }
    TimelineScreen #tl-prompt { width: 1fr; }
    TimelineScreen #tl-tokens { width: 16; }
    TimelineScreen #tl-status { height: auto; padding: 0 1; }
    TimelineScreen #tl-status.error { color: $error; }
    TimelineScreen #tl-entries { height: 1fr; }
    TimelineScreen .tl-entry { margin: 0 1 1 1; padding: 0 1; border-left: thick $primary-darken-2; }
    TimelineScreen .tl-recorded { border-left: thick $secondary; }
    """

    BINDINGS = [
        Binding("ctrl+r", "refresh", "Refresh"),
        Binding("escape", "stop", "Stop sampling"),
    ]

    AUTO_REFRESH_SECONDS = 5.0

    def __init__(self, run_dir: str | None, settings_fn: SettingsFn, prompt: str = "\n", device: str = "cpu",
                 tokens: int = 40) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.settings_fn = settings_fn
        self.initial_prompt = prompt
        self.device = device
        self.initial_tokens = tokens
        self.entries: dict[tuple, TimelineEntry] = {}
        self._widgets: dict[tuple, Static] = {}
        self._lock = threading.Lock()
        self._incoming: list[TimelineEntry] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._run_prompt: str | None = None
        self._error: str | None = None
        self._started = False
        self.failures = 0

    def compose(self) -> ComposeResult:
        yield Static(f"Timeline · {self.run_dir or 'no run directory'}", id="tl-title")
        with Horizontal(id="tl-bar"):
            yield Input(self.initial_prompt.replace("\n", "\\n"), id="tl-prompt",
                        placeholder="prompt for every checkpoint (\\n for a new line)")
            yield Input(str(self.initial_tokens), id="tl-tokens", type="integer", placeholder="tokens")
        yield Static("", id="tl-status")
        yield VerticalScroll(id="tl-entries")
        yield Footer()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_screen_resume(self) -> None:
        if not self._started:
            self._started = True
            self.set_interval(0.2, self._poll)
            self.set_interval(self.AUTO_REFRESH_SECONDS, self.action_refresh)
            self.action_refresh()

    def on_unmount(self) -> None:
        self._stop.set()

    def _message(self, text: str, error: bool = False) -> None:
        status = self.query_one("#tl-status", Static)
        status.update(Text(text))
        status.set_class(error, "error")

    def _prompt(self) -> str:
        return self.query_one("#tl-prompt", Input).value.replace("\\n", "\n")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """A new prompt or length: sample every checkpoint again."""
        event.stop()
        self._stop.set()
        for key in [k for k in self.entries if k[0] == "checkpoint"]:
            del self.entries[key]
            self._widgets.pop(key).remove()
        self._run_prompt = None
        self.action_refresh()

    def action_stop(self) -> None:
        if self.busy:
            self._stop.set()
            self._message("sampling stopped: Ctrl+R goes on")

    def action_refresh(self) -> None:
        """Add samples recorded since, and sample checkpoints saved since (a run still training)."""
        if self.run_dir is None:
            self._message("this checkpoint is not inside a run directory (RUN/checkpoints/): no timeline", error=True)
            return
        for i, e in enumerate(recorded_samples(self.run_dir)):
            self._add(("recorded", e.step, i), e)
        if self.busy:
            return
        prompt = self._prompt()
        if not prompt:
            self._message("the prompt is empty: type some text to start from", error=True)
            return
        try:
            tokens = int(self.query_one("#tl-tokens", Input).value or "0")
            if tokens <= 0:
                raise GptTuiError(f"tokens must be positive, got {tokens}", "give a value above 0")
            settings = replace(self.settings_fn(), max_new_tokens=tokens)
        except (GptTuiError, ValueError) as e:
            self._message(f"{e} (the timeline uses the Sample view's settings)", error=True)
            return
        done = {k[1] for k in self.entries if k[0] == "checkpoint"}
        todo = [p for _, p, _ in ck.list_checkpoints(self.run_dir) if p not in done]
        if not todo:
            self._status_line()
            return
        self._run_prompt = prompt
        self._stop = stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(prompt, settings, set(done), stop), daemon=True,
                                        name="gpt-tui-timeline")
        self._thread.start()
        self._message(f"sampling {len(todo)} checkpoint(s) with {describe_settings(settings)} …")

    def _work(self, prompt: str, settings: SampleSettings, done: set[str], stop: threading.Event) -> None:
        try:
            for e in checkpoint_samples(self.run_dir or "", prompt, settings, self.device, skip=done.__contains__,
                                        should_stop=stop.is_set):
                if stop.is_set():
                    return
                with self._lock:
                    self._incoming.append(e)
        except Exception as e:  # noqa: BLE001 - shown in the status line
            with self._lock:
                self._error = str(e) if isinstance(e, GptTuiError) else f"{type(e).__name__}: {e}"

    def _poll(self) -> None:
        with self._lock:
            new, self._incoming = self._incoming, []
            error, self._error = self._error, None
        if error:
            self._message(error, error=True)
        for e in new:
            if e.prompt == self._run_prompt:
                self._add(("checkpoint", e.path), e)
        if new and not error:
            self._status_line()

    def _add(self, key: tuple, e: TimelineEntry) -> None:
        if key in self.entries:
            return
        self.entries[key] = e
        if e.error:
            self.failures += 1
        order = sorted(self.entries, key=lambda k: (self.entries[k].step, k[0] == "checkpoint", str(k)))
        later = order[order.index(key) + 1:]
        widget = self._widgets[key] = _entry_widget(e)
        box = self.query_one("#tl-entries", VerticalScroll)
        before = next((self._widgets[k] for k in later if k in self._widgets), None)
        if before is not None:
            box.mount(widget, before=before)
        else:
            box.mount(widget)

    def _status_line(self) -> None:
        n_ck = sum(1 for k in self.entries if k[0] == "checkpoint")
        n_rec = len(self.entries) - n_ck
        state = "sampling …" if self.busy else "Ctrl+R (or every few seconds): add new checkpoints and samples"
        self._message(f"{n_ck} checkpoint sample(s), {n_rec} recorded sample(s) · {state}")


class TokenScreen(Screen):
    """How a text splits into tokens, and the likely next tokens after any of them."""

    DEFAULT_CSS = """
    TokenScreen #tk-title { height: 1; background: $primary; padding: 0 1; text-style: bold; }
    TokenScreen #tk-text { height: 5; }
    TokenScreen #tk-status { height: auto; padding: 0 1; }
    TokenScreen #tk-status.error { color: $error; }
    TokenScreen #tk-tables { height: 1fr; }
    TokenScreen #tk-tokens { width: 1fr; }
    TokenScreen #tk-right { width: 1fr; }
    TokenScreen #tk-right Label { padding: 0 1; text-style: bold; }
    TokenScreen #tk-next { height: 1fr; }
    TokenScreen #tk-masked { height: 1fr; display: none; }
    TokenScreen.with-mask #tk-masked { display: block; }
    """

    BINDINGS = [
        Binding("ctrl+r", "analyze", "Split"),
        Binding("ctrl+t", "focus_tokens", "Tokens"),
    ]

    def __init__(self, lm_fn: Callable[[], LoadedModel], settings_fn: SettingsFn, text_fn: Callable[[], str]) -> None:
        super().__init__()
        self.lm_fn = lm_fn
        self.settings_fn = settings_fn
        self.text_fn = text_fn
        self.ids: list[int] = []
        self.candidates: list[Candidate] = []
        self.position: int | None = None

    def compose(self) -> ComposeResult:
        yield Static("Tokens · Enter splits the text · pick a token to see what could follow", id="tk-title")
        yield PromptArea("", id="tk-text", soft_wrap=True, tab_behavior="focus")
        yield Static("", id="tk-status")
        with Horizontal(id="tk-tables"):
            yield DataTable(id="tk-tokens", cursor_type="row", zebra_stripes=True)
            with Vertical(id="tk-right"):
                yield Label("next token", id="tk-next-label")
                yield DataTable(id="tk-next", cursor_type="row")
                yield DataTable(id="tk-masked", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#tk-tokens", DataTable).add_columns("#", "id", "piece", "part of")
        self.query_one("#tk-next", DataTable).add_columns("rank", "id", "piece", "p", "raw p")
        self.query_one("#tk-masked", DataTable).add_columns("#", "input", "target")

    def on_screen_resume(self) -> None:
        area = self.query_one("#tk-text", PromptArea)
        text = self.text_fn()
        if text and text != area.text:
            area.text = text
            self.action_analyze()
        area.focus()

    def _message(self, text: str, error: bool = False) -> None:
        status = self.query_one("#tk-status", Static)
        status.update(Text(text))
        status.set_class(error, "error")

    def on_prompt_area_submitted(self, _: PromptArea.Submitted) -> None:
        self.action_analyze()

    def action_focus_tokens(self) -> None:
        self.query_one("#tk-tokens", DataTable).focus()

    def action_analyze(self) -> None:
        """Split the text box into tokens and show the candidates after the last one."""
        text = self.query_one("#tk-text", PromptArea).text
        table = self.query_one("#tk-tokens", DataTable)
        table.clear()
        self.ids = []
        if not text:
            self._message("the text is empty: type or generate something first", error=True)
            return
        lm = self.lm_fn()
        try:
            pieces = split_tokens(lm.tokenizer, text)
        except GptTuiError as e:
            self._message(str(e), error=True)
            return
        for p in pieces:
            table.add_row(str(p.index), str(p.id), show_piece(p.piece), p.part_of)
        self.ids = [p.id for p in pieces]
        split = sum(1 for p in pieces if p.part_of)
        ctx = lm.model.cfg.context_length
        note = f" · {split} token(s) hold part of a character" if split else ""
        if len(self.ids) > ctx:
            note += f" · longer than the context {ctx}: the model sees the last {ctx}"
        self._message(f"{len(text)} characters → {len(self.ids)} {lm.tokenizer.name} tokens{note}")
        table.move_cursor(row=len(self.ids) - 1)
        self.show_candidates(len(self.ids) - 1)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "tk-tokens" and self.ids and event.cursor_row != self.position:
            self.show_candidates(event.cursor_row)

    def show_candidates(self, position: int) -> None:
        """Compute (in a thread) the likely tokens after token ``position``."""
        if not 0 <= position < len(self.ids):
            return
        try:
            s = self.settings_fn()
        except GptTuiError as e:
            self._message(f"{e} (the candidates use the Sample view's settings)", error=True)
            return
        self.position = position
        lm, ids = self.lm_fn(), self.ids[: position + 1]
        self.query_one("#tk-next-label", Label).update(
            f"after token #{position} ({show_piece(lm.tokenizer.piece(ids[-1]))}) · T={s.temperature:g} "
            f"k={s.top_k or 'all'} p={s.top_p or 'off'}")
        self.run_worker(lambda: top_candidates(lm.model, ids, lm.tokenizer, s.temperature, s.top_k, s.top_p),
                        thread=True, exclusive=True, group="candidates", name=str(position),
                        exit_on_error=False)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if worker.group != "candidates":
            return
        if event.state == WorkerState.ERROR:
            self._message(f"could not compute the next token: {worker.error}", error=True)
        if event.state != WorkerState.SUCCESS or worker.name != str(self.position):
            return
        self.candidates = worker.result
        table = self.query_one("#tk-next", DataTable)
        table.clear()
        for rank, c in enumerate(self.candidates, 1):
            table.add_row(str(rank), str(c.id), show_piece(c.piece), f"{c.prob:.3f}" if c.prob else "cut",
                          f"{c.raw_prob:.3f}")

    def show_masked(self, positions: list[MaskedPosition], title: str) -> None:
        """Show a training row's positions with their targets, masked ones (-100) marked."""
        self.set_class(True, "with-mask")
        table = self.query_one("#tk-masked", DataTable)
        table.clear()
        for p in positions:
            target = Text("-100 masked", style="dim") if p.target_id == -100 else Text(show_piece(p.target_piece))
            table.add_row(str(p.index), show_piece(p.input_piece), target)
        n = sum(1 for p in positions if p.target_id == -100)
        self._message(f"{title}: {n} of {len(positions)} targets masked (-100), not counted in the loss")
