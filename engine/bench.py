"""Standard speed measurements of this machine: the library behind ``gpt-tui bench``.

Everything here returns plain dataclasses; the CLI draws the table. Training throughput
is measured with the real :class:`~engine.trainer.Trainer` at a preset's default flags
(tokenizer, learning rate, dropout, dtype, threads, fused AdamW), so the numbers are what
``gpt-tui train`` does. The comparison trains the book's ``GPTModel`` (PyPI package
``llms-from-scratch``) at the same configuration on the same batches, in a child process
with Python's and glibc's defaults (as its users run it), its steps interleaved with ours so
that a busy machine slows both alike.

MFU is model FLOPs (``GPT.flops_per_token``) per second over the device's peak: on a CPU
the peak is measured here with large matmuls in fp32 and bf16 and stored for the trainer
and dashboard (:func:`engine.device.store_measured_peak`); on a GPU it comes from the
table in :mod:`engine.device` or a given value.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .device import (
    GPU_PEAK_FLOPS,
    cpu_name,
    measure_conditions,
    measure_matmul_peak,
    memory_mb,
    native_dtypes,
    peak_flops,
    store_measured_peak,
    taken_under_load,
)
from .errors import GptTuiError
from .events import NullSink
from .model import GPT
from .recorder import Recorder

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------ machine facts
def machine_info(device: torch.device) -> dict[str, Any]:
    """Date, device, CPU, core count, torch version and threads: the table's header."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": str(device),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_avg"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ------------------------------------------------------------------ peak FLOP/s
@dataclass
class PeakResult:
    device: str
    dtype: str
    flops: float
    size: int
    source: str  # measured, measured under load, table or given
    load_avg: float | None = None  # the 1-minute load average when it was measured


def device_peaks(device: torch.device, dtypes: Sequence[str] | None = None, given: float | None = None,
                 size: int = 2048, store: bool = True, budget_s: float = 3.0,
                 progress: Progress = _quiet) -> list[PeakResult]:
    """The peaks MFU is measured against: given, the GPU table, or measured with matmuls.

    Only the precisions the device runs natively are measured (``dtypes`` defaults to them; a
    bf16 matmul on a CPU without AVX-512 BF16 or AMX is emulated and tens of times slower),
    each probe bounded by ``budget_s``. Given and measured peaks are stored with the conditions
    they were taken under (``store``), so the trainer and dashboard show MFU against them; a
    GPU in the table keeps the table's figure.
    """
    out = []
    native = native_dtypes(device)
    for dt in dtypes if dtypes is not None else native:
        cond: dict[str, Any] = {}
        known = peak_flops(device, dt) if device.type == "cuda" and not given else None
        if given:
            res = PeakResult(str(device), dt, given, 0, "given")
        elif known and any(k in torch.cuda.get_device_name(device) for k in GPU_PEAK_FLOPS):
            res = PeakResult(str(device), dt, known, 0, "table")
        elif dt not in native:
            continue
        else:
            cond = measure_conditions(device)
            flops, n = measure_matmul_peak(device, dt, size, budget_s=budget_s, progress=progress)
            res = PeakResult(str(device), dt, flops, n, "measured", cond.get("load_avg"))  # type: ignore[arg-type]
            if taken_under_load(cond):
                res.source = "measured under load"
        if store and res.source != "table":
            source = "given" if res.source == "given" else "measured"
            store_measured_peak(device.type, dt, res.flops, source=source, **({"size": res.size, **cond} if cond else {}))
        out.append(res)
    return out


# ------------------------------------------------------------------ memory
def rss_mb() -> float | None:
    """Resident memory of this process in MiB (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory over a block: CUDA's allocator peak, else the process RSS sampled every few ms."""

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.base: float | None = None
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.base = rss_mb() if self.device.type == "cpu" else memory_mb(self.device)
            self.peak = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> float | None:
        return rss_mb() if self.device.type == "cpu" else memory_mb(self.device)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            v = self._read()
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            v = self._read()
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v

    @property
    def kind(self) -> str:
        return "allocated" if self.device.type in ("cuda", "mps") else "rss"


