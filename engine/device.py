"""Device, precision and thread choices."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
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
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
    so the training thread reuses what the previous step freed. Measured on ``gpt2`` at
    2 x 256 in a training thread, 20 steps, runs alternating: 1.26-1.30 s -> 1.06-1.10 s a
    step, page faults 4.5 M -> 0.95 M, RSS 3.1 -> 3.5-3.8 GB (flat after the first steps).
    Process-wide and only for glibc (Linux); ``GPT_TUI_MALLOC=default`` leaves the allocator
    alone. Call it before starting threads. Returns whether it applied.
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

    OpenMP threads that must share a core with other work stall each other at every op:
    on a loaded 2-core box (load average 7) the tiny preset trained at 700-4,000 tokens/s
    on 2 threads and 11,000-14,000 on 1 (small: 185 against 465). So beside the dashboard
    a run leaves out a core for each whole unit of load average (keeping at least one).
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
    """The device's peak FLOP/s for MFU: given, known (GPU table), or measured (or given) earlier by `gpt-tui bench`."""
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in GPU_PEAK_FLOPS.items():
            if k in name:
                return v if dtype != "fp32" else v / 2  # TF32 runs at half the bf16 rate
    return measured_peak(device.type, dtype)


def _peak_file() -> str:
    from .corpus import cache_dir

    return os.path.join(cache_dir(), "peak_flops.json")


def measured_peak(device_type: str, dtype: str) -> float | None:
    try:
        with open(_peak_file()) as f:
            return json.load(f).get(f"{device_type}:{dtype}")
    except (OSError, json.JSONDecodeError):
        return None


def store_measured_peak(device_type: str, dtype: str, flops: float) -> None:
    path = _peak_file()
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError):
        d = {}
    d[f"{device_type}:{dtype}"] = flops
    with open(path, "w") as f:
        json.dump(d, f)


def memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    if device.type == "mps":
        try:
            return torch.mps.current_allocated_memory() / 2**20
        except Exception:  # noqa: BLE001
            return None
    return None
