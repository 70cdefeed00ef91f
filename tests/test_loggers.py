"""--log tensorboard / wandb, log-export, and loggers that fail without stopping the run."""

from __future__ import annotations

import glob
import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from engine.events import StepEvent, read_metrics
from engine.recorder import Recorder
from tests.conftest import REPO, run_cli, tiny_config

TINY_FLAGS = ["--preset", "tiny", "--tokenizer", "char", "--context", "32", "--n-layer", "1", "--n-head", "2",
              "--n-embd", "32", "--batch-size", "4", "--max-steps", "10", "--eval-every", "5", "--eval-batches", "2",
              "--sample-every", "5", "--sample-tokens", "10", "--device", "cpu", "--dtype", "fp32", "--threads", "1",
              "--headless"]

STEP_TAGS = {"train/loss": "loss", "train/lr": "lr", "train/grad_norm": "grad_norm",
             "train/tokens_per_sec": "tokens_per_sec", "train/mfu": "mfu"}
EVAL_TAGS = {"eval/train_loss": "train_loss", "eval/val_loss": "val_loss", "eval/val_bpb": "val_bpb"}


def expected_points(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per scalar tag, straight from metrics.jsonl records."""
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        tags = STEP_TAGS if rec["type"] == "step" else EVAL_TAGS if rec["type"] == "eval" else {}
        for tag, key in tags.items():
            if rec.get(key) is not None:
                out.setdefault(tag, []).append((rec["step"], float(rec[key])))
    return out


def read_tensorboard(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, str]]]:
    """Scalars and sample texts of a TensorBoard folder, read with TensorBoard's own readers (the text
    with the one its server uses, which also drops the text a resumed run's ``purge_step`` hides)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    server = plugin_event_accumulator.EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    server.Reload()
    samples = [(e.step, e.tensor_proto.string_val[0].decode()) for e in server.Tensors("samples/text_summary")]
    return scalars, samples


def assert_same_points(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]],
                       rel: float = 1e-6) -> None:
    """The same tags, steps and values (TensorBoard keeps scalars as float32: ``rel`` 1e-6)."""
    assert set(got) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=rel), tag


