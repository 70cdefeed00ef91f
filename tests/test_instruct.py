"""Instruction finetuning: Alpaca records, the template, the split, collate masks, the trainer with InstructTask, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import TrainConfig
from engine.errors import DataError
from engine.inference import load_for_inference
from engine.instruct import collate, encode_records, load_records, split_records
from engine.prompts import alpaca_prompt, format_prompt
from engine.recorder import Recorder
from engine.tokenizer import GPT2Tokenizer
from engine.trainer import EngineOptions

from .conftest import run_cli, shared
from .gpt2_fixtures import finetune_trainer, tiny_gpt2_checkpoint

P = 50256


def make_records(n: int = 40) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"instruction": "Rewrite the word in capitals.", "input": f"word{i}", "output": f"WORD{i}"})
        else:
            out.append({"instruction": f"What is {i} plus one?", "input": "", "output": f"{i} plus one is {i + 1}."})
    return out


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def finetune_config(tmp_path: Path, init: Path, data: Path, **kw) -> TrainConfig:
    base = dict(data=[str(data)], init=str(init), tokenizer="gpt2", max_steps=4, batch_size=2, eval_every=2,
                eval_batches=2, sample_every="2", sample_tokens=4, lr=1e-3, dropout=0.0, device="cpu", dtype="fp32",
                threads=1, out=str(tmp_path / "run"), warmup_steps=0)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------- records
def book_format_input(entry: dict) -> str:
    """LLMs-from-scratch ch07 ``format_input``, verbatim in behaviour."""
    instruction_text = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def test_book_file_loads_and_splits_85_10_5() -> None:
    records = load_records(str(shared("instruction-data.json")))
    assert len(records) == 1100
    train, test, val = split_records(records)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train[0] == records[0] and test[0] == records[935] and val[-1] == records[-1]


def test_alpaca_52k_style_and_jsonl_load(tmp_path: Path) -> None:
    # alpaca_data.json: a JSON list of objects with instruction / input / output (input often "")
    p = tmp_path / "alpaca_data.json"
    p.write_text(json.dumps([{"instruction": "Give three tips for staying healthy.", "input": "",
                              "output": "1. Eat a balanced diet.\n2. Exercise.\n3. Sleep."},
                             {"instruction": "Translate.", "input": "Hallo", "output": "Hello"}]))
    assert load_records(str(p))[1] == {"instruction": "Translate.", "input": "Hallo", "output": "Hello"}
    jl = tmp_path / "more.jsonl"
    jl.write_text('{"instruction": "Say hi.", "output": "hi"}\n\n{"instruction": "x", "input": "y", "output": "z"}\n')
    assert load_records(str(jl)) == [{"instruction": "Say hi.", "input": "", "output": "hi"},
                                     {"instruction": "x", "input": "y", "output": "z"}]


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "output": "b"},', r"not valid JSON \(.* at line 1 column"),
    ('{"instruction": "a"}', r"holds a JSON dict, not a list"),
    ('[{"instruction": "a", "input": ""}]', r"record 0 of .* has no 'output' key \(keys: instruction, input\)"),
    ('[{"instruction": "a", "output": "b"}, 3]', r"record 1 of .* is a int, not an object"),
    ('[{"instruction": "a", "output": ["b"]}]', r"'output' is a list, not text"),
    ('[]', r"holds no records"),
])
def test_bad_records_are_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        load_records(str(p))


def test_prompt_is_the_books_alpaca_template() -> None:
    tok = GPT2Tokenizer()
    recs = [{"instruction": "Name a fruit.", "input": "", "output": "An apple."},
            {"instruction": "Fix the spelling.", "input": "freind", "output": "friend"}]
    for (ids, n_prompt), r in zip(encode_records(tok, recs), recs, strict=True):
        assert tok.decode(ids) == book_format_input(r) + f"\n\n### Response:\n{r['output']}"
        assert tok.decode(ids[:n_prompt]) == book_format_input(r) + "\n\n### Response:\n"
        assert tok.decode(ids[:n_prompt]) == alpaca_prompt(r["instruction"], r["input"])
    # special-token text inside a record is plain text, never an end-of-text id
    ids, _ = encode_records(tok, [{"instruction": "<|endoftext|>", "input": "", "output": "ok"}])[0]
    assert P not in ids


# ---------------------------------------------------------------- collate
BOOK_BATCH = [([0, 1, 2, 3, 4], 3), ([5, 6], 1), ([7, 8, 9], 2)]  # the book's example, with prompt lengths


def test_collate_matches_the_book_without_prompt_masking() -> None:
    x, y = collate(BOOK_BATCH, mask_prompt=False)
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, P, P, P], [7, 8, 9, P, P]]
    assert y.tolist() == [[1, 2, 3, 4, P], [6, P, -100, -100, -100], [8, 9, P, -100, -100]]
    assert x.dtype == y.dtype == torch.long


def test_collate_masks_prompt_tokens() -> None:
    x, y = collate(BOOK_BATCH)  # mask_prompt defaults on
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, P, P, P], [7, 8, 9, P, P]]
    # prompt tokens as targets are masked; the first response token is kept
    assert y.tolist() == [[-100, -100, 3, 4, P], [6, P, -100, -100, -100], [-100, 9, P, -100, -100]]


def test_collate_truncates_and_keeps_end_of_text_inside_text() -> None:
    x, y = collate(BOOK_BATCH, max_length=3, mask_prompt=False)
    assert x.tolist() == [[0, 1, 2], [5, 6, P], [7, 8, 9]]
    assert y.tolist() == [[1, 2, 3], [6, P, -100], [8, 9, P]]
    # an end-of-text id inside an example is a real target (only padding after the example is masked)
    x, y = collate([([1, P, 2], 1), ([3], 1)], mask_prompt=False)
    assert y.tolist() == [[P, 2, P], [P, -100, -100]]


# ---------------------------------------------------------------- trainer
@pytest.fixture
def init_ckpt(tmp_path: Path) -> Path:
    return tiny_gpt2_checkpoint(tmp_path / "init.pt")


def test_finetune_trainer_end_to_end(tmp_path: Path, init_ckpt: Path) -> None:
    records = make_records(40)
    data = write_records(tmp_path / "data.json", records)
    rec = Recorder()
    t = finetune_trainer(finetune_config(tmp_path, init_ckpt, data), rec)
    t.setup()
    assert (t.data.train.n_windows, t.data.test.n_windows, t.data.val.n_windows) == (34, 4, 2)
    assert t.context == 128 and t.steps_per_epoch == 17
    x, y = t.batches.get(0, 0)
    assert x.shape == y.shape and x.shape[0] == 2
    assert (y[:, 0] == -100).all()  # prompt tokens are not learned
    assert format_prompt(t.template, "Name a fruit.") == alpaca_prompt("Name a fruit.")
    assert t.fit() == "finished"

    snap = rec.snapshot()
    samples = [s for s in snap.samples if s.step == 2]
    assert [s.expected for s in samples] == [r["output"] for r in records[38:]]
    assert samples[0].prompt == records[38]["instruction"]
    assert [e.step for e in snap.evals][:1] == [2]

    responses = json.loads((tmp_path / "run" / "test_responses.json").read_text())
    assert [r["instruction"] for r in responses] == [r["instruction"] for r in records[34:38]]
    assert all(set(r) == {"instruction", "input", "output", "model_response"} for r in responses)

    lm = load_for_inference(str(tmp_path / "run"), "cpu")
    assert lm.template == "alpaca" and lm.format_prompt("hi") == alpaca_prompt("hi")


def test_max_length_drops_records_whose_prompt_fills_it(tmp_path: Path, init_ckpt: Path) -> None:
    data = write_records(tmp_path / "data.json", make_records(40))
    rec = Recorder()
    t = finetune_trainer(finetune_config(tmp_path, init_ckpt, data, max_length=40), rec)
    t.setup()
    x, _ = t.batches.get(0, 0)
    assert x.shape[1] <= 40
    # prompts have 36 tokens, or 45 with an input: those 14 records cannot teach anything in 40 tokens
    assert t.data.dropped == 14
    assert any("dropped" in e.message for e in rec.snapshot().logs)


def test_finetune_needs_a_gpt2_tokenizer_and_fitting_max_length(tmp_path: Path, init_ckpt: Path,
                                                                 corpus: Path) -> None:
    from engine.errors import GptTuiError

    data = write_records(tmp_path / "data.json", make_records(40))
    with pytest.raises(GptTuiError, match=r"--max-length 500 is longer than the model's position table \(128\)"):
        finetune_trainer(finetune_config(tmp_path, init_ckpt, data, max_length=500)).setup()


def test_cli_finetune_headless(tmp_path: Path, init_ckpt: Path) -> None:
    data = write_records(tmp_path / "data.json", make_records(40))
    run = tmp_path / "run"
    r = run_cli("finetune", "--init", str(init_ckpt), "--data", str(data), "--max-steps", "2", "--batch-size", "2",
                "--no-mask-prompt", "--sample-every", "2", "--sample-tokens", "3", "--test-responses", "1",
                "--eval-every", "0", "--eval-batches", "1", "--device", "cpu", "--headless", "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert "(expected '" in r.stdout  # samples show the expected output beside the response
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert cfg["mask_prompt"] is False and cfg["lr"] == 5e-5 and cfg["dropout"] == 0.0
    assert len(json.loads((run / "test_responses.json").read_text())) == 1
    assert "gpt-tui: test responses 1/1" in r.stderr and "test responses 1/1" not in r.stdout  # progress on stderr
    assert ", lr 5e-05" in r.stdout.splitlines()[0]  # the start line names the learning rate


def test_cli_lora_finetune_defaults_to_the_lora_learning_rate(tmp_path: Path, init_ckpt: Path) -> None:
    from engine.config import LORA_LR

    data = write_records(tmp_path / "data.json", make_records(40))
    run = tmp_path / "run"
    r = run_cli("finetune", "--init", str(init_ckpt), "--data", str(data), "--lora-rank", "4", "--max-steps", "1",
                "--batch-size", "2", "--sample-every", "0", "--test-responses", "0", "--eval-every", "0",
                "--eval-batches", "1", "--device", "cpu", "--headless", "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert f", lr {LORA_LR:g}" in r.stdout.splitlines()[0] and "trainable" in r.stdout.splitlines()[0]
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == LORA_LR
    r = run_cli("generate", str(run), "--prompt", "What is 2 plus one?", "-n", "3", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert "What is 2 plus one?" not in r.stdout  # instruction-tuned: only the response


@pytest.mark.parametrize("args, message", [
    (["--data", "DATA"], "finetune needs weights to start from: give --init"),
    (["--init", "INIT", "--data", "BAD"], "is not valid JSON"),
    (["--init", "INIT", "--data", "DATA", "--lora-rank", "4", "--lora-layers", "attn,ffn"],
     "unknown LoRA layer group 'ffn'"),
])
def test_cli_finetune_errors_are_one_line(tmp_path: Path, init_ckpt: Path, args: list[str], message: str) -> None:
    data = write_records(tmp_path / "data.json", make_records(40))
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    subst = {"DATA": str(data), "INIT": str(init_ckpt), "BAD": str(bad)}
    r = run_cli("finetune", *[subst.get(a, a) for a in args], "--headless", "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_val_loss_falls_on_the_book_data(tmp_path: Path, init_ckpt: Path) -> None:
    data = shared("instruction-data.json")
    rec = Recorder()
    t = finetune_trainer(finetune_config(tmp_path, init_ckpt, data, max_steps=30, batch_size=4, eval_every=10, lr=3e-3,
                                        eval_batches=3, sample_every="0", test_responses=0), rec)
    t.setup()
    first = t.evaluate()[1]
    t.fit()
    last = rec.snapshot().evals[-1].val_loss
    assert last < first - 0.5, (first, last)


async def test_dashboard_samples_show_the_expected_output(tmp_path: Path, init_ckpt: Path) -> None:
    import asyncio

    from tui.app import DashboardApp
    from tui.launch import EngineThread
    from tui.widgets import SamplesPane

    records = make_records(40)
    data = write_records(tmp_path / "data.json", records)
    rec = Recorder()
    trainer = finetune_trainer(finetune_config(tmp_path, init_ckpt, data, test_responses=0), rec, options=EngineOptions.interactive())
    engine = EngineThread(trainer, rec)
    app = DashboardApp(trainer, rec, run_dir=str(tmp_path / "run"), engine=engine)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            engine.start()
            pane = app.query_one(SamplesPane)
            for _ in range(600):
                if f"expected: {records[39]['output']}" in pane.plain():
                    break
                await pilot.pause(0.05)
            text = pane.plain()
            assert records[38]["instruction"] in text and f"expected: {records[38]['output']}" in text
            assert "→ " in text
    finally:
        trainer.stop(save=False)
        await asyncio.to_thread(engine.join, 30)
    assert not engine.is_alive()


# ---------------------------------------------------------------- the end of a finetuning run
@pytest.mark.slow
def test_one_sigint_during_the_test_responses_ends_the_run_at_once(tmp_path: Path, init_ckpt: Path) -> None:
    """A real `gpt-tui finetune`, interrupted once while it answers the test split: it exits 0 soon,
    its final checkpoint loads, and test_responses.json holds the batches answered before the signal."""
    import os
    import signal
    import subprocess
    import sys
    import time

    records = make_records(400)  # 40 test records
    data = write_records(tmp_path / "data.json", records)
    run = tmp_path / "run"
    exe = Path(sys.executable).parent / "gpt-tui"
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [str(exe), "finetune", "--init", str(init_ckpt), "--data", str(data), "--max-steps", "2", "--batch-size",
             "2", "--test-responses", "40", "--sample-tokens", "200", "--sample-every", "0", "--eval-every", "0",
             "--eval-batches", "1", "--device", "cpu", "--threads", "1", "--headless", "--out", str(run)],
            stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            deadline = time.monotonic() + 300
            while "test responses 8/40" not in err_path.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, err_path.read_text()
                time.sleep(0.1)
            assert "test responses 8/40 · ETA" in err_path.read_text(), err_path.read_text()
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = err_path.read_text()
    assert proc.returncode == 0, stderr
    assert took < 20, f"{took:.1f}s from the signal to the exit"
    assert "stopping the end-of-run work (the final checkpoint is already saved)" in stderr
    assert "Traceback" not in stderr
    final = run / "checkpoints" / "step-00000002.pt"
    lm = load_for_inference(str(final), "cpu")
    assert lm.step == 2 and lm.template == "alpaca"
    answered = json.loads((run / "test_responses.json").read_text())
    assert 8 <= len(answered) < 40 and len(answered) % 8 == 0
    assert [r["instruction"] for r in answered] == [r["instruction"] for r in records[340:340 + len(answered)]]
    assert f"wrote {len(answered)} test responses" in out and "left (stopped" in out


def test_headless_shows_empty_responses_in_words(capsys: pytest.CaptureFixture[str]) -> None:
    from engine.events import SampleEvent
    from tui.headless import EMPTY_RESPONSE, ConsoleSink

    sink = ConsoleSink()
    sink.emit(SampleEvent(step=3, epoch=0, text="", prompt="Name a fruit.", expected="apple"))
    sink.emit(SampleEvent(step=3, epoch=0, text="A pear.", prompt="Name a colour.", expected="red"))
    out = capsys.readouterr().out
    assert f"Name a fruit. -> {EMPTY_RESPONSE} (expected 'apple')" in out
    assert "-> ''" not in out and "-> 'A pear.'" in out


async def test_dashboard_shows_the_end_phase_progress_and_quits_it(tmp_path: Path) -> None:
    """While the test responses are written: FINISHING, their progress, an ETA counting the end work; q
    then stops that work (the final checkpoint is already saved)."""
    from engine.commands import LocalCommands
    from engine.events import LogEvent, RunStarted, StateEvent, StepEvent
    from tui.app import DashboardApp
    from tui.launch import StartingRun
    from tui.widgets import StatsPane, StatusLine

    rec = Recorder()
    controller = StartingRun(TrainConfig(), LocalCommands(), "alpaca")
    rec.emit(LogEvent(level="progress", message="starting the engine (importing torch)"))
    rec.emit(RunStarted(run_dir=str(tmp_path / "run"), config={}, n_params=10, n_trainable=10, device="cpu",
                        dtype="fp32", total_steps=4, steps_per_epoch=2))
    rec.emit(StepEvent(step=4, epoch=1, loss=1.0, lr=1e-4, grad_norm=1.0, tokens_seen=40, tokens_per_sec=10.0,
                       step_time=0.1, end_phase_s=60.0))
    rec.emit(StateEvent(state="finishing", step=4, message="answering 40 test records"))
    app = DashboardApp(controller, rec, run_dir=str(tmp_path / "run"))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.2)
        status = app.query_one(StatusLine).text.plain
        assert "FINISHING" in status and "answering 40 test records" in status, status
        assert "importing torch" not in status
        rec.emit(LogEvent(level="progress", message="test responses 8/40 · ETA 12s", step=4))
        await pilot.pause(0.8)
        status = app.query_one(StatusLine).text.plain
        assert "test responses 8/40 · ETA 12s" in status, status
        assert "(end of run)" in app.query_one(StatsPane).text.plain
        footer = {k for k, b in app.screen.active_bindings.items() if b.binding.show and b.enabled}
        assert "p" not in footer and "q" in footer  # nothing left to pause between
        await pilot.press("q")
        assert controller.stopping
        status = app.query_one(StatusLine).text.plain
        assert "final checkpoint saved" in status and len(status) <= 80, status
