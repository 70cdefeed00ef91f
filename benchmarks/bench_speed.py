"""Training speed side by side with the book's code, in one run: ``gpt-tui bench --compare``.

Trains gpt-tui and the book's GPTModel (``pip install --no-deps llms-from-scratch``) at the
same configuration on the same batches, steps interleaved, and prints both tokens/sec and
the ratio per preset, with the matmul peak, MFU and the AdamW implementations side by side.
Extra arguments go to ``gpt-tui bench``::

    python benchmarks/bench_speed.py                                   # tiny, small, gpt2 at default flags
    python benchmarks/bench_speed.py --presets small --steps 2         # a quick look
    python benchmarks/bench_speed.py --save bench.json                 # also keep the numbers
"""

from __future__ import annotations

import sys

from tui.cli import app

if __name__ == "__main__":
    app(["bench", "--compare", "--only", "peak,train,optimizer", *sys.argv[1:]])
