"""Tokenizing a large text file: the former single-threaded path against ``gpt-tui prepare``'s parallel one.

Builds ``../shared/data/tinyshakespeare/input.txt`` repeated to ``--mb`` MB in a temporary
folder, then tokenizes it with GPT-2 BPE twice, each in a fresh process:

* ``single``: the token cache's former path -- 4 MB chunks cut at line ends, each
  ``encode_ordinary``-ed in the one process and appended to the token file;
* ``parallel``: :func:`engine.data.tokenize_to_cache` with worker processes on all cores
  (each reads, decodes and encodes its 8 MB range; the parent only writes arrays).

It checks that both give the same tokens and prints MB/s, the ratio and the peak RSS of
each (the parent, and the largest worker).

    python benchmarks/bench_tokenize.py             # 200 MB (the figure in the README)
    python benchmarks/bench_tokenize.py --mb 20     # a quick smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SOURCE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CHUNK = 4 << 20


def build(path: Path, mb: int) -> int:
    text = SOURCE.read_bytes()
    target = mb * 1_000_000
    with open(path, "wb") as f:
        n = 0
        while n < target:
            f.write(text)
            n += len(text)
    return n


def single(src: str, out: str) -> None:
    """The former path of the token cache, for GPT-2 BPE."""
    from engine.tokenizer import GPT2Tokenizer

    enc = GPT2Tokenizer().enc
    with open(src, "rb") as f, open(out, "wb") as o:
        rest = b""
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n")
            if cut < 0 or len(block) < CHUNK // 2:
                cut = len(block) - 1
            piece, rest = block[: cut + 1], block[cut + 1 :]
            np.asarray(enc.encode_ordinary(piece.decode("utf-8")), dtype=np.uint16).tofile(o)
        if rest:
            np.asarray(enc.encode_ordinary(rest.decode("utf-8")), dtype=np.uint16).tofile(o)


def parallel(src: str, out: str, workers: int | None) -> None:
    from engine.data import tokenize_to_cache
    from engine.tokenizer import GPT2Tokenizer

    os.replace(tokenize_to_cache([src], GPT2Tokenizer(), workers=workers), out)


def child(mode: str, src: str, out: str, workers: int | None) -> None:
    t0 = time.perf_counter()
    if mode == "single":
        single(src, out)
    else:
        parallel(src, out, workers)
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"secs": secs, "rss_mb": rss, "worker_rss_mb": kids}))


def run(mode: str, src: Path, tmp: Path, workers: int | None) -> dict:
    out = tmp / f"{mode}.bin"
    env = dict(os.environ, GPT_TUI_CACHE=str(tmp / "cache"))
    cmd = [sys.executable, __file__, "--child", mode, str(src), str(out)]
    if workers:
        cmd += ["--workers", str(workers)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode:
        sys.exit(f"{mode} run failed:\n{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["sha"] = hashlib.sha256(out.read_bytes()).hexdigest()
    res["tokens"] = out.stat().st_size // 2
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="Size of the file to tokenize, in MB (default 200).")
    ap.add_argument("--workers", type=int, default=None, help="Worker processes of the parallel path (default: all cores).")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.workers)
        return
    if not SOURCE.exists():
        sys.exit(f"{SOURCE} is absent: this benchmark needs ../shared/data beside the repository")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = tmp / "corpus.txt"
        size = build(src, args.mb)
        os.environ["GPT_TUI_CACHE"] = str(tmp / "cache")
        from engine.tokenizer import gpt2_encoding

        gpt2_encoding()  # the vocabulary's compact copy in the cache, so neither run pays its one-off parsing
        print(f"{size / 1e6:.0f} MB of tinyshakespeare, {os.cpu_count()} cores")
        res = {m: run(m, src, tmp, args.workers) for m in ("single", "parallel")}
    if res["single"]["sha"] != res["parallel"]["sha"]:
        sys.exit("the two paths gave different tokens")
    for m, r in res.items():
        print(f"{m:9s} {size / 1e6 / r['secs']:6.2f} MB/s  {r['secs']:6.1f} s  {r['tokens']:,} tokens  "
              f"peak RSS {r['rss_mb']:.0f} MB" + (f" (largest worker {r['worker_rss_mb']:.0f} MB)" if m == "parallel" else ""))
    print(f"ratio     {res['single']['secs'] / res['parallel']['secs']:.2f}x")


if __name__ == "__main__":
    main()
