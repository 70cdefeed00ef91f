"""``gpt-tui bench``: standard speed measurements of this machine, as a table or JSON.

Training tokens/sec and MFU per preset at the default flags (``--compare``: beside the
book's GPTModel on the same batches), generation with and without the KV cache,
tokenization MB/s, time from launch to the first step, and peak memory of ``gpt2`` at
batch 2 x 256. The measurements live in :mod:`engine.bench`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import typer

from .common import fail, friendly_errors

PARTS = ("peak", "train", "threads", "optimizer", "generate", "tokenize", "launch", "memory")


def parse_presets(spec: str) -> list[tuple[str, int | None, int | None]]:
    """``tiny,small,gpt2:2x256`` -> [(preset, batch or None, context or None), ...]."""
    from engine.model import PRESETS

    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, shape = item.partition(":")
        if name not in PRESETS:
            fail(f"unknown preset {name!r} in --presets: choose from {', '.join(PRESETS)}")
        batch = ctx = None
        if shape:
            b, x, t = shape.partition("x")
            if not (b.isdigit() and x and t.isdigit() and int(b) > 0 and int(t) > 0):
                fail(f"bad shape {shape!r} for {name} in --presets: write BATCHxCONTEXT, e.g. {name}:2x256")
            batch, ctx = int(b), int(t)
        out.append((name, batch, ctx))
    if not out:
        fail("--presets is empty: give e.g. --presets tiny,small,gpt2")
    return out


def parse_parts(only: str | None, skip: str | None) -> set[str]:
    def names(s: str, flag: str) -> set[str]:
        got = {p.strip() for p in s.split(",") if p.strip()}
        bad = got - set(PARTS)
        if bad:
            fail(f"unknown part(s) {', '.join(sorted(bad))} in {flag}: choose from {', '.join(PARTS)}")
        return got

    parts = names(only, "--only") if only else set(PARTS)
    if skip:
        parts -= names(skip, "--skip")
    return parts


class _Progress:
    """A spinner line on stderr with the running part and its elapsed time (steps can take minutes)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=Console(stderr=True), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task("starting", total=None)
        return self

    def __call__(self, message: str) -> None:
        if self._progress is not None:
            self._progress.reset(self._task, description=message)
        elif self.enabled:
            print(message, file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def _fmt_si(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f} {suffix}{unit}"
    return f"{v:.0f} {unit}".strip()


def _fmt_rate(v: float | None) -> str:
    return "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")


def _fmt_short_rate(v: float | None) -> str:
    """At most 7 characters: 14,348 or 1.23 M."""
    return _fmt_rate(v) if v is None or v < 1e6 else f"{v / 1e6:.2f} M"


def _fmt_step(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _table(title: str) -> Any:
    """A table that fits 80 columns: one space between columns, no side borders."""
    from rich import box
    from rich.table import Table

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False)


def _peaks(con: Any, peaks: list[Any]) -> None:
    t = _table("Device peak (matmul)")
    for c in ("dtype", "FLOP/s", "source"):
        t.add_column(c)
    for p in peaks:
        cond = [f"{p.size}x{p.size}"] if p.size else []
        cond += [f"load {p.load_avg}"] if p.load_avg is not None else []
        t.add_row(p.dtype, _fmt_si(p.flops, "FLOP/s"), p.source + (f" ({', '.join(cond)})" if cond else ""))
    con.print(t)


def _train(con: Any, rows: list[Any]) -> None:
    compare = any(r.book_tokens_per_sec for r in rows)
    t = _table("Training (default flags; median step after warm-up)")
    cols = ["preset", "BxT", "tokens", "dtype", "params", "step", "tok/s", "MFU"]
    cols += ["book tok/s", "ratio"] if compare else ["peak mem"]
    for c in cols:
        t.add_column(c, justify="right" if c not in ("preset", "tokens", "dtype") else "left", no_wrap=True,
                     min_width=len(c))
    for r in rows:
        row = [r.preset, f"{r.batch_size}x{r.context}", r.tokenizer, r.dtype, _fmt_si(r.n_params),
               _fmt_step(r.step_time), _fmt_short_rate(r.tokens_per_sec),
               f"{r.mfu * 100:.1f}%" if r.mfu is not None else "-"]
        if compare:
            row += [_fmt_short_rate(r.book_tokens_per_sec), f"{r.ratio:.2f}x" if r.ratio else "-"]
        else:
            row += [f"{r.peak_memory_mb:,.0f} MB {r.memory_kind}" if r.peak_memory_mb else "-"]
        t.add_row(*row)
    con.print(t)


