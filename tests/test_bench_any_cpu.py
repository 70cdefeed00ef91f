"""`gpt-tui bench` on any CPU: native precisions only, bounded probes, peaks kept with their conditions."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from tests.conftest import run_cli

NO_BF16 = "processor : 0\nmodel name : Test CPU\nflags : fpu sse2 avx avx2 fma\n"


@pytest.fixture
def no_native_bf16(tmp_path, monkeypatch):
    """A cpuinfo without avx512_bf16/amx: what an AVX2-only CPU reports."""
    p = tmp_path / "cpuinfo"
    p.write_text(NO_BF16)
    monkeypatch.setenv("GPT_TUI_CPUINFO", str(p))
    return p


def test_only_native_dtypes_are_measured(no_native_bf16) -> None:
    from engine.bench import device_peaks
    from engine.device import cpu_has_native_bf16, native_dtypes

    assert not cpu_has_native_bf16() and native_dtypes(torch.device("cpu")) == ["fp32"]
    peaks = device_peaks(torch.device("cpu"), size=256, budget_s=0.5)
    assert [p.dtype for p in peaks] == ["fp32"]
    assert device_peaks(torch.device("cpu"), ["bf16"], size=256) == []  # asked for, not native: skipped


def test_native_bf16_is_detected_from_the_flags(tmp_path, monkeypatch) -> None:
    from engine.device import native_dtypes

    p = tmp_path / "cpuinfo"
    p.write_text(NO_BF16.replace("avx2", "avx2 avx512_bf16 amx_bf16"))
    monkeypatch.setenv("GPT_TUI_CPUINFO", str(p))
    assert native_dtypes(torch.device("cpu")) == ["fp32", "bf16"]


def test_a_probe_is_bounded_by_its_time_budget_and_reports_progress() -> None:
    from engine.device import measure_matmul_peak

    seen: list[str] = []
    t0 = time.perf_counter()
    flops, size = measure_matmul_peak(torch.device("cpu"), "bf16", size=4096, budget_s=0.3, progress=seen.append)
    took = time.perf_counter() - t0
    assert flops > 0 and 256 <= size <= 4096
    assert took < 3.0, took  # a fixed 4096-square probe of 6 products would take far longer where bf16 is emulated
    assert seen and seen[0].startswith("measuring the bf16 matmul peak (256x256)")


def _store(**cond):
    from engine.device import store_measured_peak

    return store_measured_peak("cpu", "fp32", cond.pop("flops"), **cond)


def test_a_peak_taken_under_load_is_kept_with_its_conditions_and_not_trusted() -> None:
    from engine.device import entry_is_trusted, measured_peak, stored_peak_entry

    cores = os.cpu_count() or 1
    quiet = dict(load_avg=0.0, threads=torch.get_num_threads(), cores=cores)
    _store(flops=100e9, **quiet)
    assert entry_is_trusted(stored_peak_entry("cpu", "fp32"))
    # Measured again under load at a lower figure: the quiet figure stays (a low peak would inflate MFU).
    assert _store(flops=40e9, load_avg=2.0 * cores, threads=quiet["threads"], cores=cores) == 100e9
    assert measured_peak("cpu", "fp32") == 100e9
    # A higher figure replaces it whatever the load; one measured under load is not trusted later.
    _store(flops=120e9, load_avg=2.0 * cores, threads=quiet["threads"], cores=cores)
    entry = stored_peak_entry("cpu", "fp32")
    assert entry["flops"] == 120e9 and entry["load_avg"] == 2.0 * cores and not entry_is_trusted(entry)
    # Fewer threads than today's: not trusted either.
    _store(flops=130e9, load_avg=0.0, threads=0, cores=cores)
    assert not entry_is_trusted(stored_peak_entry("cpu", "fp32"))


def test_the_older_bare_figure_is_read_and_re_measured(tmp_path) -> None:
    from engine.corpus import cache_dir
    from engine.device import entry_is_trusted, measured_peak, stored_peak_entry

    with open(os.path.join(cache_dir(), "peak_flops.json"), "w") as f:
        json.dump({"cpu:fp32": 5e10}, f)
    assert measured_peak("cpu", "fp32") == 5e10
    assert not entry_is_trusted(stored_peak_entry("cpu", "fp32"))  # conditions unknown: measure again


def test_peak_flops_on_a_fresh_install_probes_off_the_calling_thread(no_native_bf16, monkeypatch) -> None:
    import engine.device as D

    monkeypatch.setattr(D, "_probes", {})
    monkeypatch.setattr(D, "_probed", {})
    monkeypatch.setattr(D, "_probe_allowed", [True])
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    assert D.peak_flops(cpu, "fp32") is None  # nothing stored yet: returns at once, the probe runs beside
    assert time.perf_counter() - t0 < 0.2
    probe = D._probes["cpu:fp32"]
    assert probe is not D.threading.current_thread()
    probe.join(5)
    assert not probe.is_alive()
    got = D.peak_flops(cpu, "fp32")
    assert got and got > 0 and D.measured_peak("cpu", "fp32") == got  # cached in GPT_TUI_CACHE
    entry = D.stored_peak_entry("cpu", "fp32")
    assert {"load_avg", "threads", "cores", "cpu", "date"} <= set(entry)
    assert D.peak_flops(cpu, "bf16") is None and "cpu:bf16" not in D._probes  # not native here: never probed


def test_a_short_process_waits_for_its_probe_at_exit(tmp_path) -> None:
    import subprocess
    import sys

    code = ("import torch, engine.device as D; D.allow_peak_probe(True); "
            "print(D.peak_flops(torch.device('cpu'), 'fp32'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "GPT_TUI_CACHE": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr
    assert "terminate" not in r.stderr
    assert json.loads((tmp_path / "peak_flops.json").read_text())["cpu:fp32"]["flops"] > 0


def test_the_training_table_fits_80_columns_with_whole_headers(monkeypatch, capsys) -> None:
    from engine.bench import PeakResult, TrainResult
    from tui.cmd_speed import render

    monkeypatch.setenv("COLUMNS", "80")
    row = TrainResult("gpt2", 16, 1024, "bigram", 50257, "bf16", "cuda", 16, 124_400_000, 3, 1.2345,
                      1_234_567.0, 7.4e8, 0.456, book_step_time=2.5, book_tokens_per_sec=654_321.0)
    rep = {"machine": {"date": "d", "cpu": "c", "cores": 2, "torch": "t", "device": "cpu", "threads": 2},
           "peaks": [PeakResult("cpu", "fp32", 1.9e11, 2048, "measured under load", 3.5)],
           "train": [row, TrainResult(**{**row.__dict__, "preset": "small", "book_tokens_per_sec": None,
                                         "book_step_time": None})]}
    render(rep)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    header = next(line for line in out.splitlines() if "preset" in line and "MFU" in line)
    for h in ("preset", "BxT", "tokens", "dtype", "params", "step", "tok/s", "MFU", "book tok/s", "ratio"):
        assert h in header, header
    assert "…" not in out and "measured under load (2048x2048, load 3.5)" in out


@pytest.mark.slow
def test_bench_finishes_quickly_where_bf16_is_not_native(no_native_bf16) -> None:
    t0 = time.perf_counter()
    r = run_cli("bench", "--presets", "tiny", "--steps", "2", "--json", env={"GPT_TUI_CPUINFO": str(no_native_bf16)},
                timeout=300)
    took = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [p["dtype"] for p in rep["peaks"]] == ["fp32"]
    assert rep["train"][0]["dtype"] == "fp32" and rep["train"][0]["mfu"] is not None
    assert took < 120, took  # under a minute of measuring on a quiet 2-core machine; slack for a shared one


def test_a_first_run_shows_mfu_without_running_bench(corpus, tmp_path, monkeypatch) -> None:
    """Fresh install (empty GPT_TUI_CACHE): the quick probe's figure reaches the step events."""
    import engine.device as D
    from engine.trainer import Trainer
    from tests.conftest import tiny_config

    monkeypatch.setattr(D, "_probes", {})
    monkeypatch.setattr(D, "_probed", {})
    monkeypatch.setattr(D, "_probe_allowed", [True])
    assert D.measured_peak("cpu", "fp32") is None

    class Sink:
        def __init__(self) -> None:
            self.events: list = []

        def emit(self, ev) -> None:
            self.events.append(ev)

            if getattr(ev, "type", "") == "step" and ev.step == 1:
                D._probes["cpu:fp32"].join(5)  # a slow shared machine: let the probe end before step 2

    sink = Sink()
    tr = Trainer(tiny_config(corpus, tmp_path / "run", max_steps=4, eval_every=0), sink)
    tr.setup()
    tr.fit()
    mfu = [ev.mfu for ev in sink.events if getattr(ev, "type", "") == "step"]
    assert len(mfu) == 4 and all(m is not None and 0 < m < 1 for m in mfu[1:]), mfu
    assert D.measured_peak("cpu", "fp32")  # cached for the next run
