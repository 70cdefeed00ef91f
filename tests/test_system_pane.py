"""The system pane's probes on real processes, and its rows per device."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest

from engine.events import StepEvent
from tui.system import GPU_HINT, ProcessProbe, SystemMonitor, cuda_index, machine_memory, system_rows


def step(**kw) -> StepEvent:
    base = dict(step=5, epoch=0, loss=2.0, lr=1e-3, grad_norm=1.0, tokens_seen=640, tokens_per_sec=1e4,
                step_time=0.020, data_time=0.005)
    base.update(kw)
    return StepEvent(**base)


def test_cpu_threads_and_memory_of_another_process() -> None:
    """As for `gpt-tui attach`: the probe reads the run's process, not its own."""
    code = "import threading, time\nx = bytearray(64 * 2**20)\n" \
           "[threading.Thread(target=time.sleep, args=(30,), daemon=True).start() for _ in range(3)]\n" \
           "t = time.time()\nwhile time.time() - t < 30: pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        probe = ProcessProbe(proc.pid)
        probe.sample()
        time.sleep(1.5)
        s = probe.sample()
        assert s.cpu_percent is not None and 10 < s.cpu_percent < 130  # one busy thread (a shared box gives it less)
        assert s.threads is not None and s.threads >= 4
        assert s.rss_mb is not None and s.rss_mb > 64 and not s.rss_is_peak
    finally:
        proc.kill()
        proc.wait()


def test_an_idle_process_uses_no_cpu_and_a_gone_one_gives_dashes() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        probe = ProcessProbe(proc.pid)
        probe.sample()
        time.sleep(1.0)
        assert probe.sample().cpu_percent < 5
    finally:
        proc.kill()
        proc.wait()
    gone = probe.sample()
    assert gone.cpu_percent is None and gone.rss_mb is None
    rows = dict(system_rows(SystemMonitor(None).sample(), None, "cpu"))
    assert rows["CPU"] == "-" and rows["RSS"] == "-" and rows["data wait"] == "-"


def test_machine_memory_and_the_rows_of_a_cpu_run() -> None:
    avail, total = machine_memory()
    assert total and avail and 0 < avail <= total
    m = SystemMonitor(os.getpid())
    m.set_device("cpu")
    rows = dict(system_rows(m.sample(), step(), "cpu"))
    assert rows["data wait"] == "5.0 ms (25%)" and rows["RAM free"].endswith(" GB") and " of " in rows["RAM free"]
    assert "threads" in rows["CPU"] and not any(k.startswith("GPU") for k in rows)
    assert dict(system_rows(m.sample(), step(), "cpu", live=False))["process"] == "not running"


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="nvidia-ml-py is installed")
def test_cuda_without_nvml_says_how_to_get_it() -> None:
    m = SystemMonitor(os.getpid())
    m.set_device("cuda:0")
    assert dict(system_rows(m.sample(), step(), "cuda:0"))["GPU"] == GPU_HINT == "pip install 'gpt-tui[gpu]'"


def test_mps_shows_the_memory_torch_allocated() -> None:
    rows = dict(system_rows(SystemMonitor(os.getpid()).sample(), step(memory_mb=1536.0), "mps"))
    assert rows["MPS alloc"] == "1.50 GB" and "GPU" not in rows


def test_nvml_index_follows_cuda_visible_devices() -> None:
    assert cuda_index("cpu", "") is None and cuda_index("mps", "") is None
    assert cuda_index("cuda", "") == 0 and cuda_index("cuda:1", "") == 1
    assert cuda_index("cuda:1", "2,3") == 3 and cuda_index("cuda", "5") == 5
    assert cuda_index("cuda:0", "GPU-8f6b") == 0


def test_the_dashboard_samples_the_engine_process_not_its_own(tmp_path) -> None:
    """The terminal dashboard trains in a child it starts after its screen: the pane follows that child."""
    from engine.recorder import Recorder
    from tui.app import DashboardApp
    from tui.engine_process import ChildRun

    run = ChildRun(None)
    app = DashboardApp(run, Recorder(), run_dir=str(tmp_path))
    app.sample_system()
    assert app.monitor.process.pid is None  # not started yet: dashes, not the screen's own figures
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        run.proc = proc
        app.sample_system()
        assert app.monitor.process.pid == proc.pid != os.getpid()
        assert app.monitor.sample().process.threads == 1
    finally:
        proc.kill()
        proc.wait()