def _threads(con: Any, rows: list[Any]) -> None:
    t = _table("Torch threads (training tokens/s, steps interleaved)")
    counts = sorted({n for r in rows for n in r.tokens_per_sec})
    for c in ["preset", "load avg", *(f"{n} thread{'s' if n > 1 else ''}" for n in counts)]:
        t.add_column(c)
    for r in rows:
        t.add_row(r.preset, f"{r.load_avg}", *(_fmt_rate(r.tokens_per_sec.get(n)) for n in counts))
    con.print(t)


def _optimizer(con: Any, rows: list[Any]) -> None:
    t = _table("AdamW step (same parameters and gradients)")
    for c in ("preset", "params", "for-loop (torch CPU default)", "foreach", "fused (ours)", "fused speed-up"):
        t.add_column(c)
    for o in rows:
        ms = o.step_ms
        t.add_row(o.preset, _fmt_si(o.n_params), *(f"{ms[k]:,.1f} ms" for k in ("for-loop", "foreach", "fused")),
                  f"{o.fused_speedup:.1f}x" if o.fused_speedup else "-")
    con.print(t)


def _generate(con: Any, rows: list[Any]) -> None:
    t = _table("Generation (greedy, batch 1)")
    for c in ("preset", "dtype", "prompt + new", "KV cache tok/s", "recompute tok/s", "speed-up"):
        t.add_column(c)
    for g in rows:
        t.add_row(g.preset, g.dtype, f"{g.prompt_tokens} + {g.new_tokens}", _fmt_rate(g.cached_tokens_per_sec),
                  _fmt_rate(g.uncached_tokens_per_sec), f"{g.speedup:.1f}x")
    con.print(t)


def _tokenize(con: Any, rows: list[Any]) -> None:
    t = _table("Tokenization (into the token cache)")
    for c in ("tokenizer", "corpus", "MB", "tokens", "MB/s"):
        t.add_column(c)
    for r in rows:
        t.add_row(r.tokenizer, r.corpus, f"{r.megabytes:.2f}", f"{r.tokens:,}", f"{r.mb_per_sec:.2f}")
    con.print(t)


def _launch(con: Any, la: Any) -> None:
    sec = lambda v: "-" if v is None else f"{v:.2f} s"  # noqa: E731
    con.print(f"Launch: setup done after {sec(la.to_setup)}, first step after {sec(la.to_first_step)} "
              f"([dim]{la.command}[/])")


def _memory(con: Any, r: Any) -> None:
    con.print(f"Peak memory, {r.preset} at batch {r.batch_size} x {r.context} ({r.dtype}): "
              f"{r.peak_memory_mb:,.0f} MB {r.memory_kind}" if r.peak_memory_mb else "Peak memory: -")


def _soak(con: Any, s: Any) -> None:
    g = s.growth_mb()
    con.print(f"Memory over {s.steps:,} steps of tiny: growth {g:+.1f} MB after the first quarter; "
              f"recorder holds {s.recorder_points} of at most {s.recorder_max_points} points"
              if g is not None else "Memory soak: too few samples")


SECTIONS = {"peaks": _peaks, "train": _train, "threads": _threads, "optimizer": _optimizer, "generate": _generate,
            "tokenize": _tokenize, "launch": _launch, "memory": _memory, "soak": _soak}
"""Each part of a report and how it is drawn, in the order they are shown."""


