"""The system pane: what the training process and the machine are doing, sampled by the UI.

The dashboard samples about twice a second, from a Textual timer in the UI thread, only while
the pane is shown; the engine thread never does any of it.

* The process (the trainer's: this one, or the run's process for ``gpt-tui attach``): CPU use in
  percent of one core, threads, resident memory. On Linux from ``/proc/PID/stat`` (one small read:
  about 30 us, no dependency); elsewhere (macOS) from psutil when it is installed, else this
  process's own CPU time and peak memory from :mod:`resource`.
* The machine: available and total memory (``/proc/meminfo``; psutil or ``sysconf`` elsewhere).
* The step's data wait, from the step events (seconds spent waiting for batches).
* CUDA: utilisation, memory used/total, temperature and power through NVML (``nvidia-ml-py``, the
  ``gpu`` extra; without it the rows say how to install it). MPS: the allocated memory the step
  events carry.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from engine.events import StepEvent

from .widgets import StatsPane

GPU_HINT = "pip install 'gpt-tui[gpu]'"
SAMPLE_INTERVAL = 0.5
"""Seconds between samples while the pane is shown."""


@dataclass
class ProcessSample:
    cpu_percent: float | None = None
    """CPU time over wall time since the last sample, in percent of one core (200: two cores busy)."""
    threads: int | None = None
    rss_mb: float | None = None
    rss_is_peak: bool = False
    """Only the peak resident memory is known (no /proc, no psutil)."""


@dataclass
class GpuSample:
    util: float | None = None
    used_mb: float | None = None
    total_mb: float | None = None
    temp_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None


@dataclass
class SystemSample:
    process: ProcessSample
    mem_available_mb: float | None = None
    mem_total_mb: float | None = None
    gpu: GpuSample | None = None
    gpu_note: str = ""
    """Why there are no GPU figures (e.g. how to install NVML's bindings)."""


# ------------------------------------------------------------------ the process
class ProcessProbe:
    """CPU, threads and memory of one process (CPU% from the difference between two samples)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._last: tuple[float, float] | None = None  # (wall, cpu seconds)
        self._proc_stat = f"/proc/{pid}/stat" if pid else ""
        self._linux = bool(pid) and os.path.exists(self._proc_stat)
        self._ticks = os.sysconf("SC_CLK_TCK") if self._linux else 100
        self._page = os.sysconf("SC_PAGE_SIZE") if self._linux else 4096
        self._psutil: Any = None
        if not self._linux and pid:
            try:
                import psutil  # type: ignore[import-not-found]

                self._psutil = psutil.Process(pid)
            except Exception:  # noqa: BLE001  (not installed, or the process is gone)
                self._psutil = None

    def _read(self) -> tuple[float | None, int | None, float | None, bool]:
        """(cpu seconds, threads, rss MB, rss is the peak) now."""
        if self._linux:
            try:
                with open(self._proc_stat, "rb") as f:
                    raw = f.read()
            except OSError:
                return None, None, None, False
            fields = raw[raw.rindex(b")") + 2:].split()  # after "pid (comm) ": state is fields[0]
            cpu = (int(fields[11]) + int(fields[12])) / self._ticks
            return cpu, int(fields[17]), int(fields[21]) * self._page / 2**20, False
        if self._psutil is not None:
            try:
                with self._psutil.oneshot():
                    t = self._psutil.cpu_times()
                    return t.user + t.system, self._psutil.num_threads(), self._psutil.memory_info().rss / 2**20, False
            except Exception:  # noqa: BLE001
                return None, None, None, False
        if self.pid == os.getpid():
            import resource

            r = resource.getrusage(resource.RUSAGE_SELF)
            peak = r.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux
            import threading

            return r.ru_utime + r.ru_stime, threading.active_count(), peak, True
        return None, None, None, False

    def sample(self, now: float | None = None) -> ProcessSample:
        now = time.monotonic() if now is None else now
        cpu, threads, rss, peak = self._read()
        pct = None
        if cpu is not None:
            if self._last is not None and now > self._last[0]:
                pct = 100.0 * (cpu - self._last[1]) / (now - self._last[0])
            self._last = (now, cpu)
        return ProcessSample(pct, threads, rss, peak)


def machine_memory() -> tuple[float | None, float | None]:
    """(available, total) memory of the machine in MB."""
    try:
        with open("/proc/meminfo", "rb") as f:
            info = {}
            for line in f:
                key, _, rest = line.partition(b":")
                if key in (b"MemTotal", b"MemAvailable"):
                    info[key] = int(rest.split()[0]) / 1024
                    if len(info) == 2:
                        break
        return info.get(b"MemAvailable"), info.get(b"MemTotal")
    except OSError:
        pass
    try:
        import psutil  # type: ignore[import-not-found]

        vm = psutil.virtual_memory()
        return vm.available / 2**20, vm.total / 2**20
    except Exception:  # noqa: BLE001
        pass
    try:
        return None, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (ValueError, OSError, AttributeError):
        return None, None


# ------------------------------------------------------------------ the GPU
class NvmlProbe:
    """One CUDA device through NVML (``pynvml`` from nvidia-ml-py), opened on first use."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.note = ""
        self._nvml: Any = None
        self._handle: Any = None
        try:
            import pynvml  # type: ignore[import-not-found]
        except ImportError:
            self.note = GPU_HINT
            return
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception as e:  # noqa: BLE001  (no driver, no such device)
            self.note = f"NVML: {e}"[:60]

    def sample(self) -> GpuSample | None:
        nv, h = self._nvml, self._handle
        if nv is None:
            return None
        out = GpuSample()
        for name, read in (
            ("util", lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu)),
            ("used_mb", lambda: nv.nvmlDeviceGetMemoryInfo(h).used / 2**20),
            ("total_mb", lambda: nv.nvmlDeviceGetMemoryInfo(h).total / 2**20),
            ("temp_c", lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))),
            ("power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ("power_limit_w", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0),
        ):
            try:
                setattr(out, name, read())
            except Exception:  # noqa: BLE001, PERF203  (a figure this GPU does not report)
                pass
        return out