# ------------------------------------------------------------------ training
@dataclass
class TrainResult:
    """Training throughput of one preset (and of the book's model beside it, when compared)."""

    preset: str
    batch_size: int
    context: int
    tokenizer: str
    vocab_size: int
    dtype: str
    device: str
    threads: int
    n_params: int
    steps: int
    step_time: float
    tokens_per_sec: float
    flops_per_token: float
    mfu: float | None
    peak_memory_mb: float | None = None
    memory_kind: str = ""
    loss: float | None = None
    data_time: float | None = None
    book_step_time: float | None = None
    book_tokens_per_sec: float | None = None
    book_loss: float | None = None

    @property
    def ratio(self) -> float | None:
        """Our tokens/sec over the book's (same model, batch and data)."""
        if not self.book_tokens_per_sec:
            return None
        return self.tokens_per_sec / self.book_tokens_per_sec


def bench_config(preset: str, data: list[str] | None = None, batch_size: int | None = None,
                 context: int | None = None, **overrides: Any) -> TrainConfig:
    """A run config at the preset's default flags (only what is given overridden)."""
    kw: dict[str, Any] = dict(preset=preset, data=list(data or []), eval_every=0, sample_every="0",
                              max_steps=1_000_000, warmup_steps=0)
    if batch_size:
        kw["batch_size"] = batch_size
    if context:
        kw["context"] = context
    kw.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**kw)
    cfg.validate()
    return cfg


@contextlib.contextmanager
def bench_trainer(cfg: TrainConfig) -> Iterator[Any]:
    """A set-up Trainer writing into a temporary run directory (removed afterwards)."""
    from .setup import prepare_process
    from .trainer import Trainer

    prepare_process(cfg)  # as a training run would have it
    with tempfile.TemporaryDirectory(prefix="gpt-tui-bench-") as d:
        cfg = cfg.replace(out=os.path.join(d, "run"))
        trainer = Trainer(cfg, NullSink())
        trainer.setup()
        try:
            yield trainer
        finally:
            if trainer.metrics is not None:
                trainer.metrics.close()


def _import_book_model() -> Any:
    try:
        from llms_from_scratch.ch04 import GPTModel
    except ImportError:
        raise GptTuiError(
            "--compare needs the book's code, the package llms-from-scratch, which is not installed",
            "pip install --no-deps llms-from-scratch (its GPTModel needs only torch)",
        ) from None
    return GPTModel


def book_model(book_cfg: dict[str, Any], seed: int, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The book's GPTModel (``book_cfg`` in its ch04 keys), with its fp32 AdamW (ch05)."""
    gpt_model = _import_book_model()
    torch.manual_seed(seed)
    model = gpt_model(book_cfg).to(device)
    model.train()
    # As the book's train_model_simple is called in ch05: AdamW(lr=0.0004, weight_decay=0.1).
    return model, torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)


def book_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One step of the book's train_model_simple (calc_loss_batch, backward, step)."""
    opt.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    return float(loss.detach())


def _book_worker(conn: Any, book_cfg: dict[str, Any], seed: int, device: str, threads: int) -> None:
    """Child process: trains the book's model on the batches it is sent, replying (seconds, loss)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the parent's; it closes this process
    torch.set_num_threads(threads)
    dev = torch.device(device)
    model, opt = book_model(book_cfg, seed, device)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        x, y = (torch.from_numpy(a).to(dev) for a in msg)
        t0 = time.perf_counter()
        loss = book_step(model, opt, x, y)
        _sync(dev)
        conn.send((time.perf_counter() - t0, loss))


class BookProcess:
    """The book's GPTModel training in its own process, one step per :meth:`step` call.

    A separate process runs the book's code as its users run it: this process's settings
    (the allocator tuning of :func:`engine.device.keep_freed_memory`, the trainer's torch
    flags) do not apply there. Steps still take turns with ours, so load slows both alike.
    """

    def __init__(self, trainer: Any) -> None:
        import multiprocessing as mp

        _import_book_model()  # a missing package is reported here, not in the child
        mc = trainer.model.cfg
        book_cfg = {"vocab_size": mc.vocab_size, "context_length": mc.context_length, "emb_dim": mc.n_embd,
                    "n_heads": mc.n_head, "n_layers": mc.n_layer, "drop_rate": mc.dropout, "qkv_bias": mc.qkv_bias}
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_book_worker, daemon=True, name="gpt-tui-bench-book", args=(
            child, book_cfg, trainer.cfg.seed, str(trainer.device), torch.get_num_threads()))
        self._proc.start()
        child.close()
        self._recv()

    def _lost(self) -> GptTuiError:
        self._proc.join(5)
        return GptTuiError(f"the book's model process stopped (exit code {self._proc.exitcode}; "
                           "a negative code is the signal that ended it, -9 often out of memory)",
                           "compare at a smaller --batch-size or --context, or see the error above")

    def _recv(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise self._lost() from None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Train one step on (x, y); returns its wall time in seconds and its loss."""
        try:
            self._conn.send((x.cpu().numpy(), y.cpu().numpy()))
        except OSError:
            raise self._lost() from None
        return self._recv()

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send(None)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()


