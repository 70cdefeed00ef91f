"""The sampling panel: type a prompt, tune the sampling settings, watch the text stream in.

``SamplePanel`` is a Textual :class:`~textual.screen.Screen` over a
:class:`GenerationBackend`, so the same panel serves a checkpoint (``gpt-tui sample``,
through :class:`ModelBackend`) and the live weights of a training run (the dashboard,
through :class:`LiveBackend`). The panel polls its backend a few times a second; a
backend never calls into the UI.

Keys: Enter generates (Ctrl+J puts a new line in the prompt), Ctrl+C or Esc stops a
generation at once, Ctrl+L goes to the history (Enter there recalls an entry: prompt,
settings and output, ready to re-run with other settings), Ctrl+S saves the history to
a Markdown file. Esc with nothing running closes the panel inside the dashboard.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Checkbox, Footer, Input, Label, ListItem, ListView, Static, TextArea

from engine.commands import RunController
from engine.errors import GptTuiError
from engine.recorder import Recorder
from engine.sampling import SampleSettings

if TYPE_CHECKING:
    from engine.inference import LoadedModel


# ------------------------------------------------------------------------------ backends
class GenerationBackend(Protocol):
    """Something the panel can generate from; every method returns at once.

    ``start`` raises :class:`~engine.errors.GptTuiError` for a prompt it cannot take and
    may set ``note`` (e.g. the prompt was cut to the context). ``poll`` returns the text
    produced since the last poll, whether the generation is over, and its speed; when it
    failed, ``error`` says why.
    """

    template: str | None
    note: str | None
    error: str | None

    def start(self, prompt: str, settings: SampleSettings) -> None: ...

    def poll(self) -> tuple[str, bool, float]: ...

    def cancel(self) -> None: ...


@dataclass
class _Run:
    stop: threading.Event = field(default_factory=threading.Event)
    pieces: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    done: bool = False
    error: str | None = None


class ModelBackend:
    """Generates from a loaded checkpoint in a background thread (cancelled between tokens)."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.template = lm.template
        self.note: str | None = None
        self.error: str | None = None
        self._run: _Run | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, prompt: str, settings: SampleSettings) -> None:
        if not prompt:
            raise GptTuiError("the prompt is empty", "type some text to start from")
        text = self.lm.format_prompt(prompt)
        self.note = self.lm.truncation_note(text)  # raises for characters outside a char vocabulary
        self.cancel()
        self.error = None
        run = self._run = _Run()
        self._thread = threading.Thread(target=self._work, args=(run, text, settings), daemon=True,
                                        name="gpt-tui-sample")
        self._thread.start()

    def _work(self, run: _Run, text: str, settings: SampleSettings) -> None:
        try:
            for piece in self.lm.stream(text, settings, should_stop=run.stop.is_set, stats=run.stats):
                with self._lock:
                    run.pieces.append(piece)
        except GptTuiError as e:
            run.error = str(e)
        except Exception as e:  # noqa: BLE001 - shown in the panel instead of killing the UI
            run.error = f"{type(e).__name__}: {e}"
        finally:
            run.done = True

    def poll(self) -> tuple[str, bool, float]:
        run = self._run
        if run is None:
            return "", True, 0.0
        done = run.done  # read first: every piece is in before done is set
        with self._lock:
            text = "".join(run.pieces)
            run.pieces.clear()
        self.error = run.error
        return text, done, float(run.stats.get("tokens_per_sec", 0.0))

    def cancel(self) -> None:
        if self._run is not None:
            self._run.stop.set()

    def wait(self, timeout: float = 5.0) -> None:
        """Block until the running generation's thread has ended (for quitting and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)


class LiveBackend:
    """Generates from the live weights of a training run through its controller.

    ``controller`` is a :class:`~engine.commands.RunController` (``request_generate``,
    ``cancel_generation``); the text arrives as GenerateEvents in ``recorder``, which this backend
    reads on ``poll``. The engine judges the prompt (empty, unknown characters, cut to the context)
    and reports through the events' ``error`` and ``note``.
    """

    def __init__(self, controller: RunController, recorder: Recorder) -> None:
        self.controller = controller
        self.recorder = recorder
        self.template = controller.template
        self.note: str | None = None
        self.error: str | None = None
        self._id: int | None = None
        self._seen = 0
        self._cancelled = False

    def start(self, prompt: str, settings: SampleSettings) -> None:
        if not prompt:
            raise GptTuiError("the prompt is empty", "type some text to start from")
        gen = self.recorder.snapshot().generations.get(self._id) if self._id is not None else None
        if self._id is not None and (gen is None or gen.done is None):
            # a new request would clear the stop flag of the one still running
            raise GptTuiError("the stopped generation has not ended yet (it ends at the next step boundary)",
                              "press Enter again in a moment")
        self.error = self.note = None
        self._cancelled = False
        self._seen = 0
        self._id = self.controller.request_generate(prompt, settings)

    def poll(self) -> tuple[str, bool, float]:
        if self._id is None:
            return "", True, 0.0
        gen = self.recorder.snapshot().generations.get(self._id)
        if gen is None:
            return "", self._cancelled, 0.0
        self.note = gen.note
        new, self._seen = gen.text[self._seen:], len(gen.text)
        if gen.done is None:
            return new, self._cancelled, 0.0
        if gen.error:
            self.error = gen.error
            return "", True, 0.0
        return new, True, float(gen.done.tokens_per_sec)

    def cancel(self) -> None:
        if self._id is not None:
            self.controller.cancel_generation()
            self._cancelled = True


# --------------------------------------------------------------------------------- panel
@dataclass
class HistoryEntry:
    """One generation of the panel."""

    prompt: str
    output: str
    settings: SampleSettings
    tokens_per_sec: float = 0.0
    stopped: bool = False
    when: float = field(default_factory=time.time)

    def label(self, n: int) -> str:
        s = self.settings
        short = lambda t: repr(t[:24] + ("…" if len(t) > 24 else ""))  # noqa: E731
        return f"{n}. {short(self.prompt)} → {short(self.output)}\n   {describe_settings(s)}" + (
            " (stopped)" if self.stopped else "")


def describe_settings(s: SampleSettings) -> str:
    """Short form of the settings, e.g. ``T=0.8 k=50 p=off n=100 seed=- eot=stop``."""
    return (f"T={s.temperature:g} k={s.top_k or 'all'} p={s.top_p if s.top_p else 'off'} "
            f"n={s.max_new_tokens} seed={s.seed if s.seed is not None else '-'} eot={'stop' if s.stop_at_eot else 'go'}")


def history_markdown(entries: list[HistoryEntry], title: str = "") -> str:
    """The history as a Markdown document (prompt and output in fenced blocks)."""
    lines = [f"# Samples{': ' + title if title else ''}", ""]
    for i, e in enumerate(entries, 1):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.when))
        lines += [f"## {i}. {when}", "", f"settings: `{describe_settings(e.settings)}`"
                  + (f", {e.tokens_per_sec:.1f} tokens/s" if e.tokens_per_sec else "")
                  + (", stopped" if e.stopped else ""), "",
                  "prompt:", "", "~~~~text", e.prompt, "~~~~", "", "output:", "", "~~~~text", e.output, "~~~~", ""]
    return "\n".join(lines)


class PromptArea(TextArea):
    """The prompt box: Enter submits, Ctrl+J inserts a new line (pasted text keeps its lines)."""

    class Submitted(Message):
        """The user asked to generate."""

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted())
            return
        if event.key == "ctrl+j":
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


SETTING_FIELDS = (
    # id, label, input type, row of the settings (two short rows fit 80 columns)
    ("temperature", "temperature", "number", 0),
    ("top_k", "top-k", "integer", 0),
    ("top_p", "top-p", "number", 0),
    ("max_new_tokens", "max new tokens", "integer", 1),
    ("seed", "seed", "integer", 1),
)
PLACEHOLDERS = {"top_p": "off", "seed": "random"}
"""What an empty field means, shown in it."""
NARROW = 100
"""Below this many columns the history pane is hidden until Ctrl+L opens it (the output keeps the width)."""


_REQUIRED = object()


def parse_settings(values: dict[str, str], stop_at_eot: bool) -> SampleSettings:
    """SampleSettings from the panel's fields; a bad field raises GptTuiError naming it."""

    def num(name: str, kind: type, empty: Any) -> Any:
        raw = values.get(name, "").strip()
        if raw == "":
            if empty is _REQUIRED:
                raise GptTuiError(f"{name.replace('_', ' ')} is empty", "give it a value")
            return empty
        try:
            return kind(raw)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise GptTuiError(f"{name.replace('_', ' ')} must be {what}, got {raw!r}", "fix the field") from None

    t = num("temperature", float, _REQUIRED)
    k = num("top_k", int, 0)
    p = num("top_p", float, None)
    n = num("max_new_tokens", int, _REQUIRED)
    seed = num("seed", int, None)
    return SampleSettings(max_new_tokens=n, temperature=t, top_k=k or None, top_p=p, seed=seed,
                          stop_at_eot=stop_at_eot).validate()