def render(report: dict[str, Any]) -> None:
    """Draw the report as rich tables on stdout; headers are never cut at 80 columns."""
    from rich.console import Console

    con = Console()
    m = report["machine"]
    gpu = f" · {m['gpu']}" if m.get("gpu") else ""
    con.print(f"[bold]gpt-tui bench[/] {m['date']} · {m['cpu']} · {m['cores']} cores{gpu} · torch {m['torch']} · "
              f"{m['device']}, {m['threads']} threads · load {m.get('load_avg', '-')}")
    for key, draw in SECTIONS.items():
        if report.get(key):
            draw(con, report[key])


@dataclass
class BenchOptions:
    """What ``gpt-tui bench`` was asked to measure."""

    parts: set[str]
    presets: list[tuple[str, int | None, int | None]]
    steps: int
    warmup: int
    batch_size: int | None
    context: int | None
    compare: bool
    data: list[str]
    device: str
    dtype: str
    threads: int | None
    peak: float | None
    gen_tokens: int
    gen_presets: list[tuple[str, int | None, int | None]]
    opt_presets: list[tuple[str, int | None, int | None]]
    thread_presets: list[tuple[str, int | None, int | None]]
    memory: tuple[str, int | None, int | None]
    soak: int
    compile: bool = False

    def config(self, preset: str, batch_size: int | None = None, context: int | None = None, **kw: Any) -> Any:
        from engine.bench import bench_config

        return bench_config(preset, batch_size=batch_size, context=context, data=self.data, device=self.device,
                            dtype=self.dtype, threads=self.threads, **kw)


def _launch_command(o: BenchOptions, run: str) -> list[str]:
    cmd = [sys.executable, "-m", "tui.cli", "train", "--headless", "--max-steps", "1", "--out", run,
           "--device", o.device, "--dtype", o.dtype]
    for f in o.data:
        cmd += ["--data", f]
    if o.threads:
        cmd += ["--threads", str(o.threads)]
    return cmd


def _time_launch(o: BenchOptions, progress: Any) -> Any:
    from engine import bench as B

    progress("timing launch to first step (gpt-tui train --headless --max-steps 1)")
    with tempfile.TemporaryDirectory(prefix="gpt-tui-bench-") as d:
        run = os.path.join(d, "run")
        return B.time_to_first_step(_launch_command(o, run), run)