def bench_train(cfg: TrainConfig, steps: int = 3, warmup: int = 1, compare: bool = False,
                progress: Progress = _quiet) -> TrainResult:
    """Median step time of ``steps`` training steps after ``warmup`` (and the book's, interleaved)."""
    with bench_trainer(cfg) as tr:
        name = cfg.preset
        book = BookProcess(tr) if compare else None
        device = tr.device
        ours: list[float] = []
        theirs: list[float] = []
        data_times: list[float] = []
        loss = book_loss = None
        try:
            with PeakMemory(device) as mem:
                for i in range(warmup + steps):
                    label = "warm-up" if i < warmup else f"step {i - warmup + 1}/{steps}"
                    progress(f"{name}: {label}")
                    t0 = time.perf_counter()
                    tr.batches.get(tr.step, 0)
                    data_times.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    loss = float(tr.run_step())
                    _sync(device)
                    dt = time.perf_counter() - t0
                    if i >= warmup:
                        ours.append(dt)
                    if book is not None:
                        progress(f"{name}: {label} (book's model)")
                        x, y = tr.batches.get(tr.step - 1, 0)
                        book_time, book_loss = book.step(x, y)
                        if i >= warmup:
                            theirs.append(book_time)
        finally:
            if book is not None:
                book.close()
        step_time = statistics.median(ours)
        tps = tr.tokens_per_step() / step_time
        fpt = tr.model.flops_per_token(tr.context)
        peak = peak_flops(device, tr.dtype)
        res = TrainResult(
            preset=name, batch_size=cfg.batch_size, context=tr.context, tokenizer=tr.tokenizer.spec()["type"],
            vocab_size=tr.tokenizer.vocab_size, dtype=tr.dtype, device=str(device), threads=torch.get_num_threads(),
            n_params=tr.model.num_params(), steps=steps, step_time=step_time, tokens_per_sec=tps,
            flops_per_token=fpt, mfu=fpt * tps / peak if peak else None,
            peak_memory_mb=mem.peak, memory_kind=mem.kind, loss=loss,
            data_time=statistics.median(data_times),
        )
        if theirs:
            res.book_step_time = statistics.median(theirs)
            res.book_tokens_per_sec = tr.tokens_per_step() / res.book_step_time
            res.book_loss = book_loss
        return res


# ------------------------------------------------------------------ threads
@dataclass
class ThreadsResult:
    """Training tokens/sec of one preset at each torch thread count (steps interleaved)."""

    preset: str
    load_avg: float | None
    tokens_per_sec: dict[int, float]

    @property
    def best(self) -> int:
        return max(self.tokens_per_sec, key=lambda k: self.tokens_per_sec[k])


def bench_threads(cfg: TrainConfig, counts: Sequence[int], steps: int = 3, warmup: int = 1,
                  progress: Progress = _quiet) -> ThreadsResult:
    """Median step at each thread count, the counts taking turns step by step (CPU only)."""
    before = torch.get_num_threads()
    times: dict[int, list[float]] = {n: [] for n in counts}
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    try:
        with bench_trainer(cfg) as tr:
            for i in range(warmup + steps):
                for n in counts:
                    progress(f"{cfg.preset}: {n} thread(s), {'warm-up' if i < warmup else f'step {i - warmup + 1}/{steps}'}")
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    tr.run_step(advance=n == counts[-1])
                    if i >= warmup:
                        times[n].append(time.perf_counter() - t0)
            per_step = tr.tokens_per_step()
    finally:
        torch.set_num_threads(before)
    return ThreadsResult(cfg.preset, load, {n: per_step / statistics.median(v) for n, v in times.items()})


