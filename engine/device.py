"""Device, precision and thread choices."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import sys
import threading
import time
from collections.abc import Callable

import torch

from .errors import GptTuiError

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common GPUs, by a substring of the device name.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 125e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GptTuiError(
                "CUDA was asked for, but this torch sees no CUDA GPU",
                "use --device cpu (or auto), or install a CUDA build of torch on a machine with an NVIDIA GPU",
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GptTuiError(f"{name} does not exist ({torch.cuda.device_count()} GPU(s))", "use --device cuda:0")
        return dev
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise GptTuiError("MPS was asked for, but it is not available here", "use --device cpu (MPS needs Apple silicon and macOS 12.3+)")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise GptTuiError(f"unknown device {name!r}", "choose auto, cpu, cuda, cuda:N or mps")


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 matmuls natively (AVX-512 BF16 or AMX)."""
    try:  # GPT_TUI_CPUINFO: another cpuinfo file, to check how a CPU without these flags is treated
        with open(os.environ.get("GPT_TUI_CPUINFO") or "/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_dtypes(device: torch.device) -> list[str]:
    """The precisions this device multiplies matrices in natively (the only ones whose peak is measured)."""
    if device.type == "cuda":
        return ["fp32", "bf16" if torch.cuda.is_bf16_supported() else "fp16"]
    if device.type == "cpu":
        return ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]
    return ["fp32"]


def resolve_dtype(name: str, device: torch.device) -> str:
    """Precision of autocast: fp32, bf16 or fp16."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_has_native_bf16() else "fp32"
        return "fp32"  # MPS: lower precision gives NaNs and wrong results for many users
    if name == "fp16" and device.type == "cpu":
        raise GptTuiError("fp16 autocast is not supported on CPU", "use --dtype bf16 or fp32 on CPU")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise GptTuiError("this GPU does not support bf16", "use --dtype fp16")
    return name


def autocast_factory(device: torch.device, dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype == "fp32":
        return contextlib.nullcontext
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=tdt)


def setup_device_flags(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for the next step (CPU training).

    By default glibc serves allocations above 128 kB (a threshold that it moves up to 32 MB)
    with a fresh ``mmap``, unmaps them on free and trims the heap's free top, so each step's
    tensors (activations, the weights cast to bf16, the head's and the embedding's gradients)
    are page-faulted in and zeroed by the kernel again. Here every block comes from the heap,
    the heap keeps its free memory (up to 2 GB at its top), and all threads share one arena,
    so the training thread reuses what the previous step freed (the figures are in the README's
    speed section). Process-wide and only for glibc (Linux); ``GPT_TUI_MALLOC=default`` leaves
    the allocator alone. Call it before starting threads. Returns whether it applied.
    """
    if os.environ.get("GPT_TUI_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
        return all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def default_threads(with_ui: bool) -> int:
    """Torch threads for CPU training: every core headless; beside the dashboard, the cores not busy.

    OpenMP threads that must share a core with other work stall each other at every op (on a
    loaded 2-core box 2 threads ran several times slower than 1), so beside the dashboard a run
    leaves out a core for each whole unit of load average (keeping at least one).
    """
    n = os.cpu_count() or 1
    if not with_ui:
        return max(1, n)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(n, n - int(busy)))


def peak_flops(device: torch.device, dtype: str, override: float | None = None) -> float | None:
    """The device's peak FLOP/s for MFU: given, known (GPU table), or measured.

    A measured peak comes from ``gpt-tui bench`` or, where none is stored (or the stored one was
    taken under load or with fewer threads), from a quick probe started here on a thread of its
    own: this call then returns None and a later one returns the probe's figure.
    """
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in GPU_PEAK_FLOPS.items():
            if k in name:
                return v if dtype != "fp32" else v / 2  # TF32 runs at half the bf16 rate
    key = f"{device.type}:{dtype}"
    with _probe_lock:
        if key in _probes:  # probing (None until it is done), or probed in this process
            return _probed.get(key)
    entry = _stored_entry(device.type, dtype)
    if entry is not None and entry_is_trusted(entry):
        return float(entry["flops"])
    if _probe_allowed[0] and device.type == "cpu" and dtype in native_dtypes(device):
        start_peak_probe(device, dtype)  # a figure taken under load would inflate MFU: none until re-measured
        return None
    return float(entry["flops"]) if entry else None


# ------------------------------------------------------------------ measured peaks
_probe_lock = threading.Lock()
_probes: dict[str, threading.Thread] = {}
_probed: dict[str, float] = {}
_probe_allowed = [os.environ.get("GPT_TUI_NO_PEAK_PROBE", "") in ("", "0")]
LOADED_FRACTION = 0.5  # a 1-minute load average above this share of the cores: "taken under load"


