"""Training throughput under the dashboard against headless, measured side by side.

Trains the same configs with ``gpt-tui train --headless`` and with the dashboard in a real
80x24 terminal (tmux), alternating the two, and prints tokens/sec of each and their ratio
(target: at least 0.95 on a small CPU box, 0.99 on a GPU). Throughput is taken from the
step events' wall-clock times in ``metrics.jsonl`` after a warm-up, so any stall the UI
causes between steps counts. The dashboard runs with its system pane shown (m), which samples
the process, the machine and the GPU twice a second; ``--no-system-pane`` leaves it hidden. The ratio is the median of each round's dashboard/headless
pair, so a change in the machine's load between rounds cancels out.

Both modes run at the same ``--threads``: by default the count the dashboard picks on its
own now (``engine.device.default_threads(with_ui=True)``), so the ratio is the UI's cost
alone; ``--threads 0`` leaves each mode to its own default instead.

    python benchmarks/bench_dashboard.py                       # tiny and small, 3 rounds
    python benchmarks/bench_dashboard.py --presets tiny --tiny-steps 100 --rounds 1   # a quick look
    python benchmarks/bench_dashboard.py --dash-threads 1,2 --headless-threads 1   # thread counts too
    python benchmarks/bench_dashboard.py --no-system-pane      # without the system pane (m) shown
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GPT_TUI = str(Path(sys.executable).parent / "gpt-tui")


def throughput(run: Path, warmup: float = 0.2, settle_s: float = 3.0) -> float:
    """Tokens/sec from the end of the warm-up to the last step (wall clock).

    The warm-up is the first ``warmup`` fraction of the steps and at least the first
    ``settle_s`` seconds (the dashboard starts up beside the first steps).
    """
    steps = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "step":
            steps.append((rec["time"], rec["tokens_seen"]))
    if len(steps) < 3:
        raise RuntimeError(f"{run}: only {len(steps)} steps logged")
    k = max(1, int(len(steps) * warmup))
    while k < len(steps) - 2 and steps[k][0] - steps[0][0] < settle_s:
        k += 1
    k = min(k, len(steps) - 2)
    (t0, n0), (t1, n1) = steps[k], steps[-1]
    return (n1 - n0) / (t1 - t0)


def finished(run: Path) -> bool:
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return False
    return '"state": "finished"' in text or '"state": "failed"' in text


def run_headless(args: list[str], run: Path, env: dict[str, str]) -> float:
    r = subprocess.run([GPT_TUI, "train", *args, "--out", str(run), "--headless"], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"headless run failed: {r.stderr.strip()}")
    return throughput(run)


def screen(tmux: list[str]) -> str:
    return subprocess.run([*tmux, "capture-pane", "-t", "bench", "-p"], capture_output=True, text=True).stdout


def show_system_pane(tmux: list[str], run: Path, timeout: float = 60) -> None:
    """Press m once the dashboard is up, so the system pane samples (and costs) through the run."""
    deadline = time.monotonic() + timeout
    while "─ stats " not in screen(tmux):
        if time.monotonic() > deadline or finished(run):
            raise RuntimeError("the dashboard never came up")
        time.sleep(0.2)
    subprocess.run([*tmux, "send-keys", "-t", "bench", "m"], check=False)
    while "─ system " not in screen(tmux):
        if time.monotonic() > deadline:
            raise RuntimeError("m did not show the system pane")
        time.sleep(0.2)


def run_dashboard(args: list[str], run: Path, env: dict[str, str], timeout: float, system: bool = True) -> float:
    """The same run under the dashboard in an 80x24 tmux terminal (``system``: with the system pane
    shown, as m shows it); q once it has finished."""
    sock = f"bench-dash-{os.getpid()}"
    tmux = ["tmux", "-L", sock]
    envs = " ".join(f"{k}={v}" for k, v in env.items() if k in ("GPT_TUI_CACHE", "OMP_NUM_THREADS", "PYTHONPATH"))
    cmd = f"env -u COLUMNS -u LINES TERM=xterm-256color {envs} {GPT_TUI} train {' '.join(args)} --out {run}"
    subprocess.run([*tmux, "-f", "/dev/null", "new-session", "-d", "-s", "bench", "-x", "80", "-y", "24", cmd],
                   check=True)
    try:
        if system:
            show_system_pane(tmux, run)
        deadline = time.monotonic() + timeout
        while not finished(run):
            if time.monotonic() > deadline:
                raise RuntimeError("the dashboard run did not finish in time")
            time.sleep(0.5)
        time.sleep(1.0)  # let the final eval and checkpoint land
        subprocess.run([*tmux, "send-keys", "-t", "bench", "q"], check=False)
        for _ in range(60):
            if subprocess.run([*tmux, "has-session", "-t", "bench"], capture_output=True).returncode != 0:
                break
            time.sleep(0.5)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    return throughput(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small", help="comma-separated presets (default tiny,small)")
    p.add_argument("--tiny-steps", type=int, default=2000)
    p.add_argument("--small-steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3, help="headless/dashboard pairs per preset")
    p.add_argument("--data", default=None, help="training text (default: the embedded corpus)")
    p.add_argument("--threads", type=int, default=None,
                   help="--threads for every run (default: the dashboard's own choice now; 0: each mode's default)")
    p.add_argument("--dash-threads", default="", help="also run the dashboard at these torch thread counts, e.g. 1,2")
    p.add_argument("--headless-threads", default="", help="also run headless at these torch thread counts")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--device", default=None, help="--device of every run (e.g. cuda)")
    p.add_argument("--dtype", default=None, help="--dtype of every run")
    p.add_argument("--batch-size", default=None, help="--batch-size of every run")
    p.add_argument("--context", default=None, help="--context of every run")
    p.add_argument("--save", default=None, help="also write the results as JSON to this file")
    p.add_argument("--system-pane", action=argparse.BooleanOptionalAction, default=True,
                   help="show the dashboard's system pane (m) through each run (default: on; it samples at 2 Hz)")
    a = p.parse_args()
    if shutil.which("tmux") is None:
        sys.exit("bench_dashboard: tmux is needed to drive the dashboard in a real terminal (apt-get install tmux)")

    work = Path(tempfile.mkdtemp(prefix="bench-dash-"))
    env = dict(os.environ)
    env.setdefault("GPT_TUI_CACHE", str(work / "cache"))
    if a.threads is None:
        from engine.device import default_threads

        a.threads = default_threads(with_ui=True)
    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}, "
          f"threads: {a.threads or 'each mode its default'}, system pane {'on' if a.system_pane else 'off'}, "
          f"work dir {work}")
    rows = []
    for preset in a.presets.split(","):
        steps = a.tiny_steps if preset in ("tiny", "bigram") else a.small_steps
        args = ["--preset", preset, "--max-steps", str(steps), "--eval-every", "0", "--eval-batches", "1",
                "--sample-every", "0", "--seed", "1"]
        if a.data:
            args += ["--data", a.data]
        if a.threads:
            args += ["--threads", str(a.threads)]
        for flag in ("device", "dtype", "batch_size", "context"):
            if getattr(a, flag):
                args += ["--" + flag.replace("_", "-"), str(getattr(a, flag))]
        variants: list[tuple[str, list[str]]] = [("headless", []), ("dashboard", [])]
        for t in filter(None, a.headless_threads.split(",")):
            variants.append((f"headless --threads {t}", ["--threads", t]))
        for t in filter(None, a.dash_threads.split(",")):
            variants.append((f"dashboard --threads {t}", ["--threads", t]))
        results: dict[str, list[float]] = {name: [] for name, _ in variants}
        ratios: dict[str, list[float]] = {name: [] for name, _ in variants}
        for r in range(a.rounds):
            order = variants if r % 2 == 0 else variants[::-1]  # alternate, so drift in load cancels
            for name, extra in order:
                run = work / f"{preset}-{name.replace(' ', '_')}-{r}"
                if name.startswith("headless"):
                    tps = run_headless(args + extra, run, env)
                else:
                    tps = run_dashboard(args + extra, run, env, a.timeout, a.system_pane)
                results[name].append(tps)
                print(f"  {preset:<6} round {r + 1}: {name:<24} {tps:>10,.0f} tok/s", flush=True)
            for name in results:
                ratios[name].append(results[name][-1] / results["headless"][-1])
        for name, vals in results.items():
            rows.append((preset, name, statistics.median(vals), statistics.median(ratios[name]),
                         min(ratios[name]), max(ratios[name])))
    print()
    print(f"{'preset':<8}{'mode':<26}{'tok/s (median)':>16}{'vs headless':>13}{'rounds':>16}")
    for preset, name, tps, ratio, lo, hi in rows:
        print(f"{preset:<8}{name:<26}{tps:>16,.0f}{ratio:>13.3f}{f'{lo:.2f}-{hi:.2f}':>16}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if a.save:
        Path(a.save).write_text(json.dumps([dict(zip(("preset", "mode", "tokens_per_sec", "ratio", "low", "high"), r,
                                                     strict=True)) for r in rows], indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
