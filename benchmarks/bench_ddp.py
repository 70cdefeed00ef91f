"""Data-parallel scaling: training tokens/sec with 1 rank and with N ranks under torchrun, side by side.

Each rank keeps the same micro-batch (weak scaling), so N ranks see N times the tokens per step;
the ratio is N-rank tokens/sec over 1-rank tokens/sec (ideal: N). Tokens/sec is the median over
the steps after a warm-up, as the trainer reports it (all ranks' tokens).

    python benchmarks/bench_ddp.py                      # CPU, gloo: 1 vs 2 ranks
    python benchmarks/bench_ddp.py --device cuda --ranks 1,2,4,8 --preset small --batch-size 16

On a CPU the ranks share the cores: give each rank ``--threads`` so that ranks x threads fits.
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
from pathlib import Path

BIN = Path(sys.executable).parent


def run(ranks: int, args: argparse.Namespace, work: Path) -> float:
    """Median tokens/sec of a short headless run on ``ranks`` processes."""
    out = work / f"ranks-{ranks}"
    train = ["train", "--headless", "--preset", args.preset, "--batch-size", str(args.batch_size),
             "--max-steps", str(args.steps + args.warmup), "--eval-every", "0", "--sample-every", "0",
             "--device", args.device, "--out", str(out)]
    if args.context:
        train += ["--context", str(args.context)]
    if args.device == "cpu":
        train += ["--threads", str(args.threads), "--dtype", "fp32"]
    gpt_tui = str(BIN / "gpt-tui")
    if ranks == 1:
        cmd = [gpt_tui, *train]
    else:
        torchrun = shutil.which("torchrun", path=str(BIN)) or "torchrun"
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(ranks), gpt_tui, *train]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{ranks}-rank run failed:\n{r.stderr[-2000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [s["tokens_per_sec"] for s in steps if s["type"] == "step" and s["step"] > args.warmup]
    return statistics.median(tps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2", help="comma list of rank counts (the first is the baseline)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--steps", type=int, default=20, help="measured steps")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    args = p.parse_args()
    counts = [int(x) for x in args.ranks.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        results = {n: run(n, args, Path(tmp)) for n in counts}
    base = results[counts[0]]
    print(f"preset {args.preset}, batch {args.batch_size} per rank, {args.device}"
          + (f", {args.threads} thread(s) per rank" if args.device == "cpu" else ""))
    print(f"{'ranks':>5}  {'tokens/sec':>12}  {'scaling':>8}  {'efficiency':>10}")
    for n in counts:
        ratio = results[n] / base
        print(f"{n:>5}  {results[n]:>12,.0f}  {ratio:>7.2f}x  {ratio / (n / counts[0]):>9.0%}")


if __name__ == "__main__":
    main()