# ------------------------------------------------------------------ optimizer
@dataclass
class OptimizerResult:
    """AdamW step time on one preset's parameters: for-loop (torch's CPU default), foreach, fused."""

    preset: str
    n_params: int
    step_ms: dict[str, float]

    @property
    def fused_speedup(self) -> float | None:
        base, fused = self.step_ms.get("for-loop"), self.step_ms.get("fused")
        return base / fused if base and fused else None


def bench_optimizer(preset: str, vocab_size: int = 50257, steps: int = 5, device: str = "cpu",
                    progress: Progress = _quiet) -> OptimizerResult:
    """Median AdamW step of each implementation on the same parameters and gradients, interleaved."""
    from .device import resolve_device
    from .model import preset_config

    dev = resolve_device(device)
    model = GPT(preset_config(preset, vocab_size=vocab_size)).to(dev)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    kinds = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # as in training
    opts = {k: torch.optim.AdamW([dict(g) for g in groups], lr=1e-4, betas=(0.9, 0.95), **kw)
            for k, kw in kinds.items()}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with torch.no_grad():
        for i in range(steps + 1):
            progress(f"{preset}: AdamW steps {i + 1}/{steps + 1}")
            for k, opt in opts.items():
                t0 = time.perf_counter()
                opt.step()
                _sync(dev)
                if i:
                    times[k].append(time.perf_counter() - t0)
    return OptimizerResult(preset, model.num_params(), {k: statistics.median(v) * 1000 for k, v in times.items()})


# ------------------------------------------------------------------ generation
@dataclass
class GenerateResult:
    preset: str
    dtype: str
    prompt_tokens: int
    new_tokens: int
    cached_tokens_per_sec: float
    uncached_tokens_per_sec: float

    @property
    def speedup(self) -> float:
        return self.cached_tokens_per_sec / self.uncached_tokens_per_sec


def bench_generate(cfg: TrainConfig, new_tokens: int = 64, prompt_tokens: int = 16,
                   progress: Progress = _quiet) -> GenerateResult:
    """Greedy decoding tokens/sec of a fresh model with the KV cache and with full recomputation."""
    from .sampling import SampleSettings, generate

    with bench_trainer(cfg) as tr:
        model: GPT = tr.model
        n_prompt = min(prompt_tokens, max(1, model.cfg.context_length - 1))
        idx = torch.randint(0, tr.tokenizer.vocab_size, (1, n_prompt), device=tr.device)
        rates = {}
        for use_cache in (True, False):
            progress(f"{cfg.preset}: generating {new_tokens} tokens {'with' if use_cache else 'without'} the KV cache")
            settings = SampleSettings(max_new_tokens=new_tokens, temperature=0.0, top_k=None, seed=0,
                                      stop_at_eot=False, use_cache=use_cache)
            generate(model, idx, SampleSettings(max_new_tokens=2, temperature=0.0, use_cache=use_cache),
                     autocast=tr.autocast)  # warm-up
            t0 = time.perf_counter()
            generate(model, idx, settings, autocast=tr.autocast)
            _sync(tr.device)
            rates[use_cache] = new_tokens / (time.perf_counter() - t0)
        return GenerateResult(cfg.preset, tr.dtype, n_prompt, new_tokens, rates[True], rates[False])


# ------------------------------------------------------------------ tokenization
@dataclass
class TokenizeResult:
    tokenizer: str
    corpus: str
    megabytes: float
    seconds: float
    tokens: int

    @property
    def mb_per_sec(self) -> float:
        return self.megabytes / self.seconds