def allow_peak_probe(allowed: bool) -> None:
    """Whether :func:`peak_flops` may start a quick probe (off while ``gpt-tui bench`` times things)."""
    _probe_allowed[0] = allowed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_peak(device: torch.device, dtype: str, size: int = 2048, budget_s: float = 2.0,
                        progress: Callable[[str], None] | None = None) -> tuple[float, int]:
    """Best FLOP/s of square matmuls in ``dtype`` on ``device`` within about ``budget_s`` seconds.

    Sizes double from 256 up to ``size`` while the time allows, so a slow dtype ends early
    instead of running a fixed number of large products. Returns (FLOP/s, largest size timed).
    """
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    # A private generator: a probe running beside training must not draw from the run's RNG streams.
    gen = torch.Generator(device=device).manual_seed(0)
    t_end = time.perf_counter() + budget_s
    best, n, timed = 0.0, min(256, size), 0
    while True:
        if progress:
            progress(f"measuring the {dtype} matmul peak ({n}x{n})")
        a = torch.randn(n, n, device=device, generator=gen).to(tdt)
        b = torch.randn(n, n, device=device, generator=gen).to(tdt)
        a @ b  # warm-up: kernels chosen, pages touched
        _sync(device)
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            dt = time.perf_counter() - t0
            best = max(best, 2.0 * n**3 / max(dt, 1e-9))
            if time.perf_counter() + dt > t_end:
                break
        timed = n
        # The next size costs about 8x this one: go on only where that fits the budget.
        if n >= size or time.perf_counter() + 8 * 2 * dt > t_end:
            return best, timed
        n *= 2


def measure_conditions(device: torch.device) -> dict[str, object]:
    """What a measurement depends on: the machine's load when it was taken, threads, cores, CPU."""
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"load_avg": load, "threads": torch.get_num_threads(), "cores": os.cpu_count() or 1,
            "cpu": cpu_name() if device.type == "cpu" else device.type, "date": time.strftime("%Y-%m-%d %H:%M")}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else the platform's)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def taken_under_load(entry: dict) -> bool:
    load, cores = entry.get("load_avg"), entry.get("cores") or os.cpu_count() or 1
    return load is not None and load > LOADED_FRACTION * cores


def entry_is_trusted(entry: dict) -> bool:
    """A stored peak counts when it was given, or measured quietly here with at least today's threads."""
    if entry.get("source") == "given":
        return True
    if "load_avg" not in entry or taken_under_load(entry):
        return False
    if entry.get("cpu") and entry.get("cpu") not in (cpu_name(), "cuda", "mps"):
        return False
    return int(entry.get("threads") or 0) >= torch.get_num_threads()


def start_peak_probe(device: torch.device, dtype: str, budget_s: float = 0.3) -> threading.Thread:
    """Measure the peak quickly on a daemon thread and store it (the engine thread does not wait)."""
    key = f"{device.type}:{dtype}"

    def probe() -> None:
        cond = measure_conditions(device)
        try:
            flops, size = measure_matmul_peak(device, dtype, size=1024, budget_s=budget_s)
        except RuntimeError:
            old = measured_peak(device.type, dtype)
            if old:
                _probed[key] = old
            return
        _probed[key] = store_measured_peak(device.type, dtype, flops, source="probe", size=size, **cond)

    with _probe_lock:
        if key in _probes:
            return _probes[key]
        t = threading.Thread(target=probe, name=f"peak-probe-{key}", daemon=True)
        if not _probes:
            atexit.register(_join_probes)
        _probes[key] = t
    t.start()
    return t


def _join_probes() -> None:
    """At exit, let a running probe end (under a second) rather than tear torch down beneath it."""
    for t in list(_probes.values()):
        if t.is_alive():
            t.join(2.0)


def _peak_file() -> str:
    from .corpus import cache_dir

    return os.path.join(cache_dir(), "peak_flops.json")


def _read_peaks() -> dict:
    try:
        with open(_peak_file()) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def _stored_entry(device_type: str, dtype: str) -> dict | None:
    v = _read_peaks().get(f"{device_type}:{dtype}")
    if isinstance(v, (int, float)):  # the older format: a bare figure, conditions unknown
        return {"flops": float(v)}
    return v if isinstance(v, dict) and "flops" in v else None


def measured_peak(device_type: str, dtype: str) -> float | None:
    """The stored peak FLOP/s (given or measured), whatever the conditions it was taken under."""
    entry = _stored_entry(device_type, dtype)
    return float(entry["flops"]) if entry else None


def stored_peak_entry(device_type: str, dtype: str) -> dict | None:
    """The stored peak with the conditions it was taken under (load_avg, threads, cores, cpu, date)."""
    return _stored_entry(device_type, dtype)


def store_measured_peak(device_type: str, dtype: str, flops: float, source: str = "measured",
                        **conditions: object) -> float:
    """Store a peak with its conditions; returns the peak now stored.

    A given peak always replaces the stored one. A measured one replaces it unless the stored
    new one was taken under load at a figure no higher than the stored one (a peak measured under
    load is too low and would inflate MFU).
    """
    d = _read_peaks()
    key = f"{device_type}:{dtype}"
    new = {"flops": float(flops), "source": source, **conditions}
    old = _stored_entry(device_type, dtype)
    if source != "given" and old is not None and taken_under_load(new) and float(old["flops"]) >= new["flops"]:
        return float(old["flops"])
    d[key] = new
    path = _peak_file()
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(d, f)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return new["flops"]


def memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    if device.type == "mps":
        try:
            return torch.mps.current_allocated_memory() / 2**20
        except Exception:  # noqa: BLE001
            return None
    return None
