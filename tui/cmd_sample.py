"""``gpt-tui sample RUN_OR_CHECKPOINT``: the sampling panel on its own, with the timeline and token views.

F1 the panel (generate, stop, history), F2 the timeline (the same prompt from every
checkpoint of the run, and the samples training recorded, by step), F3 the tokens (how a
text splits, what could come next, and an instruction batch's masked targets), Ctrl+O
opens another checkpoint, Ctrl+Q quits.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import typer
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label
from textual.worker import Worker, WorkerState

from .common import fail, friendly_errors, has_terminal

VIEWS = ("sample", "timeline", "tokens")


def open_checkpoint(source: str, device: str = "auto") -> Any:
    """Load a run's newest checkpoint (or a checkpoint file) for sampling; GptTuiError when it cannot."""
    from engine import checkpoint as ck
    from engine.errors import CheckpointError
    from engine.inference import load_for_inference

    if os.path.isdir(source) and not ck.list_checkpoints(source) and os.path.exists(os.path.join(source, "config.json")):
        raise CheckpointError(f"run {source} has no complete checkpoint yet",
                              "wait for its first checkpoint (press c in its dashboard to save one now)")
    return load_for_inference(source, device)


def generate(
    source: str = typer.Argument(..., help="Run directory or checkpoint file."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue ('-' reads stdin)."),
    max_new_tokens: int = typer.Option(100, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 is greedy."),
    top_k: int = typer.Option(50, "--top-k", help="Keep the k most likely tokens (0: all)."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass (e.g. 0.9)."),
    seed: int = typer.Option(None, "--seed", help="Same seed, same output."),
    no_kv_cache: bool = typer.Option(False, "--no-kv-cache", help="Recompute the whole context each token."),
    no_stop: bool = typer.Option(False, "--no-stop", help="Do not stop at end-of-text."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply an instruction template."),
    no_echo: bool = typer.Option(False, "--no-echo", help="Write only the continuation, not the prompt before it."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, mps."),
) -> None:
    """Generate text from a checkpoint: the prompt, then its continuation (only text goes to stdout).

    Instruction-tuned checkpoints print only the response (the prompt goes through their template);
    --no-echo prints only the continuation for any checkpoint.
    """
    from engine.inference import load_for_inference
    from engine.sampling import SampleSettings

    if prompt == "-":
        prompt = sys.stdin.read()
    settings = SampleSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None,
                              top_p=top_p, seed=seed, stop_at_eot=not no_stop, use_cache=not no_kv_cache).validate()
    lm = load_for_inference(source, device)
    text_prompt = prompt if raw else lm.format_prompt(prompt)
    truncated = lm.truncation_note(text_prompt)
    if truncated:
        print(f"gpt-tui: {truncated}", file=sys.stderr)
    echo = not no_echo and text_prompt == prompt
    try:
        if echo:
            sys.stdout.write(prompt)
        for piece in lm.stream(text_prompt, settings):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except BrokenPipeError:
        return
    sys.stdout.write("\n")


class OpenScreen(ModalScreen[str | None]):
    """Ask for a run directory or checkpoint file."""

    DEFAULT_CSS = """
    OpenScreen { align: center middle; }
    OpenScreen > Vertical { width: 80%; height: auto; border: round $primary; padding: 0 1; background: $surface; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Open a run directory or checkpoint file (Enter opens, Esc cancels)")
            yield Input(id="open-path", placeholder="runs/NAME or runs/NAME/checkpoints/step-00000100.pt")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class SampleApp(App):
    """The sampling panel, timeline and token view over one checkpoint."""

    TITLE = "gpt-tui sample"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("f1", "view('sample')", "Sample", priority=True),
        Binding("f2", "view('timeline')", "Timeline", priority=True),
        Binding("f3", "view('tokens')", "Tokens", priority=True),
        Binding("ctrl+o", "open", "Open", priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("ctrl+b", "instruction_batch", "Masked batch", show=False),
    ]

    def __init__(self, lm: Any, source: str, prompt: str = "", view: str = "sample",
                 history_path: str | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.source = source
        self.initial_prompt = prompt
        self.initial_view = view
        self.history_path = history_path

    # ------------------------------------------------------------------ screens
    def on_mount(self) -> None:
        from engine.runs import RunDir, run_dir_of

        from .sample_panel import ModelBackend, SamplePanel
        from .sample_views import TokenScreen

        self.run_dir = run_dir_of(self.source)
        self.run_cfg = RunDir(self.run_dir).train_settings() if self.run_dir else {}
        history = self.history_path or os.path.join(self.run_dir or os.getcwd(),
                                                    time.strftime("samples-%Y%m%d-%H%M%S.md"))
        self.panel = SamplePanel(ModelBackend(self.lm), title=self._title(), standalone=True,
                                 prompt=self.initial_prompt, history_path=history)
        self.install_screen(self.panel, "sample")
        self.tokens = TokenScreen(lambda: self.lm, self.panel.read_settings, self.panel.current_text)
        self.install_screen(self.tokens, "tokens")
        self._install_timeline()
        self.push_screen("sample")
        if self.initial_view != "sample":
            self.switch_screen(self.initial_view)

    def _title(self) -> str:
        return f"{self.lm.path} (step {self.lm.step})"

    def _install_timeline(self) -> None:
        from engine.inspect_tokens import recorded_samples

        from .sample_views import TimelineScreen

        # what training sampled from (it replaces a prompt outside a char vocabulary)
        recorded = recorded_samples(self.run_dir) if self.run_dir else []
        prompt = self.initial_prompt or (recorded[-1].prompt if recorded else "") or str(self.run_cfg.get("prompt") or "\n")
        self.timeline = TimelineScreen(self.run_dir, self.panel.read_settings, prompt=prompt,
                                       device=str(self.lm.device))
        self.install_screen(self.timeline, "timeline")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The footer leaves out the key of the view already shown."""
        if action == "view" and parameters and self.is_running and self.screen.is_attached:
            try:
                return self.screen is not self.get_screen(str(parameters[0]))
            except KeyError:
                return True
        return True

    async def action_view(self, name: str) -> None:
        if self.screen is not self.get_screen(name) and not isinstance(self.screen, ModalScreen):
            await self.switch_screen(name)

    async def action_quit(self) -> None:
        """Stop any generation and exit with status 0."""
        backend = self.panel.backend
        backend.cancel()
        if hasattr(backend, "wait"):
            backend.wait(2.0)
        self.timeline.action_stop()
        self.exit(0)

    # -------------------------------------------------------------------- open
    def action_open(self) -> None:
        if isinstance(self.screen, ModalScreen):
            return
        self.push_screen(OpenScreen(), self._open)

    def _open(self, path: str | None) -> None:
        if path:
            self.panel.show_message(f"opening {path} …")
            self.run_worker(lambda: open_checkpoint(path, str(self.lm.device)), thread=True, exclusive=True,
                            group="open", name=path, exit_on_error=False)

    async def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        from engine.errors import GptTuiError

        from .sample_panel import ModelBackend

        worker = event.worker
        if worker.group != "open":
            return
        if event.state == WorkerState.ERROR:
            err = worker.error
            msg = str(err) if isinstance(err, GptTuiError) else f"could not open {worker.name}: {err}"
            self.panel.show_message(msg, error=True)
            self.notify(msg, severity="error")
        elif event.state == WorkerState.SUCCESS:
            self.lm = worker.result
            self.source = worker.name or self.source
            self.panel.set_backend(ModelBackend(self.lm), title=self._title())
            self.panel.show_message(f"opened {self.lm.path}")
            from engine.runs import RunDir, run_dir_of

            if run_dir_of(self.source) != self.run_dir:
                self.run_dir = run_dir_of(self.source)
                self.run_cfg = RunDir(self.run_dir).train_settings() if self.run_dir else {}
                self.timeline.action_stop()
                if self.screen is self.timeline:
                    await self.switch_screen("sample")
                self.uninstall_screen("timeline")
                self._install_timeline()

    # ------------------------------------------------------ instruction batch
    async def action_instruction_batch(self) -> None:
        """Token view of an instruction-finetuning batch: which targets are masked (-100)."""
        from engine.errors import GptTuiError
        from engine.inspect_tokens import instruction_batch

        records = [{"instruction": self.panel.prompt_text or "Say something.", "input": "",
                    "output": self.panel.output_text or "..."}]
        records += self._run_records()
        try:
            rows = instruction_batch(self.lm.tokenizer, records, bool(self.run_cfg.get("mask_prompt", True)))
        except GptTuiError as e:
            self.panel.show_message(str(e), error=True)
            self.notify(str(e), severity="error")
            return
        await self.action_view("tokens")
        flat = [p for row in rows for p in row]
        self.tokens.show_masked(flat, f"instruction batch of {len(rows)} row(s) (yours first)")

    def _run_records(self) -> list[dict[str, str]]:
        """The first two records of the run's instruction data, when it was finetuned on some."""
        data = self.run_cfg.get("data") or []
        path = data[0] if isinstance(data, list) and data else None
        if not path or not str(path).endswith((".json", ".jsonl")):
            return []
        try:
            from engine.instruct import load_records

            return load_records(str(path))[:2]
        except Exception:  # noqa: BLE001 - the batch is shown without them
            return []


def register(app: typer.Typer) -> None:
    """Add ``gpt-tui sample`` and ``gpt-tui generate`` to ``app``."""
    app.command()(friendly_errors(generate))

    @app.command()
    @friendly_errors
    def sample(
        source: str = typer.Argument(..., help="Run directory (its newest checkpoint) or checkpoint file."),
        prompt: str = typer.Option("", "--prompt", "-p", help="Prompt to start with."),
        view: str = typer.Option("sample", "--view", help="Open on: sample, timeline or tokens."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, mps."),
        history: str = typer.Option(None, "--history", help="File Ctrl+S saves the history to "
                                    "(default: samples-TIME.md in the run directory)."),
    ) -> None:
        """Sample interactively: stream text, compare checkpoints (timeline), look at tokens."""
        if view not in VIEWS:
            fail(f"unknown view {view!r}: choose one of {', '.join(VIEWS)}")
        lm = open_checkpoint(source, device)
        if not has_terminal():
            fail("gpt-tui sample is interactive and needs a terminal: use `gpt-tui generate` in scripts")
        app_ = SampleApp(lm, source, prompt=prompt, view=view, history_path=history)
        app_.run()
        raise typer.Exit(app_.return_code or 0)