@contextlib.contextmanager
def _cache_dir(path: str) -> Iterator[None]:
    old = os.environ.get("GPT_TUI_CACHE")
    os.environ["GPT_TUI_CACHE"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GPT_TUI_CACHE", None)
        else:
            os.environ["GPT_TUI_CACHE"] = old


def bench_tokenize(data: list[str] | None = None, tokenizers: Sequence[str] = ("gpt2", "char"),
                   progress: Progress = _quiet) -> list[TokenizeResult]:
    """Throughput of tokenizing a corpus into the token cache (a fresh cache: no hit)."""
    from .data import build_char_tokenizer, load_tokens, resolve_sources, tokenize_to_cache
    from .tokenizer import GPT2Tokenizer

    files = resolve_sources(list(data or []))
    size = sum(os.path.getsize(f) for f in files) / 2**20
    label = ", ".join(os.path.basename(f) for f in files)
    out = []
    for name in tokenizers:
        progress(f"tokenizing {label} ({size:.1f} MB) with {name}")
        with tempfile.TemporaryDirectory(prefix="gpt-tui-bench-") as d, _cache_dir(d):
            bpe = GPT2Tokenizer() if name == "gpt2" else None  # the BPE tables load once per process
            t0 = time.perf_counter()
            tok = bpe or build_char_tokenizer(files)  # char: the vocabulary pass is part of the work
            n = len(load_tokens(tokenize_to_cache(files, tok)))
            out.append(TokenizeResult(name, label, size, time.perf_counter() - t0, n))
    return out


# ------------------------------------------------------------------ launch
@dataclass
class LaunchResult:
    command: str
    to_setup: float | None
    to_first_step: float | None


def time_to_first_step(command: Sequence[str], run_dir: str, timeout: float = 600,
                       env: dict[str, str] | None = None) -> LaunchResult:
    """Seconds from launching ``command`` (a training run writing ``run_dir``) to its first step.

    Read from the run's ``metrics.jsonl``: the start event (setup done) and the first step
    event's end, each against the wall clock just before the process was started.
    """
    from .events import read_metrics

    t0 = time.time()
    proc = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    recs = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if proc.returncode != 0 and not recs:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GptTuiError(f"the timed training run failed: {last}", "run the command by hand to see why")
    start = next((r["time"] for r in recs if r.get("type") == "start"), None)
    step = next((r["time"] for r in recs if r.get("type") == "step"), None)
    return LaunchResult(" ".join(command), start - t0 if start else None, step - t0 if step else None)


# ------------------------------------------------------------------ memory over a long run
@dataclass
class SoakResult:
    steps: int
    samples: list[tuple[int, float]] = field(default_factory=list)  # (step, rss MiB)
    recorder_points: int = 0
    recorder_max_points: int = 0

    def growth_mb(self, after_fraction: float = 0.25) -> float | None:
        """RSS growth from the first sample past ``after_fraction`` of the run to the last."""
        pts = [(s, m) for s, m in self.samples if s >= after_fraction * self.steps]
        if len(pts) < 2:
            return None
        return pts[-1][1] - pts[0][1]


class _RssSampler:
    """Sink that records the process RSS every ``every`` steps (and forwards to a Recorder)."""

    def __init__(self, recorder: Recorder, every: int) -> None:
        self.recorder = recorder
        self.every = every
        self.samples: list[tuple[int, float]] = []

    def emit(self, event: Any) -> None:
        self.recorder.emit(event)
        if event.type == "step" and event.step % self.every == 0:
            self.recorder.snapshot()  # what the dashboard does several times a second
            mb = rss_mb()
            if mb is not None:
                self.samples.append((event.step, mb))


def memory_soak(cfg: TrainConfig, samples: int = 20, max_points: int = 4096) -> SoakResult:
    """Train ``cfg`` (its max_steps) with a dashboard's Recorder as the sink, sampling RSS as it goes."""
    from .trainer import Trainer

    steps = cfg.max_steps or 1000
    recorder = Recorder(max_points=max_points)
    sampler = _RssSampler(recorder, max(1, steps // samples))
    with tempfile.TemporaryDirectory(prefix="gpt-tui-soak-") as d:
        tr = Trainer(cfg.replace(out=os.path.join(d, "run")), sampler)
        tr.setup()
        tr.fit()
    return SoakResult(steps, sampler.samples, len(recorder.snapshot().steps), max_points)


# ------------------------------------------------------------------ report
def to_json(report: dict[str, Any]) -> str:
    """The report as JSON (dataclasses expanded, derived ratios included)."""

    def conv(o: Any) -> Any:
        if isinstance(o, list):
            return [conv(x) for x in o]
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if hasattr(o, "__dataclass_fields__"):
            d = asdict(o)
            for extra in ("ratio", "speedup", "mb_per_sec", "fused_speedup", "best"):
                if hasattr(type(o), extra):
                    d[extra] = getattr(o, extra)
            return d
        return o

    return json.dumps(conv(report), indent=2)