def settings_values(s: SampleSettings) -> dict[str, str]:
    """The panel's field texts for ``s``."""
    return {"temperature": f"{s.temperature:g}", "top_k": str(s.top_k or 0), "top_p": "" if s.top_p is None else f"{s.top_p:g}",
            "max_new_tokens": str(s.max_new_tokens), "seed": "" if s.seed is None else str(s.seed)}


class SamplePanel(Screen):
    """Prompt, settings, streamed output with tokens/sec, and a history to recall and save."""

    DEFAULT_CSS = """
    SamplePanel { layout: vertical; }
    SamplePanel #sp-title { height: 1; background: $primary; color: $text; padding: 0 1; text-style: bold; }
    SamplePanel #sp-body { height: 1fr; layers: base overlay; }
    SamplePanel #sp-main { width: 1fr; }
    SamplePanel #sp-prompt { height: 5; }
    SamplePanel .sp-row { height: 1; margin: 0 1; }
    SamplePanel .sp-row Label { height: 1; width: auto; padding: 0 1 0 0; color: $text-muted; }
    SamplePanel .sp-row Input { height: 1; border: none; padding: 0 1; margin: 0 2 0 0; background: $boost; }
    SamplePanel .sp-row Input:focus { background: $accent 40%; }
    SamplePanel #sp-temperature, SamplePanel #sp-top_k, SamplePanel #sp-top_p { width: 9; }
    SamplePanel #sp-max_new_tokens { width: 11; }
    SamplePanel #sp-seed { width: 12; }
    SamplePanel #sp-eot { height: 1; width: auto; border: none; padding: 0; background: transparent; }
    SamplePanel #sp-eot:focus { background: $accent 40%; }
    SamplePanel #sp-status { height: auto; max-height: 3; padding: 0 1; }
    SamplePanel #sp-status.error { color: $error; }
    SamplePanel #sp-output-box { height: 1fr; border: round $primary-darken-2; }
    SamplePanel #sp-output { padding: 0 1; }
    SamplePanel #sp-side { width: 40; border-left: vkey $primary-darken-2; }
    SamplePanel.narrow #sp-side { display: none; width: 40; max-width: 70%; dock: right; layer: overlay;
                                  background: $surface; }
    SamplePanel.narrow.history-open #sp-side { display: block; }
    SamplePanel #sp-side Label { padding: 0 1; text-style: bold; }
    SamplePanel #sp-history { height: 1fr; }
    """

    BINDINGS = [
        Binding("ctrl+c", "stop", "Stop", priority=True, show=False),
        Binding("escape", "escape", "Stop/close", priority=True),
        Binding("escape", "escape_standalone", "Stop", priority=True),  # `gpt-tui sample`: nothing to close
        Binding("ctrl+r", "generate", "Generate", show=False),
        Binding("ctrl+l", "focus_history", "History"),
        Binding("ctrl+s", "save_history", "Save"),
    ]
    app_keys = False
    """The dashboard's own keys (pause, checkpoint ...) leave the footer while the panel is up."""

    POLL_SECONDS = 0.1

    class Finished(Message):
        """A generation ended (done, stopped or failed); ``entry`` is None when it failed."""

        def __init__(self, entry: HistoryEntry | None) -> None:
            super().__init__()
            self.entry = entry

    def __init__(
        self,
        backend: GenerationBackend,
        title: str = "",
        on_result: Callable[[str, str], None] | None = None,
        standalone: bool = False,
        *,
        prompt: str = "",
        settings: SampleSettings | None = None,
        history_path: str | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.panel_title = title
        self.on_result = on_result
        self.standalone = standalone
        self.initial_prompt = prompt
        self.initial_settings = settings or SampleSettings()
        self.history_path = history_path
        self.history: list[HistoryEntry] = []
        self.generating = False
        self._prompt = ""
        self._output = ""
        self._settings = self.initial_settings
        self._tps = 0.0
        self._started = 0.0
        self._note: str | None = None

    # ----------------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield Static(self._title_text(), id="sp-title")
        with Horizontal(id="sp-body"):
            with Vertical(id="sp-main"):
                yield PromptArea(self.initial_prompt, id="sp-prompt", soft_wrap=True, show_line_numbers=False,
                                 tab_behavior="focus")
                values = settings_values(self.initial_settings)
                for row in (0, 1):
                    with Horizontal(classes="sp-row", id=f"sp-settings-{row}"):
                        for key, label, kind, r in SETTING_FIELDS:
                            if r == row:
                                yield Label(label, classes="sp-label")
                                yield Input(values[key], id=f"sp-{key}", type=kind, compact=True,
                                            placeholder=PLACEHOLDERS.get(key, ""))
                        if row == 1:
                            yield Checkbox("stop at end-of-text", self.initial_settings.stop_at_eot, id="sp-eot",
                                           compact=True)
                yield Static("Enter generates · Ctrl+J new line · Ctrl+C/Esc stops", id="sp-status")
                with VerticalScroll(id="sp-output-box"):
                    yield Static("", id="sp-output")
            with Vertical(id="sp-side"):
                yield Label("History (Enter recalls)")
                yield ListView(id="sp-history")
        yield Footer()

    def _title_text(self) -> str:
        parts = ["Sample", self.panel_title or ""]
        template = getattr(self.backend, "template", None)
        if template:
            parts.append(f"{template} prompt template")
        return " · ".join(p for p in parts if p)

    def on_mount(self) -> None:
        self.query_one("#sp-prompt", PromptArea).focus()
        self.set_interval(self.POLL_SECONDS, self._poll)
        self.set_class(self.app.size.width < NARROW, "narrow")

    def on_resize(self, event: events.Resize) -> None:
        self.set_class(event.size.width < NARROW, "narrow")

    def on_unmount(self) -> None:
        if self.generating:
            self.backend.cancel()

    # ------------------------------------------------------------------- settings
    def read_settings(self) -> SampleSettings:
        """The settings in the fields (raises GptTuiError naming a bad one)."""
        if not self.is_mounted:
            return self._settings
        values = {key: self.query_one(f"#sp-{key}", Input).value for key, *_ in SETTING_FIELDS}
        return parse_settings(values, self.query_one("#sp-eot", Checkbox).value)

    def apply_settings(self, s: SampleSettings) -> None:
        """Put ``s`` into the fields."""
        for key, value in settings_values(s).items():
            self.query_one(f"#sp-{key}", Input).value = value
        self.query_one("#sp-eot", Checkbox).value = s.stop_at_eot

    @property
    def output_text(self) -> str:
        """The text of the current (or last) generation."""
        return self._output

    @property
    def prompt_text(self) -> str:
        return self.query_one("#sp-prompt", PromptArea).text if self.is_mounted else self.initial_prompt

    def current_text(self) -> str:
        """Prompt and output of the panel's current (or last) generation, else the prompt box."""
        return self._prompt + self._output if self._prompt or self._output else self.prompt_text

    # --------------------------------------------------------------------- status
    def show_message(self, message: str, error: bool = False) -> None:
        """One line of status (red when ``error``)."""
        status = self.query_one("#sp-status", Static)
        status.update(Text(message))
        status.set_class(error, "error")

    def set_backend(self, backend: GenerationBackend, title: str | None = None) -> None:
        """Generate from another backend from now on (e.g. another checkpoint)."""
        if self.generating:
            self._finish(stopped=True)
        self.backend = backend
        if title is not None:
            self.panel_title = title
        self.query_one("#sp-title", Static).update(self._title_text())

    def _render_output(self) -> None:
        text = Text()
        text.append(self._prompt, style="dim")
        text.append(self._output)
        self.query_one("#sp-output", Static).update(text)
        self.query_one("#sp-output-box", VerticalScroll).scroll_end(animate=False)

    def _speed_text(self) -> str:
        return f"{self._tps:.1f} tokens/s" if self._tps else "… tokens/s"

    # -------------------------------------------------------------------- actions
    def on_prompt_area_submitted(self, _: PromptArea.Submitted) -> None:
        self.action_generate()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_generate()

    def action_generate(self) -> None:
        """Start a generation from the prompt box with the fields' settings."""
        if self.generating:
            self.show_message("a generation is running: Ctrl+C or Esc stops it first", error=True)
            return
        prompt = self.prompt_text
        try:
            settings = self.read_settings()
            self.backend.start(prompt, settings)
        except GptTuiError as e:
            self.show_message(str(e), error=True)
            return
        self.generating = True
        self._prompt, self._output, self._settings, self._tps = prompt, "", settings, 0.0
        self._started = time.perf_counter()
        self._note = getattr(self.backend, "note", None)
        self._render_output()
        self.show_message(self._status("generating"), error=False)

    def _status(self, state: str) -> str:
        msg = f"{state} · {self._speed_text()} · {describe_settings(self._settings)}"
        return f"{msg}\n{self._note}" if self._note else msg

    def _poll(self) -> None:
        if not self.generating:
            return
        new, done, tps = self.backend.poll()
        if tps:
            self._tps = tps
        if new:
            self._output += new
            self._render_output()
        if done:
            error = getattr(self.backend, "error", None)
            if error:
                self.generating = False
                self.show_message(error, error=True)
                self.post_message(self.Finished(None))
                return
            self._finish(stopped=False)
        elif new or tps:
            self.show_message(self._status("generating"))

    def _finish(self, stopped: bool) -> None:
        self.generating = False
        entry = HistoryEntry(self._prompt, self._output, self._settings, self._tps, stopped)
        self.history.append(entry)
        n = len(self.history)
        self.query_one("#sp-history", ListView).append(ListItem(Static(entry.label(n)), name=str(n - 1)))
        self.show_message(self._status("stopped" if stopped else "done"))
        if self.on_result is not None and self._output:
            self.on_result(self._prompt, self._output)
        self.post_message(self.Finished(entry))

    def action_stop(self) -> None:
        """Stop the running generation at once (the text so far is kept)."""
        if not self.generating:
            self.show_message("nothing is running" + (" · Ctrl+Q quits" if self.standalone else " · Esc closes"))
            return
        self.backend.cancel()
        self._finish(stopped=True)

    def action_escape(self) -> None:
        if self.generating:
            self.action_stop()
        elif self.has_class("narrow") and self.has_class("history-open"):
            self.action_focus_history()  # closes the history over a narrow panel
        elif not self.standalone:
            self.dismiss()
        else:
            self.show_message("nothing is running · Ctrl+Q quits")

    def action_focus_history(self) -> None:
        """Ctrl+L: to the history (on a narrow screen it opens beside the output; Ctrl+L again closes it)."""
        if self.has_class("narrow"):
            if self.has_class("history-open"):
                self.remove_class("history-open")
                self.query_one("#sp-prompt", PromptArea).focus()
                return
            self.add_class("history-open")
        history = self.query_one("#sp-history", ListView)
        if history.index is None and self.history:
            history.index = len(self.history) - 1  # Enter recalls the newest at once
        history.focus()

    def action_escape_standalone(self) -> None:
        self.action_escape()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Esc's word in the footer: Stop/close inside the dashboard, Stop in ``gpt-tui sample``."""
        if action in ("escape", "escape_standalone"):
            return (action == "escape_standalone") == self.standalone
        return True

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        if event.item is None or event.item.name is None:
            return
        self.recall(int(event.item.name))

    def recall(self, index: int) -> None:
        """Load history entry ``index`` (prompt, settings, output) to re-run or change it."""
        if self.generating:
            self.show_message("a generation is running: Ctrl+C or Esc stops it first", error=True)
            return
        e = self.history[index]
        area = self.query_one("#sp-prompt", PromptArea)
        area.text = e.prompt
        area.move_cursor(area.document.end)
        self.apply_settings(e.settings)
        self.remove_class("history-open")
        self._prompt, self._output, self._settings, self._tps, self._note = e.prompt, e.output, e.settings, e.tokens_per_sec, None
        self._render_output()
        self.show_message(f"recalled #{index + 1}: change the settings and press Enter to run it again")
        area.focus()

    def action_save_history(self) -> None:
        """Write the whole history to a Markdown file (the same file on every save)."""
        if not self.history:
            self.show_message("the history is empty: generate something first", error=True)
            return
        if self.history_path is None:
            self.history_path = os.path.abspath(time.strftime("samples-%Y%m%d-%H%M%S.md"))
        try:
            parent = os.path.dirname(os.path.abspath(self.history_path))
            os.makedirs(parent, exist_ok=True)
            tmp = self.history_path + ".part"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(history_markdown(self.history, self.panel_title))
            os.replace(tmp, self.history_path)
        except OSError as e:
            self.show_message(f"could not write {self.history_path} ({e.strerror or e}): check the folder", error=True)
            return
        self.show_message(f"saved {len(self.history)} sample(s) to {self.history_path}")