def run_parts(o: BenchOptions, dev: Any, progress: Any) -> dict[str, Any]:
    """Measure each part asked for; the report ``render`` and ``to_json`` take."""
    from engine import bench as B

    report: dict[str, Any] = {"machine": B.machine_info(dev)}
    p = o.parts
    if "peak" in p:
        progress("measuring the matmul peak")
        report["peaks"] = B.device_peaks(dev, given=o.peak, progress=progress)
    if "train" in p:
        report["train"] = [B.bench_train(o.config(n, b or o.batch_size, t or o.context, compile=o.compile or None),
                                         steps=o.steps,
                                         warmup=o.warmup, compare=o.compare, progress=progress) for n, b, t in o.presets]
    if "threads" in p and dev.type == "cpu":
        counts = sorted({1, max(1, (os.cpu_count() or 2) // 2), os.cpu_count() or 1})
        report["threads"] = [B.bench_threads(o.config(n, b, t), counts, steps=o.steps, warmup=o.warmup,
                                             progress=progress) for n, b, t in o.thread_presets]
    if "optimizer" in p:
        report["optimizer"] = [B.bench_optimizer(n, steps=o.steps, device=o.device, progress=progress)
                               for n, _, _ in o.opt_presets]
    if "generate" in p:
        report["generate"] = [B.bench_generate(o.config(n, b, t), o.gen_tokens, progress=progress)
                              for n, b, t in o.gen_presets]
    if "tokenize" in p:
        report["tokenize"] = B.bench_tokenize(o.data or None, progress=progress)
    if "launch" in p:
        report["launch"] = _time_launch(o, progress)
    if "memory" in p:
        n, b, t = o.memory
        report["memory"] = B.bench_train(o.config(n, b or 2, t or 256), steps=1, warmup=1, progress=progress)
    if o.soak:
        progress(f"training tiny for {o.soak:,} steps (memory soak)")
        report["soak"] = B.memory_soak(o.config("tiny", max_steps=o.soak))
    return report


def register(app: typer.Typer) -> None:
    """Add ``gpt-tui bench`` to ``app``."""

    @app.command()
    @friendly_errors
    def bench(
        presets: str = typer.Option("tiny,small,gpt2", "--presets", help="Presets to train, comma-separated; PRESET:BxT sets batch and context (e.g. gpt2:2x256)."),
        steps: int = typer.Option(3, "--steps", help="Timed training steps per preset (the median is reported)."),
        warmup: int = typer.Option(1, "--warmup", help="Untimed steps first."),
        batch_size: int = typer.Option(None, "--batch-size", "-b", help="Batch size for every preset (default: the train default, 8)."),
        context: int = typer.Option(None, "--context", help="Context for every preset (default: the preset's)."),
        compare: bool = typer.Option(False, "--compare", help="Train the book's GPTModel (pip install --no-deps llms-from-scratch) beside ours and print the ratio."),
        data: list[str] = typer.Option(None, "--data", "-d", help="Corpus for training and tokenization (default: the embedded python-docs)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (the train default), fp32, bf16, fp16."),
        threads: int = typer.Option(None, "--threads", help="Torch CPU threads (default: the train default)."),
        peak_tflops: float = typer.Option(None, "--peak-tflops", help="The device's dense peak in TFLOP/s (e.g. 989 for an H100/H200 in bf16), instead of the known-peak table."),
        compile_: bool = typer.Option(False, "--compile", help="Time the training steps with torch.compile (the first steps compile)."),
        peak: float = typer.Option(None, "--peak-flops", help="The device's peak FLOP/s for MFU (e.g. 989e12), instead of the table or a measurement."),
        gen_tokens: int = typer.Option(64, "--gen-tokens", help="New tokens per generation measurement."),
        gen_presets: str = typer.Option("small", "--gen-presets", help="Presets whose generation speed is measured."),
        opt_presets: str = typer.Option("small", "--opt-presets", help="Presets whose AdamW step is timed (for-loop, foreach, fused)."),
        thread_presets: str = typer.Option("tiny", "--thread-presets", help="Presets trained at 1, half and all CPU threads, side by side."),
        memory: str = typer.Option("gpt2:2x256", "--memory", help="PRESET:BxT whose peak training memory is reported."),
        soak: int = typer.Option(0, "--soak", help="Also train tiny for N steps and report memory growth (0: off)."),
        only: str = typer.Option(None, "--only", help=f"Run only these parts: {', '.join(PARTS)}."),
        skip: str = typer.Option(None, "--skip", help="Skip these parts."),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
        save: str = typer.Option(None, "--save", help="Also write the results as JSON to this file."),
    ) -> None:
        """Measure training, generation and tokenization speed on this machine."""
        from engine.device import allow_peak_probe, resolve_device

        for flag, v in (("--steps", steps), ("--gen-tokens", gen_tokens)):
            if v < 1:
                fail(f"{flag} must be at least 1, got {v}")
        if warmup < 0 or soak < 0:
            fail("--warmup and --soak must not be negative")
        opts = BenchOptions(
            parts=parse_parts(only, skip), presets=parse_presets(presets), steps=steps, warmup=warmup,
            batch_size=batch_size, context=context, compare=compare, data=list(data or []), device=device,
            dtype=dtype, threads=threads, peak=peak or (peak_tflops * 1e12 if peak_tflops else None), gen_tokens=gen_tokens, gen_presets=parse_presets(gen_presets),
            opt_presets=parse_presets(opt_presets), thread_presets=parse_presets(thread_presets),
            memory=parse_presets(memory)[0], soak=soak, compile=compile_)
        dev = resolve_device(device)
        if dev.type == "cpu":
            import torch

            from engine.device import default_threads

            torch.set_num_threads(threads or default_threads(False))
        allow_peak_probe(False)  # no probe beside the timed steps: the peak part measures it
        with _Progress(sys.stderr.isatty() or not as_json) as progress:
            report = run_parts(opts, dev, progress)
        from engine import bench as B

        if save:
            with open(save, "w", encoding="utf-8") as f:
                f.write(B.to_json(report) + "\n")
        if as_json:
            print(B.to_json(report))
        else:
            render(report)
