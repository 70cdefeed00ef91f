"""The control channel of a run: shell commands, viewers, stale sockets, detach and attach in tmux."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.control import ControlClient, ControlError
from engine.events import read_metrics
from engine.runs import SOCKET as SOCKET_NAME

from .conftest import run_cli

GPT_TUI = str(Path(sys.executable).parent / "gpt-tui")

# A run far longer than any test: the tests stop it through the channel.
LONG_RUN = ["--preset", "tiny", "--tokenizer", "char", "--context", "32", "--n-layer", "1", "--n-head", "2",
            "--n-embd", "32", "--batch-size", "2", "--max-steps", "1000000", "--eval-every", "0",
            "--eval-batches", "2", "--sample-every", "0", "--dtype", "fp32", "--device", "cpu", "--threads", "1"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def start_headless(corpus: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A headless run in a subprocess, returned once its control channel answers."""
    proc = subprocess.Popen([GPT_TUI, "train", "--headless", "--data", str(corpus), *LONG_RUN, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    wait_serving(out, proc)
    return proc


def wait_serving(out: Path, proc: subprocess.Popen | None = None, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited early: {proc.stdout.read() if proc.stdout else ''}")
        try:
            st = ControlClient(str(out), timeout=2).call("status")
            if st["step"] > 0:
                return st
        except ControlError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{out} never served its control channel")


def status(out: Path) -> dict:
    return ControlClient(str(out)).call("status")


def cli_ok(*args: str) -> str:
    r = run_cli(*args, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


class FakeTrainer:
    """The trainer's command surface, recording what the channel asked for."""

    def __init__(self, run_dir: Path) -> None:
        from engine.events import MultiSink

        self.run_dir = str(run_dir)
        self.sink = MultiSink([])
        self.state, self.step, self.total_steps, self.tokens_seen = "running", 7, 100, 0
        self.world, self.is_main, self.last_checkpoint = 1, True, None
        self.paused = False
        self.template = None
        self.calls: list[tuple] = []

    def add_sink(self, sink) -> None:
        from engine.events import MultiSink

        self.sink = MultiSink([self.sink, sink])

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def toggle_pause(self) -> bool:
        self.paused = not self.paused
        return self.paused

    def request_checkpoint(self) -> None:
        self.calls.append(("checkpoint",))

    def request_eval(self) -> None:
        self.calls.append(("eval",))

    def request_generate(self, prompt, settings, raw=False) -> int:
        self.calls.append(("generate", prompt, settings.max_new_tokens, raw))
        return 42

    def cancel_generation(self) -> None:
        self.calls.append(("cancel",))

    def stop(self, save: bool = True) -> None:
        self.calls.append(("stop", save))

    def emit(self, event) -> None:
        self.sink.emit(event)


def test_channel_in_process_long_path_stale_socket_and_viewers(tmp_path: Path) -> None:
    from engine.control import ControlServer, RemoteController, read_info, socket_path_for
    from engine.events import StepEvent

    run = tmp_path / ("a-rather-long-run-directory-name-" * 3) / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    trainer = FakeTrainer(run)
    path = socket_path_for(str(run))
    assert len(path) <= 100 and not path.startswith(str(run))  # too long for the run dir: a private folder
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # as left by a process that died
    stale.bind(path)
    stale.close()
    server = ControlServer(trainer).start()
    try:
        assert read_info(str(run))["socket"] == path and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(ControlError, match="already being trained"):
            ControlServer(FakeTrainer(run)).start()

        viewers = [RemoteController(str(run)).start() for _ in range(2)]
        assert viewers[0].toggle_pause() is True and trainer.paused
        viewers[1].request_checkpoint()
        viewers[1].request_eval()
        assert viewers[0].request_generate("hi", None) == 42
        viewers[0].cancel_generation()
        viewers[0].stop(save=False)
        assert trainer.calls == [("checkpoint",), ("eval",), ("generate", "hi", 100, False), ("cancel",),
                                 ("stop", False)]
        trainer.emit(StepEvent(step=8, epoch=0, loss=1.5, lr=1e-3, grad_norm=1.0, tokens_seen=64,
                               tokens_per_sec=1.0, step_time=0.1))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(v.recorder.last_step for v in viewers):
            time.sleep(0.05)
        assert all(v.recorder.last_step is not None and v.recorder.last_step.step == 8 for v in viewers)
        with pytest.raises(ControlError, match="unknown command"):
            ControlClient(str(run)).call("explode")
    finally:
        server.close()
    assert not os.path.exists(path) and read_info(str(run)) is None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(v.connected for v in viewers):
        time.sleep(0.05)
    assert not any(v.connected for v in viewers)  # the viewers learn that the run went away


def test_shell_commands_drive_a_headless_run(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_headless(corpus, out)
    try:
        sock = out / SOCKET_NAME
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600  # only the owner
        assert json.loads((out / "control.json").read_text())["pid"] == proc.pid
        # A second process may not train into a live run's directory.
        r = run_cli("train", "--headless", "--data", str(corpus), *LONG_RUN, "--out", str(out))
        assert r.returncode != 0 and f"already being trained by process {proc.pid}" in r.stderr

        said = cli_ok("pause", str(out))
        assert said.startswith("paused at step")
        step = status(out)["step"]
        time.sleep(0.6)
        st = status(out)
        assert st["paused"] and st["state"] == "paused" and st["step"] == step  # no compute while paused
        assert "already paused" in cli_ok("pause", str(out))

        said = cli_ok("checkpoint", str(out))
        path = said.split("checkpoint: ")[1].strip()
        assert Path(path).exists() and f"{step:08d}" in path
        assert cli_ok("eval", str(out)).startswith(f"eval step {step}:")

        # Two viewers at once, and a generation from the live weights streamed to them.
        streams = [ControlClient(str(out)).subscribe() for _ in range(2)]
        rid = ControlClient(str(out)).call("generate", prompt="It had", settings={"max_new_tokens": 5, "seed": 1})["id"]
        for s in streams:
            done = s.wait_for(lambda r: r.get("type") == "generate" and r.get("done"), 30)
            assert done is not None and done["request_id"] == rid
            s.close()

        assert cli_ok("resume", str(out)).startswith("running")
        deadline = time.monotonic() + 30
        while status(out)["step"] <= step and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status(out)["step"] > step

        said = cli_ok("stop", str(out))
        assert "the run stopped at step" in said and "checkpoint:" in said
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not sock.exists() and not (out / "control.json").exists()
    states = [r["state"] for r in read_metrics(str(out / "metrics.jsonl")) if r["type"] == "state"]
    assert states[-1] == "stopped" and "paused" in states
    assert sum(r["type"] == "start" for r in read_metrics(str(out / "metrics.jsonl"))) == 1


@pytest.mark.slow
def test_not_a_run_dead_run_and_stale_socket(corpus: Path, tmp_path: Path) -> None:
    r = run_cli("pause", str(tmp_path))
    assert r.returncode != 0 and "not a gpt-tui run directory" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("attach", str(tmp_path / "nowhere"))
    assert r.returncode != 0 and "not a gpt-tui run directory" in r.stderr

    out = tmp_path / "run"
    proc = start_headless(corpus, out, "--checkpoint-every", "50")
    deadline = time.monotonic() + 60
    while not list((out / "checkpoints").glob("*.meta.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # dies without cleaning up: the socket stays behind
    proc.wait(timeout=30)
    assert (out / SOCKET_NAME).exists()

    r = run_cli("attach", str(out))
    assert r.returncode != 0
    assert "ended without finishing" in r.stderr and f"--resume {out}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("status", str(out))  # a dead run: its state on stdout, exit status 3
    assert r.returncode == 3, r
    assert r.stdout.startswith("dead at step") and "ended without finishing" in r.stdout
    assert f"--resume {out}" in r.stdout and "Traceback" not in r.stderr

    # Resuming replaces the stale socket; the new process answers.
    proc = subprocess.Popen([GPT_TUI, "train", "--headless", "--resume", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        st = wait_serving(out, proc)
        assert st["pid"] == proc.pid
        assert "the run stopped" in cli_ok("stop", str(out), "--no-save")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    r = run_cli("status", str(out))  # stopped normally: says so, exit status 0
    assert r.returncode == 0 and r.stdout.startswith("stopped at step") and "not running" in r.stdout, r


def test_status_of_a_finished_and_a_failed_run(corpus: Path, tmp_path: Path) -> None:
    from engine.trainer import Trainer

    from .conftest import tiny_config

    done = tmp_path / "done"
    t = Trainer(tiny_config(corpus, done, max_steps=4), None)
    t.setup()
    assert t.fit() == "finished"
    r = run_cli("status", str(done))
    assert r.returncode == 0, r
    assert r.stdout.startswith("finished at step 4/4 (not running)") and "step-00000004.pt" in r.stdout

    class Failing(Trainer):
        def train_step(self):  # type: ignore[no-untyped-def]
            if self.step == 2:
                raise RuntimeError("boom")
            return super().train_step()

    failed = tmp_path / "failed"
    t = Failing(tiny_config(corpus, failed, max_steps=10), None)
    t.setup()
    with pytest.raises(RuntimeError):
        t.fit()
    r = run_cli("status", str(failed))
    assert r.returncode == 1, r
    assert r.stdout.startswith("failed at step 2/10: RuntimeError: boom") and f"--resume {failed}" in r.stdout
    r = run_cli("status", str(tmp_path))
    assert r.returncode == 2 and "not a gpt-tui run directory" in r.stderr
    assert "0 running, paused, finished or stopped; 1 the run failed; 3" in run_cli("status", "--help").stdout


# ---------------------------------------------------------------------- tmux
def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30).stdout


def _screen(session: str) -> str:
    return _tmux("capture-pane", "-t", session, "-p")


def _wait_screen(session: str, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = _screen(session)
        if text in screen:
            return screen
        time.sleep(0.3)
    raise AssertionError(f"{text!r} never appeared on the screen:\n{_screen(session)}")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_detach_then_attach_in_tmux(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    session = f"gpt-tui-attach-{os.getpid()}"
    env = (f"GPT_TUI_CACHE={os.environ['GPT_TUI_CACHE']} TERM=xterm-256color OMP_NUM_THREADS=1 "
           f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}")  # this checkout's code, whatever tmux's server had
    args = " ".join(["train", "--data", str(corpus), *LONG_RUN, "--out", str(out), "--detach"])
    # Detach from a terminal, then hang that terminal up: the run carries on.
    _tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "40", f"env {env} {GPT_TUI} {args}; sleep 60")
    _wait_screen(session, f"gpt-tui attach {out}")
    _tmux("kill-session", "-t", session)
    assert (out / "train.log").exists()
    pid = status(out)["pid"]
    step = status(out)["step"]
    deadline = time.monotonic() + 30
    while status(out)["step"] <= step and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status(out)["step"] > step
    try:
        _tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "40",
              f"env {env} {GPT_TUI} attach {out}; echo ATTACH-EXIT=$?; sleep 60")
        _wait_screen(session, "RUNNING")
        _tmux("send-keys", "-t", session, "p")
        _wait_screen(session, "PAUSED")
        assert status(out)["state"] == "paused"
        _tmux("send-keys", "-t", session, "p")
        _wait_screen(session, "RUNNING")
        _tmux("send-keys", "-t", session, "q")
        screen = _wait_screen(session, "ATTACH-EXIT=0")
        assert "the run goes on" in screen
        step = status(out)["step"]
        deadline = time.monotonic() + 30
        while status(out)["step"] <= step and time.monotonic() < deadline:
            time.sleep(0.1)
        st = status(out)
        assert st["state"] == "running" and st["step"] > step and st["pid"] == pid  # training continued
    finally:
        _tmux("kill-session", "-t", session)
        said = run_cli("stop", str(out)).stdout
    assert "the run stopped" in said
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "stopped:" in (out / "train.log").read_text()

    # A run that has ended opens read-only, and its footer offers no command.
    try:
        _tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "40",
              f"env {env} {GPT_TUI} attach {out}; echo ATTACH-EXIT=$?; sleep 60")
        _wait_screen(session, "STOPPED")
        screen = _wait_screen(session, "q quit")  # the footer may come a frame after the status line
        footer = screen.rstrip().splitlines()[-1]
        assert "q quit" in footer and not any(f"{k} " in footer for k in ("p pause", "c checkpoint", "e eval")), footer
        _tmux("send-keys", "-t", session, "p")  # refused: a read-only view has nothing to command
        _wait_screen(session, "read-only view: cannot pause")
        _tmux("send-keys", "-t", session, "q")
        _wait_screen(session, "ATTACH-EXIT=0")
    finally:
        _tmux("kill-session", "-t", session)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_leaving_a_paused_run_says_how_to_resume(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_headless(corpus, out)
    session = f"gpt-tui-attach-paused-{os.getpid()}"
    env = (f"GPT_TUI_CACHE={os.environ['GPT_TUI_CACHE']} TERM=xterm-256color OMP_NUM_THREADS=1 "
           f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}")  # this checkout's code, whatever tmux's server had
    try:
        _tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24",
              f"env {env} {GPT_TUI} attach {out}; echo ATTACH-EXIT=$?; sleep 60")
        _wait_screen(session, "RUNNING")
        _tmux("send-keys", "-t", session, "p")
        screen = _wait_screen(session, "PAUSED")
        _wait_screen(session, "p resume")  # the footer says what p does now
        _tmux("send-keys", "-t", session, "?")
        screen = _wait_screen(session, "close the viewer (the run goes on)")
        assert "save a checkpoint and quit" not in screen
        _tmux("send-keys", "-t", session, "?")  # closes the help (Esc then q would arrive as Alt+q)
        _wait_screen(session, "PAUSED")
        time.sleep(0.5)
        _tmux("send-keys", "-t", session, "q")
        screen = "".join(_wait_screen(session, "ATTACH-EXIT=0").splitlines())  # long paths wrap
        assert "the run stays paused" in screen and f"gpt-tui resume {out}" in screen
        assert status(out)["state"] == "paused"
    finally:
        _tmux("kill-session", "-t", session)
        run_cli("stop", str(out), "--no-save")
        if proc.wait(timeout=60) is None:
            proc.kill()
