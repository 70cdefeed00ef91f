"""The sampling panel driven through Textual's Pilot, on real tiny checkpoints and a live run."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from textual.app import App
from textual.widgets import DataTable, Input, ListView, Static

from engine import checkpoint as ck
from engine.inference import load_for_inference
from engine.model import GPT, ModelConfig
from engine.recorder import Recorder
from engine.sampling import SampleSettings
from engine.trainer import EngineOptions, Trainer
from tests.conftest import SMALL_TEXT, run_cli, tiny_config
from tui.cmd_sample import SampleApp
from tui.sample_panel import LiveBackend, ModelBackend, SamplePanel, parse_settings

GREEDY_FIELDS = {"temperature": "0", "top_k": "0", "top_p": "", "max_new_tokens": "30", "seed": ""}


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished char-level run: checkpoints at steps 5 and 10, samples recorded at 5 and 10."""
    root = tmp_path_factory.mktemp("sample-run")
    old = os.environ.get("GPT_TUI_CACHE")
    os.environ["GPT_TUI_CACHE"] = str(root / "cache")
    try:
        data = root / "corpus.txt"
        data.write_text(SMALL_TEXT, encoding="utf-8")
        cfg = tiny_config(data, root / "run", max_steps=10, checkpoint_every=5, sample_every="5", prompt="It")
        t = Trainer(cfg)
        t.setup()
        assert t.fit() == "finished"
    finally:
        if old is None:
            os.environ.pop("GPT_TUI_CACHE", None)
        else:
            os.environ["GPT_TUI_CACHE"] = old
    return root / "run"


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model with the GPT-2 tokenizer and the alpaca template (as finetuning saves)."""
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=50257, context_length=48, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    model = GPT(mcfg)
    path = tmp_path_factory.mktemp("gpt2-ckpt") / "checkpoints" / "step-00000000.pt"
    c = ck.Checkpoint(model=model.state_dict(), model_config=mcfg.to_dict(), tokenizer={"type": "gpt2"},
                      train_config={}, extra={"template": "alpaca"})
    ck.save_checkpoint(str(path), c, ck.CheckpointMeta(step=0))
    return path


class PanelApp(App):
    """A bare app showing one panel."""

    def __init__(self, panel: SamplePanel) -> None:
        super().__init__()
        self.panel = panel

    def on_mount(self) -> None:
        self.push_screen(self.panel)


async def wait_until(pilot, cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await pilot.pause(0.05)


def status(screen, sel: str = "#sp-status") -> str:
    return str(screen.query_one(sel, Static).render())


async def set_field(pilot, panel: SamplePanel, name: str, value: str) -> None:
    """Type into a settings field the way a user does: focus it, clear it, type."""
    field = panel.query_one(f"#sp-{name}", Input)
    field.focus()
    await pilot.press("ctrl+a", "ctrl+k", *list(value))
    assert field.value == value


async def type_prompt(pilot, panel: SamplePanel, text: str) -> None:
    area = panel.query_one("#sp-prompt")
    area.focus()
    area.text = ""
    await pilot.press(*list(text))


# ------------------------------------------------------------------------ the panel
async def test_type_generate_change_settings_and_recall(tiny_run: Path, tmp_path: Path) -> None:
    lm = load_for_inference(str(tiny_run), "cpu")
    results: list[tuple[str, str]] = []
    panel = SamplePanel(ModelBackend(lm), title="tiny", on_result=lambda p, o: results.append((p, o)),
                        standalone=True, settings=SampleSettings(max_new_tokens=20, temperature=0.8, seed=3))
    async with PanelApp(panel).run_test(size=(120, 40)) as pilot:
        await type_prompt(pilot, panel, "It had")
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(panel.history) == 1, what="the first generation")
        assert len(panel.history) == 1 and panel.history[0].prompt == "It had"
        first = panel.history[0].output
        assert len(first) == 20  # char model: 20 tokens, 20 characters
        assert results == [("It had", first)]
        assert "done" in status(panel) and "tokens/s" in status(panel)
        assert panel._tps > 0
        assert first in str(panel.query_one("#sp-output", Static).render())

        # change the settings from the keyboard: greedy, 30 tokens
        for name in ("temperature", "top_k", "max_new_tokens"):
            await set_field(pilot, panel, name, GREEDY_FIELDS[name])
        await pilot.press("enter")  # Enter in a field generates too
        await wait_until(pilot, lambda: len(panel.history) == 2, what="the greedy generation")
        greedy = panel.history[1]
        assert greedy.settings.temperature == 0 and greedy.settings.max_new_tokens == 30
        assert greedy.output == lm.generate("It had", SampleSettings(max_new_tokens=30, temperature=0.0))

        # recall the first entry: its prompt, settings and output come back
        await pilot.press("ctrl+l")
        history = panel.query_one("#sp-history", ListView)
        assert history.has_focus
        history.index = 0
        await pilot.press("enter")
        await pilot.pause()
        assert panel.query_one("#sp-temperature", Input).value == "0.8"
        assert panel.query_one("#sp-max_new_tokens", Input).value == "20"
        assert panel.query_one("#sp-seed", Input).value == "3"
        assert panel.prompt_text == "It had"
        assert first in str(panel.query_one("#sp-output", Static).render())
        # re-run it with the same seed: the same text; then with another seed
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(panel.history) == 3)
        assert panel.history[2].output == first
        await set_field(pilot, panel, "seed", "4")
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(panel.history) == 4)
        assert panel.history[3].output != first

        # save the history
        panel.history_path = str(tmp_path / "out" / "history.md")
        await pilot.press("ctrl+s")
        saved = Path(panel.history_path).read_text(encoding="utf-8")
        assert saved.count("## ") == 4 and first in saved and greedy.output in saved
        assert "T=0 k=all p=off n=30" in saved
        assert "saved 4 sample(s)" in status(panel)


@pytest.mark.parametrize("key", ["ctrl+c", "escape"])
async def test_stop_at_once(tiny_run: Path, key: str) -> None:
    lm = load_for_inference(str(tiny_run), "cpu")
    backend = ModelBackend(lm)
    panel = SamplePanel(backend, standalone=True, settings=SampleSettings(max_new_tokens=100_000, temperature=1.0))
    async with PanelApp(panel).run_test() as pilot:
        await type_prompt(pilot, panel, "It")
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(panel._output) > 0, what="the first tokens")
        await pilot.press(key)
        assert not panel.generating  # at once, without waiting for the thread
        entry = panel.history[-1]
        assert entry.stopped and 0 < len(entry.output) < 100_000
        assert "stopped" in status(panel)
        backend.wait(5.0)
        assert not backend._thread.is_alive()  # the worker ended between two tokens
        # Esc/Ctrl+C with nothing running does not close a standalone panel
        await pilot.press(key)
        assert app_screen_is(pilot, panel)


def app_screen_is(pilot, screen) -> bool:
    return pilot.app.screen is screen


async def test_escape_closes_the_panel_inside_another_app(tiny_run: Path) -> None:
    lm = load_for_inference(str(tiny_run), "cpu")
    panel = SamplePanel(ModelBackend(lm), standalone=False)
    async with PanelApp(panel).run_test() as pilot:
        assert pilot.app.screen is panel
        await pilot.press("escape")
        await pilot.pause()
        assert pilot.app.screen is not panel


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_escape_closes_the_panel_after_going_to_the_history(tiny_run: Path, size: tuple[int, int]) -> None:
    """Narrow: the first Esc closes the history opened over the output, the second the panel; wide (the
    history always beside the output): Esc closes the panel at once."""
    lm = load_for_inference(str(tiny_run), "cpu")
    panel = SamplePanel(ModelBackend(lm), standalone=False)
    async with PanelApp(panel).run_test(size=size) as pilot:
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert panel.query_one("#sp-history").has_focus
        if size[0] < 100:
            await pilot.press("escape")
            await pilot.pause()
            assert pilot.app.screen is panel and not panel.query_one("#sp-side").region.area
        await pilot.press("escape")
        await pilot.pause()
        assert pilot.app.screen is not panel


async def test_bad_input_is_shown_in_the_panel(tiny_run: Path) -> None:
    lm = load_for_inference(str(tiny_run), "cpu")
    panel = SamplePanel(ModelBackend(lm), standalone=True, settings=SampleSettings(max_new_tokens=5))
    ctx = lm.model.cfg.context_length
    async with PanelApp(panel).run_test(size=(120, 40)) as pilot:
        await type_prompt(pilot, panel, "")
        await pilot.press("enter")
        assert not panel.generating and "the prompt is empty" in status(panel)

        await type_prompt(pilot, panel, "It")
        panel.query_one("#sp-prompt").insert("你§")
        await pilot.press("enter")
        assert not panel.generating
        assert "'你'" in status(panel) and "'§'" in status(panel) and "vocabulary" in status(panel)

        panel.query_one("#sp-prompt").text = "It had " * 10  # 70 characters, context 32
        await pilot.press("enter")
        await wait_until(pilot, lambda: not panel.generating)
        assert f"using its last {ctx - 1} tokens" in status(panel)
        assert len(panel.history[-1].output) == 5

        await set_field(pilot, panel, "top_p", "1.5")
        panel.query_one("#sp-prompt").focus()
        await pilot.press("enter")
        assert "top-p must be in (0, 1]" in status(panel) and len(panel.history) == 1
        assert pilot.app.is_running


def test_parse_settings_names_the_bad_field() -> None:
    ok = parse_settings({"temperature": "0.5", "top_k": "0", "top_p": "", "max_new_tokens": "7", "seed": "1"}, False)
    assert ok == SampleSettings(max_new_tokens=7, temperature=0.5, top_k=None, top_p=None, seed=1, stop_at_eot=False)
    bad = {"temperature": "-1", "top_k": "5", "top_p": "", "max_new_tokens": "0", "seed": ""}
    with pytest.raises(Exception, match="temperature must not be negative"):
        parse_settings(bad, True)
    with pytest.raises(Exception, match="max new tokens must be positive"):
        parse_settings(dict(bad, temperature="1"), True)
    with pytest.raises(Exception, match="max new tokens is empty"):
        parse_settings(dict(bad, temperature="1", max_new_tokens=""), True)


# --------------------------------------------------------------- the live backend
async def test_live_backend_generates_from_a_training_run(tmp_path: Path, corpus: Path) -> None:
    recorder = Recorder()
    trainer = Trainer(tiny_config(corpus, tmp_path / "run", max_steps=4), recorder, options=EngineOptions.interactive())
    trainer.setup()
    thread = threading.Thread(target=trainer.fit, daemon=True)
    thread.start()
    try:
        got: list[tuple[str, str]] = []
        panel = SamplePanel(LiveBackend(trainer, recorder), title="live", on_result=lambda p, o: got.append((p, o)),
                            settings=SampleSettings(max_new_tokens=12, temperature=0.0))
        async with PanelApp(panel).run_test() as pilot:
            await type_prompt(pilot, panel, "It had")
            await pilot.press("enter")
            await wait_until(pilot, lambda: not panel.generating, what="the live generation")
            assert len(panel.history[-1].output) == 12
            assert got == [("It had", panel.history[-1].output)]
            # a char the corpus never had is named by the engine, and nothing is generated
            await type_prompt(pilot, panel, "Q")
            panel.query_one("#sp-prompt").insert("€")
            entries = len(panel.history)
            await pilot.press("enter")
            await wait_until(pilot, lambda: not panel.generating, what="the refusal")
            assert "'€'" in status(panel) and len(panel.history) == entries
            # a long one is stopped by the user
            await set_field(pilot, panel, "max_new_tokens", "100000")
            await type_prompt(pilot, panel, "It")
            await pilot.press("enter")
            assert panel.generating
            await wait_until(pilot, lambda: len(panel.output_text) > 0)
            await pilot.press("ctrl+c")
            assert panel.history[-1].stopped and not panel.generating
            # the next one starts once the engine has ended the stopped one, and gets only its own text
            await set_field(pilot, panel, "max_new_tokens", "7")
            await type_prompt(pilot, panel, "It")

            async def started() -> bool:
                await pilot.press("enter")
                return panel.generating or "has not ended yet" not in status(panel)

            t0 = time.monotonic()
            while not await started():
                assert time.monotonic() - t0 < 30
            await wait_until(pilot, lambda: not panel.generating)
            assert len(panel.history[-1].output) == 7 and not panel.history[-1].stopped
    finally:
        trainer.stop()
        thread.join(30)
    assert not thread.is_alive()


# ----------------------------------------------------- gpt-tui sample as an App
async def test_open_a_missing_or_foreign_checkpoint_shows_the_message(tiny_run: Path, tmp_path: Path) -> None:
    lm = load_for_inference(str(tiny_run), "cpu")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    app = SampleApp(lm, str(tiny_run), history_path=str(tmp_path / "h.md"))
    async with app.run_test(size=(120, 40)) as pilot:
        for path, expected in ((tmp_path / "missing", "does not exist"), (foreign, str(foreign))):
            await pilot.press("ctrl+o")
            await pilot.pause()
            field = app.screen.query_one("#open-path", Input)
            field.value = str(path)
            await pilot.press("enter")
            await wait_until(pilot, lambda: "error" in app.panel.query_one("#sp-status").classes)
            assert expected in status(app.panel)
            assert app.is_running and app.screen is app.panel
            app.panel.show_message("")
        # a good one switches the model
        await pilot.press("ctrl+o")
        await pilot.pause()
        app.screen.query_one("#open-path", Input).value = str(ck.list_checkpoints(str(tiny_run))[0][1])
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.lm.step == 5)
        assert "step 5" in str(app.panel.query_one("#sp-title", Static).render())


async def test_timeline_in_step_order_and_refresh_while_training(tiny_run: Path) -> None:
    lm = load_for_inference(str(tiny_run), "cpu")
    app = SampleApp(lm, str(tiny_run), view="timeline")
    async with app.run_test(size=(120, 50)) as pilot:
        tl = app.timeline
        await wait_until(pilot, lambda: sum(k[0] == "checkpoint" for k in tl.entries) == 2 and not tl.busy,
                         what="checkpoint samples")
        entries = sorted(tl.entries.values(), key=lambda e: (e.step, e.kind == "checkpoint"))
        assert [(e.step, e.kind) for e in entries] == [(5, "recorded"), (5, "checkpoint"),
                                                        (10, "recorded"), (10, "checkpoint")]
        assert all(e.val_loss is not None and not e.error for e in entries)
        assert all(e.prompt == "It" and e.text for e in entries)
        # drawn in that order
        shown = [str(w.render()) for w in tl.query(".tl-entry")]
        assert [s.split(" ·")[0] for s in shown] == ["step 5", "step 5", "step 10", "step 10"]
        assert "val loss" in shown[0] and "recorded during training" in shown[0]

        # the run goes on: a new checkpoint and a new recorded sample appear
        obj = ck.load_checkpoint(str(tiny_run))
        obj.step = 15
        ck.save_checkpoint(ck.checkpoint_name(str(tiny_run), 15), obj, ck.CheckpointMeta(step=15, val_loss=1.5))
        with open(tiny_run / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write('{"type": "sample", "step": 15, "epoch": 1, "text": "later", "prompt": "It"}\n{"type": "sa')
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: len(tl.entries) == 6 and not tl.busy, what="the refresh")
        new = [e for e in tl.entries.values() if e.step == 15]
        assert {e.kind for e in new} == {"recorded", "checkpoint"}
        assert next(e for e in new if e.kind == "checkpoint").val_loss == 1.5

        # another prompt samples every checkpoint again
        prompt = tl.query_one("#tl-prompt", Input)
        prompt.value = "had"
        prompt.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: sum(k[0] == "checkpoint" for k in tl.entries) == 3 and not tl.busy)
        assert all(e.prompt == "had" for e in tl.entries.values() if e.kind == "checkpoint")


async def test_token_view_bytes_candidates_and_masked_batch(gpt2_checkpoint: Path) -> None:
    lm = load_for_inference(str(gpt2_checkpoint), "cpu")
    app = SampleApp(lm, str(gpt2_checkpoint), prompt="你好 world")
    async with app.run_test(size=(140, 50)) as pilot:
        assert "alpaca prompt template" in str(app.panel.query_one("#sp-title", Static).render())
        await set_field(pilot, app.panel, "temperature", "0")
        await pilot.press("f3")
        await pilot.pause()
        tokens = app.tokens
        assert app.screen is tokens
        await wait_until(pilot, lambda: len(tokens.candidates) == 10, what="next-token candidates")
        table = tokens.query_one("#tk-tokens", DataTable)
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        assert [r[1] for r in rows] == [str(i) for i in lm.tokenizer.encode("你好 world")]
        assert rows[0][2] == repr("<0xE4><0xBD>") and rows[0][3] == "你"
        assert rows[-1][2] == repr(" world") and rows[-1][3] == ""
        assert "hold part of a character" in status(tokens, "#tk-status")
        # temperature 0: the argmax gets it all, the rest is cut
        assert tokens.candidates[0].prob == 1.0 and all(c.prob == 0 for c in tokens.candidates[1:])
        assert tokens.candidates[0].raw_prob >= tokens.candidates[1].raw_prob
        # after another token: other candidates
        before = [c.id for c in tokens.candidates]
        table.focus()
        table.move_cursor(row=1)
        await wait_until(pilot, lambda: tokens.position == 1 and [c.id for c in tokens.candidates] != before)

        # an instruction batch: the prompt's targets are masked
        await pilot.press("ctrl+b")
        await pilot.pause()
        masked = tokens.query_one("#tk-masked", DataTable)
        assert masked.row_count > 10
        targets = [str(masked.get_row_at(i)[2]) for i in range(masked.row_count)]
        assert targets[0] == "-100 masked" and any(t != "-100 masked" for t in targets)
        assert "targets masked (-100)" in status(tokens, "#tk-status")


# ------------------------------------------------------------------------- the CLI
def test_cli_sample_bad_sources_one_line(tmp_path: Path) -> None:
    r = run_cli("sample", str(tmp_path / "nope"))
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    r = run_cli("sample", str(run))
    assert r.returncode != 0 and "no complete checkpoint yet" in r.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    r = run_cli("sample", str(junk))
    assert r.returncode != 0 and str(junk) in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_sample_needs_a_terminal(tiny_run: Path) -> None:
    r = run_cli("sample", str(tiny_run), input="")  # stdin and stderr are pipes here
    assert r.returncode != 0 and "needs a terminal" in r.stderr and "gpt-tui generate" in r.stderr
    r = run_cli("sample", str(tiny_run), "--view", "nope")
    assert r.returncode != 0 and "unknown view 'nope'" in r.stderr


# ------------------------------------------------------------------------ fitting the screen
def assert_every_setting_fits(screen, size: tuple[int, int]) -> None:
    """Each settings field lies inside the screen and is wide enough for its value (or placeholder)."""
    width, height = size
    for key in ("temperature", "top_k", "top_p", "max_new_tokens", "seed"):
        field = screen.query_one(f"#sp-{key}", Input)
        r = field.region
        assert r.area and r.x >= 0 and r.right <= width and r.bottom <= height - 1, (key, r, size)
        shown = field.value or field.placeholder
        assert field.content_region.width >= len(shown) + 1, (key, field.content_region, shown, size)
    eot = screen.query_one("#sp-eot")
    assert eot.region.area and eot.region.right <= width and eot.region.bottom <= height - 1, (eot.region, size)
    for label in screen.query(".sp-label"):
        assert label.region.width >= len(str(label.render())), (str(label.render()), label.region, size)
    assert screen.query_one("#sp-output-box").region.width >= (60 if width < 100 else 70), size


def footer_words(app: App) -> dict[str, str]:
    return {k: b.binding.description for k, b in app.screen.active_bindings.items() if b.binding.show and b.enabled}


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_standalone_panel_fits_and_says_how_to_quit(tiny_run: Path, size: tuple[int, int]) -> None:
    lm = load_for_inference(str(tiny_run), "cpu")
    app = SampleApp(lm, str(tiny_run))
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        panel = app.panel
        assert_every_setting_fits(panel, size)
        assert panel.query_one("#sp-seed", Input).placeholder == "random"  # an empty seed says what it means
        words = footer_words(app)
        assert words.get("ctrl+q") == "Quit" and words.get("escape") == "Stop"
        assert {"f2", "f3"} <= set(words) and "f1" not in words  # the view shown has no key to go to it
        side = panel.query_one("#sp-side")
        assert bool(side.region.area) == (size[0] >= 100), "the history pane beside the output only when wide"
        await pilot.press("escape")  # idle: says how to quit
        assert "Ctrl+Q quits" in status(panel)
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: not app.is_running, what="quit")
    assert app.return_code == 0


async def test_narrow_panel_opens_the_history_over_the_output(tiny_run: Path) -> None:
    lm = load_for_inference(str(tiny_run), "cpu")
    panel = SamplePanel(ModelBackend(lm), standalone=True, settings=SampleSettings(max_new_tokens=5, seed=1))
    async with PanelApp(panel).run_test(size=(80, 24)) as pilot:
        await type_prompt(pilot, panel, "It")
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(panel.history) == 1, what="a generation")
        assert not panel.query_one("#sp-side").region.area
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert panel.query_one("#sp-side").region.area and panel.query_one("#sp-history").has_focus
        await pilot.press("enter")  # recalls the newest entry and closes the history
        await pilot.pause()
        assert not panel.query_one("#sp-side").region.area and "recalled #1" in status(panel)
        assert_every_setting_fits(panel, (80, 24))


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_dashboard_generate_panel_fits_and_shows_only_its_keys(corpus: Path, tmp_path: Path,
                                                                      size: tuple[int, int]) -> None:
    from tui.app import DashboardApp
    from tui.launch import EngineThread

    rec = Recorder()
    trainer = Trainer(tiny_config(corpus, tmp_path / "run", max_steps=100_000, eval_every=0), rec,
                      options=EngineOptions.interactive())
    engine = EngineThread(trainer, rec)
    app = DashboardApp(trainer, rec, run_dir=str(tmp_path / "run"), engine=engine)
    try:
        async with app.run_test(size=size) as pilot:
            engine.start()
            await wait_until(pilot, lambda: trainer.step > 1, what="first steps")
            await pilot.press("g")
            assert isinstance(app.screen, SamplePanel)
            await pilot.pause()
            assert_every_setting_fits(app.screen, size)
            words = footer_words(app)
            assert words.get("escape") == "Stop/close"
            assert not {"f1", "f2", "f3", "ctrl+o", "p", "c", "e", "g"} & set(words), words
            await pilot.press("p")  # typed into the prompt, not a pause
            assert not trainer.paused and app.screen.prompt_text == "p"
            await pilot.press("escape")
            assert not isinstance(app.screen, SamplePanel)
    finally:
        trainer.stop(save=False)
        engine.join(30)