def test_log_tensorboard_through_the_cli(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    r = run_cli("train", "--data", str(corpus), "--out", str(run), "--log", "tensorboard", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    records = read_metrics(str(run / "metrics.jsonl"))
    want = expected_points(records)
    assert len(want["train/loss"]) == 10 and len(want["eval/val_loss"]) == 2  # steps 5 and 10

    scalars, samples = read_tensorboard(run / "tensorboard")
    assert_same_points(scalars, want)
    want_samples = [(rec["step"], rec["prompt"] + rec["text"]) for rec in records if rec["type"] == "sample"]
    assert [s for s, _ in samples] == [s for s, _ in want_samples] == [5, 10]
    for (_, got), (_, text) in zip(samples, want_samples, strict=True):
        assert text in got
    start = next(rec for rec in records if rec["type"] == "start")
    assert start["config"]["log"] == ["tensorboard"]
    assert "changed on resume" not in r.stdout


def wandb_records(path: str) -> list:
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB-log framing (32 KiB blocks of
    crc32, length, type: full, first, middle, last) around protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        else:
            break
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def wandb_env(tmp_path: Path) -> dict[str, str]:
    home = str(tmp_path / "wandb-home")
    return {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": home, "WANDB_CACHE_DIR": home, "WANDB_DATA_DIR": home,
            "WANDB_PROJECT": "gpt-tui-tests"}


def read_wandb_run(folder: Path) -> tuple[dict, list[dict]]:
    """The config and history rows of the one offline run under ``folder``/wandb."""
    files = glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    config: dict = {}
    rows: list[dict] = []
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return config, rows


def wandb_points(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for tag in (*STEP_TAGS, *EVAL_TAGS):
            if tag in row:
                out.setdefault(tag, []).append((row["step"], row[tag]))
    return out


def test_log_wandb_offline_through_the_cli(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    r = run_cli("train", "--data", str(corpus), "--out", str(run), "--log", "wandb", *TINY_FLAGS,
                env=wandb_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "wandb:" not in r.stdout + r.stderr  # W&B stays off the terminal (the dashboard's)
    records = read_metrics(str(run / "metrics.jsonl"))
    config, rows = read_wandb_run(run)
    assert config["max_steps"] == 10 and config["n_embd"] == 32 and config["log"] == ["wandb"]
    assert config["run"]["total_steps"] == 10 and config["run"]["run_dir"] == str(run)
    assert_same_points(wandb_points(rows), expected_points(records), rel=1e-12)  # JSON doubles
    samples = [row["step"] for row in rows if row.get("samples/_type") == "html-file"]
    assert samples == [5, 10]
    html_files = glob.glob(str(run / "wandb" / "offline-run-*" / "files" / "media" / "html" / "samples_*.html"))
    texts = [rec["text"] for rec in records if rec["type"] == "sample"]
    assert len(html_files) == 2 and any(texts[0] in Path(f).read_text() for f in html_files)


class RaisingAddScalar:
    """SummaryWriter.add_scalar that works ``ok`` times, then fails like a full disk."""

    def __init__(self, original, ok: int) -> None:
        self.original, self.ok, self.calls = original, ok, 0

    def __call__(self, writer, *args, **kwargs):
        self.calls += 1
        if self.calls > self.ok:
            raise OSError(28, "No space left on device")
        return self.original(writer, *args, **kwargs)


def test_a_failing_logger_is_switched_off_and_the_run_goes_on(corpus: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from engine.trainer import Trainer

    raising = RaisingAddScalar(SummaryWriter.add_scalar, ok=7)
    monkeypatch.setattr(SummaryWriter, "add_scalar", lambda self, *a, **k: raising(self, *a, **k))
    recorder = Recorder()
    trainer = Trainer(tiny_config(corpus, tmp_path / "run", log=["tensorboard"]), recorder)
    trainer.setup()
    assert trainer.fit() == "finished"

    assert raising.calls == 8  # the failing call was the last one: the logger is off
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [rec["step"] for rec in records if rec["type"] == "step"] == list(range(1, 11))
    assert records[-1]["type"] == "state" and records[-1]["state"] == "finished"
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "step-00000010.pt")
    warnings = [rec for rec in records if rec["type"] == "log" and "tensorboard" in rec["message"]]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert "No space left on device" in warnings[0]["message"] and "training goes on" in warnings[0]["message"]
    shown = [e.message for e in recorder.snapshot().logs if "tensorboard" in e.message]
    assert shown == [warnings[0]["message"]]  # the dashboard's log shows it too


class Writer:
    """A writer driven by a test: it can raise, or hang until released."""

    name = "test"

    def __init__(self, fail_at: int | None = None, fail_on_close: bool = False) -> None:
        self.fail_at, self.fail_on_close = fail_at, fail_on_close
        self.handled: list[int] = []
        self.release = threading.Event()
        self.release.set()
        self.closed = 0

    def handle(self, event) -> None:
        self.release.wait()
        if self.fail_at is not None and event.step >= self.fail_at:
            raise RuntimeError("the library raised")
        self.handled.append(event.step)

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self.closed += 1
        if self.fail_on_close:
            raise OSError(5, "Input/output error")


def step(n: int) -> StepEvent:
    return StepEvent(step=n, epoch=0, loss=1.0, lr=1e-3, grad_norm=1.0, tokens_seen=n, tokens_per_sec=1.0,
                     step_time=0.01)


def test_logger_sink_reports_a_failure_once_and_never_raises() -> None:
    from engine.loggers import LoggerSink

    reports: list[str] = []
    writer = Writer(fail_at=3)
    sink = LoggerSink(writer, reports.append)
    for n in range(1, 4):
        sink.emit(step(n))
    deadline = time.time() + 10
    while sink.error is None and time.time() < deadline:
        time.sleep(0.01)
    for n in range(4, 20):
        sink.emit(step(n))  # reported at the first emit after the failure, once
    sink.close()
    assert writer.handled == [1, 2] and writer.closed == 1
    assert len(reports) == 1 and "test logging is off" in reports[0] and "RuntimeError: the library raised" in reports[0]

    closing = LoggerSink(Writer(fail_on_close=True), reports.append)
    closing.emit(step(1))
    closing.close()
    assert len(reports) == 2 and "OSError" in reports[1]


def test_logger_sink_never_blocks_the_engine() -> None:
    from engine.loggers import LoggerSink

    reports: list[str] = []
    writer = Writer()
    writer.release.clear()  # the library hangs (a stalled network, a slow disk)
    sink = LoggerSink(writer, reports.append, max_queue=50)
    t0 = time.perf_counter()
    for n in range(1, 200):
        sink.emit(step(n))
    assert time.perf_counter() - t0 < 1.0
    assert len(reports) == 1 and "fell behind" in reports[0]
    sink.close(timeout=0.2)
    assert len(reports) == 1  # already reported
    writer.release.set()


@pytest.mark.slow  # two training sessions and two real CLI processes
def test_resume_appends_to_the_tensorboard_folder_and_log_export_writes_the_same(
        corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from engine.loggers import history
    from engine.trainer import Trainer

    run = tmp_path / "run"
    first = Trainer(tiny_config(corpus, run, log=["tensorboard"], max_steps=6, checkpoint_every=4, sample_every="3"))
    first.setup()
    first.fit()
    # resume from step 4: steps 5 and 6 of the first session are done again
    second = Trainer(tiny_config(corpus, run, log=["tensorboard"], max_steps=10, checkpoint_every=4, sample_every="3",
                                 resume=str(run / "checkpoints" / "step-00000004.pt")))
    second.setup()
    assert second.fit() == "finished"

    records = read_metrics(str(run / "metrics.jsonl"))
    assert [rec["step"] for rec in records if rec["type"] == "step"] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]
    kept = [e.to_record() for e in history(str(run))]
    want = expected_points(kept)
    assert [s for s, _ in want["train/loss"]] == list(range(1, 11))
    live, live_samples = read_tensorboard(run / "tensorboard")
    assert_same_points(live, want)  # the first session's steps 5 and 6 purged

    out = tmp_path / "exported"
    r = run_cli("log-export", str(run), "--to", "tensorboard", "--out", str(out))
    assert r.returncode == 0, r.stderr
    samples = sum(rec["type"] == "sample" for rec in kept)  # the first one may come early (after 10 s)
    assert f"exported 10 steps, 2 evals and {samples} samples -> {out}" in r.stdout
    exported, exported_samples = read_tensorboard(out)
    assert_same_points(exported, want)
    assert exported_samples == live_samples
    assert [s for s, _ in exported_samples] == [3, 6, 9, 10]  # the first session's 6 dropped

    again = run_cli("log-export", str(run), "--out", str(out))
    assert again.returncode != 0
    assert again.stderr.strip().splitlines() == [
        f"gpt-tui: error: {out} already holds TensorBoard event files: give --out DIR for another folder, "
        "or remove that one"]


def test_log_export_of_a_run_trained_without_log(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from engine.trainer import Trainer

    run = tmp_path / "run"
    trainer = Trainer(tiny_config(corpus, run, sample_every="5"))
    trainer.setup()
    trainer.fit()
    assert not (run / "tensorboard").exists()
    r = run_cli("log-export", str(run))
    assert r.returncode == 0, r.stderr
    records = read_metrics(str(run / "metrics.jsonl"))
    scalars, samples = read_tensorboard(run / "tensorboard")
    assert_same_points(scalars, expected_points(records))
    assert [s for s, _ in samples] == [5, 10]


def test_log_export_to_wandb(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    from engine.trainer import Trainer

    run = tmp_path / "run"
    trainer = Trainer(tiny_config(corpus, run, sample_every="5"))
    trainer.setup()
    trainer.fit()
    r = run_cli("log-export", str(run), "--to", "wandb", env=wandb_env(tmp_path))
    assert r.returncode == 0, r.stderr
    config, rows = read_wandb_run(run)
    assert config["max_steps"] == 10
    assert_same_points(wandb_points(rows), expected_points(read_metrics(str(run / "metrics.jsonl"))), rel=1e-12)


def one_error_line(r) -> str:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("gpt-tui: error: ")
    return lines[0]


def test_log_export_errors(tmp_path: Path) -> None:
    missing = one_error_line(run_cli("log-export", str(tmp_path / "nope")))
    assert "does not exist" in missing
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    line = one_error_line(run_cli("log-export", str(empty)))
    assert "holds no steps, evals or samples" in line
    assert not (empty / "tensorboard").exists()
    line = one_error_line(run_cli("log-export", str(empty), "--to", "mlflow"))
    assert "unknown --to 'mlflow'" in line


def test_unknown_log_name_is_refused_by_train_and_finetune(corpus: Path, tmp_path: Path) -> None:
    line = one_error_line(run_cli("train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--log", "mlflow",
                                  *TINY_FLAGS))
    assert line == "gpt-tui: error: unknown --log 'mlflow': choose tensorboard or wandb (repeat --log for both)"
    assert not (tmp_path / "run").exists()
    line = one_error_line(run_cli("finetune", "--init", str(tmp_path / "gpt2"), "--data", str(tmp_path / "i.json"),
                                  "--log", "mlflow", "--headless"))
    assert "unknown --log 'mlflow'" in line


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_extra_is_one_line_naming_the_install(name: str, corpus: Path, tmp_path: Path) -> None:
    # sitecustomize runs at interpreter start: the package cannot be imported, as if not installed
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{name!r}] = None\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    line = one_error_line(run_cli("train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--log", name,
                                  *TINY_FLAGS, env=env))
    assert line.startswith(f"gpt-tui: error: --log {name} needs the {name} package")
    assert line.endswith(f": pip install 'gpt-tui[logging]' (or just pip install {name})")
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_log_names() -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from engine.config import SAFE_ON_RESUME, TrainConfig
    from engine.loggers import check_loggers

    assert check_loggers(["tensorboard,wandb", "none", "TensorBoard"]) == ["tensorboard", "wandb"]
    assert check_loggers(["none"]) == [] and check_loggers("wandb") == ["wandb"]
    assert TrainConfig().log == [] and "log" in SAFE_ON_RESUME


def test_online_wandb_without_a_login_is_refused_before_training(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    # no key, no netrc: wandb would ask for one on the terminal (the dashboard's)
    env = {**wandb_env(tmp_path), "WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path / "home"),
           "NETRC": str(tmp_path / "home" / ".netrc")}
    run = tmp_path / "run"
    line = one_error_line(run_cli("train", "--data", str(corpus), "--out", str(run), "--log", "wandb", *TINY_FLAGS,
                                  env=env))
    assert line.startswith("gpt-tui: error: W&B has no login here and is not in offline mode: run `wandb login`")
    assert "WANDB_MODE=offline" in line
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_loggers_under_the_dashboard_stay_off_the_screen_and_close_on_quit(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    import shutil
    import sys

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    from tests.test_tmux_dashboard import Terminal

    run = tmp_path / "run"
    home = tmp_path / "wandb-home"
    env = (f"GPT_TUI_CACHE={os.environ['GPT_TUI_CACHE']} TERM=xterm-256color OMP_NUM_THREADS=1 WANDB_MODE=offline "
           f"WANDB_CONFIG_DIR={home} WANDB_CACHE_DIR={home} WANDB_DATA_DIR={home} PYTHONPATH={REPO}")
    args = " ".join(["--data", str(corpus), "--out", str(run), "--log", "tensorboard", "--log", "wandb",
                     *[a for a in TINY_FLAGS if a != "--headless"]])
    gpt_tui = Path(sys.executable).parent / "gpt-tui"
    term = Terminal("gpt-tui-loggers", width=100, height=30)
    try:
        term.start(f"sh -c 'exec env -u COLUMNS -u LINES {env} {gpt_tui} train {args}'; echo DASH-EXIT=$?; sleep 120")
        term.wait("FINISHED", timeout=120)
        screen = term.screen()
        assert "wandb" not in screen.lower() and "tensorboard" not in screen.lower(), screen
        term.keys("q")
        term.wait("DASH-EXIT=0", timeout=90)
    finally:
        term.close()
    records = read_metrics(str(run / "metrics.jsonl"))
    scalars, _ = read_tensorboard(run / "tensorboard")
    assert_same_points(scalars, expected_points(records))
    _, rows = read_wandb_run(run)
    assert [row["step"] for row in rows if "train/loss" in row] == list(range(1, 11))
    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert [r.exit.exit_code for r in wandb_records(files[0]) if r.WhichOneof("record_type") == "exit"] == [0]


def test_export_keeps_val_bpb_and_instruction_samples(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from engine.loggers import export_metrics

    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"type": "start", "time": 1.0, "run_dir": str(run), "config": {"lr": 0.001}, "n_params": 10, "device": "cpu",
         "dtype": "fp32", "total_steps": 2, "steps_per_epoch": 2},
        {"type": "step", "time": 2.0, "step": 1, "epoch": 0, "loss": 2.5, "lr": 0.001, "grad_norm": 1.5,
         "tokens_seen": 64, "tokens_per_sec": 1000.0, "step_time": 0.1, "mfu": None},
        {"type": "step", "time": 3.0, "step": 2, "epoch": 0, "loss": 2.25, "lr": 0.0005, "grad_norm": 1.25,
         "tokens_seen": 128, "tokens_per_sec": 1100.0, "step_time": 0.1, "mfu": None},
        {"type": "eval", "time": 4.0, "step": 2, "train_loss": 2.2, "val_loss": 2.3, "val_bpb": 1.125},
        {"type": "sample", "time": 5.0, "step": 2, "epoch": 0, "text": "Paris.", "prompt": "Capital of France?",
         "expected": "Paris is the capital."},
        {"type": "state", "time": 6.0, "state": "finished", "step": 2},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    dest, counts = export_metrics(str(run))
    assert dest == str(run / "tensorboard")
    assert counts == {"train/loss": 2, "train/lr": 2, "train/grad_norm": 2, "train/tokens_per_sec": 2,
                      "eval/train_loss": 1, "eval/val_loss": 1, "eval/val_bpb": 1, "samples": 1}
    scalars, samples = read_tensorboard(run / "tensorboard")
    assert scalars["eval/val_bpb"] == [(2, 1.125)]
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.25)] and "train/mfu" not in scalars
    assert samples[0][0] == 2
    assert all(t in samples[0][1] for t in ("Capital of France?", "Paris.", "**Expected**", "Paris is the capital."))