def cuda_index(device: str, visible: str | None = None) -> int | None:
    """NVML's index of the GPU torch calls ``cuda`` / ``cuda:N`` (None for other devices).

    NVML counts every GPU of the machine; torch counts those in ``CUDA_VISIBLE_DEVICES``, so
    ``cuda:1`` with ``CUDA_VISIBLE_DEVICES=2,3`` is NVML's 3 (UUIDs there: torch's index is kept).
    """
    if not device.startswith("cuda"):
        return None
    _, _, idx = device.partition(":")
    n = int(idx) if idx.isdigit() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None else visible
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return int(ids[n]) if n < len(ids) and ids[n].isdigit() else n


class SystemMonitor:
    """Samples the process and the machine (and the GPU the run uses); one per dashboard."""

    def __init__(self, pid: int | None) -> None:
        self.process = ProcessProbe(pid)
        self.device = ""
        self.gpu: NvmlProbe | None = None

    def set_process(self, pid: int | None) -> None:
        """The process that trains, once known (the dashboard's engine starts after its screen)."""
        if pid != self.process.pid:
            self.process = ProcessProbe(pid)

    def set_device(self, device: str) -> None:
        """The run's device, once known (``cuda:0``, ``mps``, ``cpu``)."""
        if device == self.device:
            return
        self.device = device
        index = cuda_index(device)
        self.gpu = NvmlProbe(index) if index is not None else None

    def sample(self, now: float | None = None) -> SystemSample:
        avail, total = machine_memory()
        s = SystemSample(self.process.sample(now), avail, total)
        if self.gpu is not None:
            s.gpu, s.gpu_note = self.gpu.sample(), self.gpu.note
        return s


# ------------------------------------------------------------------ the pane
def _gb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.1f}"


def _mem(mb: float | None) -> str:
    if mb is None:
        return "-"
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def system_rows(s: SystemSample | None, last: StepEvent | None, device: str, live: bool = True) -> list[tuple[str, str]]:
    """(label, value) rows of the system pane."""
    rows: list[tuple[str, str]] = []
    p = s.process if s is not None else ProcessSample()
    if not live:
        rows.append(("process", "not running"))
    else:
        cpu = f"{p.cpu_percent:.0f}%" if p.cpu_percent is not None else "-"
        rows.append(("CPU", cpu + (f" · {p.threads} threads" if p.threads is not None else "")))
        rss = _mem(p.rss_mb) + (" peak" if p.rss_is_peak and p.rss_mb is not None else "")
        rows.append(("RSS", rss))
    if s is not None and s.mem_total_mb:
        free = f"{_gb(s.mem_available_mb)} of " if s.mem_available_mb is not None else ""
        rows.append(("RAM free", f"{free}{_gb(s.mem_total_mb)} GB"))
    else:
        rows.append(("RAM free", "-"))
    if last is not None and last.step_time > 0:
        share = min(1.0, last.data_time / last.step_time)
        rows.append(("data wait", f"{1000 * last.data_time:,.1f} ms ({100 * share:.0f}%)"))
    else:
        rows.append(("data wait", "-"))
    if device.startswith("cuda"):
        rows += _gpu_rows(s)
    elif device == "mps":
        mem = last.memory_mb if last is not None else None
        rows.append(("MPS alloc", _mem(mem)))
    return rows


def _gpu_rows(s: SystemSample | None) -> list[tuple[str, str]]:
    g = s.gpu if s is not None else None
    if g is None:
        note = (s.gpu_note if s is not None else "") or GPU_HINT
        return [("GPU", note)]
    util = f"{g.util:.0f}%" if g.util is not None else "-"
    mem = f"{_gb(g.used_mb)}/{_gb(g.total_mb)} GB" if g.used_mb is not None and g.total_mb is not None else "-"
    temp = f"{g.temp_c:.0f}°C" if g.temp_c is not None else "-"
    power = "-" if g.power_w is None else f"{g.power_w:.0f} W" + (
        f" of {g.power_limit_w:.0f}" if g.power_limit_w else "")
    return [("GPU", f"{util} · {temp}"), ("GPU mem", mem), ("GPU power", power)]


class SystemPane(StatsPane):
    """The system rows, below the stats (m shows or hides it)."""
