"""``gpt-tui prepare``: tokenize corpora ahead of training, on all cores, into the token cache."""

from __future__ import annotations

import os
import sys
import time

import typer

from .common import friendly_errors


def _fmt_eta(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


class PrepareBar:
    """A one-line progress bar on stderr: bytes, documents, tokens, MB/s, ETA."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = 0.0

    def __call__(self, st) -> None:
        done = st.done_bytes >= st.total_bytes
        now = time.monotonic()
        if not done and now - self.last < (0.2 if self.tty else 2.0):
            return
        self.last = now
        fresh = st.done_bytes - st.reused_bytes
        rate = fresh / max(st.elapsed, 1e-9) / 1e6
        left = (st.total_bytes - st.done_bytes) / 1e6 / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * st.done_bytes / max(1, st.total_bytes))
        line = (f"tokenizing [{'#' * filled}{'.' * (width - filled)}] {st.done_bytes / 1e6:,.1f}/"
                f"{st.total_bytes / 1e6:,.1f} MB  {st.documents:,} docs  {st.tokens:,} tokens  "
                f"{rate:.1f} MB/s  ETA {_fmt_eta(left)}")
        end = "\n" if done or not self.tty else "\r"
        print(line, end=end, file=self.stream, flush=True)


def register(app: typer.Typer) -> None:
    """Add ``gpt-tui prepare`` to ``app``."""

    @app.command()
    @friendly_errors
    def prepare(
        data: list[str] = typer.Argument(..., help="Text, .jsonl(.gz) or .parquet files, folders, globs or named corpora."),
        tokenizer: str = typer.Option("gpt2", "--tokenizer", help="gpt2 (default) or char."),
        out: str = typer.Option(None, "--out", help="Cache directory (default $GPT_TUI_CACHE or ~/.cache/gpt-tui)."),
        text_field: str = typer.Option("text", "--text-field", help="Field of the text in .jsonl/.parquet records."),
        workers: int = typer.Option(None, "--workers", help="Worker processes (default: all cores)."),
    ) -> None:
        """Tokenize DATA into the memory-mapped token cache that `gpt-tui train --data` reads."""
        from engine.data import build_char_tokenizer, load_tokens, resolve_sources, tokenize_to_cache
        from engine.errors import GptTuiError
        from engine.tokenizer import GPT2Tokenizer, check_tokenizer_name

        check_tokenizer_name(tokenizer)
        if workers is not None and workers < 1:
            raise GptTuiError(f"--workers must be at least 1, got {workers}", "give e.g. --workers 2")
        if out:
            os.makedirs(out, exist_ok=True)
            os.environ["GPT_TUI_CACHE"] = os.path.abspath(out)
        files = resolve_sources(list(data))
        tok = build_char_tokenizer(files, text_field) if tokenizer == "char" else GPT2Tokenizer()
        t0 = time.perf_counter()
        path = tokenize_to_cache(files, tok, text_field=text_field, stats=PrepareBar(), workers=workers)
        n = len(load_tokens(path))
        secs = time.perf_counter() - t0
        print(f"{n:,} tokens from {len(files)} file(s) in {secs:.1f}s -> {path}", file=sys.stderr)
        print(path)
