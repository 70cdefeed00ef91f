"""Headless runs: readable progress lines instead of the dashboard."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from engine.events import Event

from .format import EMPTY_RESPONSE, fmt_duration

__all__ = ["EMPTY_RESPONSE", "ConsoleSink"]


class ConsoleSink:
    """Prints a progress line about once a second (every step when steps are slow), and every event of note."""

    def __init__(self, out: TextIO | None = None, interval: float = 1.0) -> None:
        self.out = out or sys.stdout
        self.interval = interval
        self._last = 0.0
        self.total = 0
        self._t0 = time.time()
        self._step0 = 0
        self._tps_avg = 0.0

    def _print(self, line: str) -> None:
        try:
            print(line, file=self.out, flush=True)
        except (BrokenPipeError, ValueError):
            pass

    def _progress(self, line: str) -> None:
        """Progress of long work (tokenizing, test responses) goes to stderr."""
        try:
            print(f"gpt-tui: {line}", file=sys.stderr, flush=True)
        except (BrokenPipeError, ValueError):
            pass

    def emit(self, e: Event) -> None:
        t = e.type
        if t == "start":
            self.total = e.total_steps  # type: ignore[attr-defined]
            self._step0 = e.resumed_step  # type: ignore[attr-defined]
            self._t0 = time.time()
            trainable = e.n_trainable if e.n_trainable and e.n_trainable != e.n_params else None  # type: ignore[attr-defined]
            tr = f" ({trainable:,} trainable)" if trainable else ""
            lr = f", lr {e.peak_lr:g}" if e.peak_lr else ""  # type: ignore[attr-defined]
            self._print(
                f"run {e.run_dir}: {e.n_params:,} parameters{tr}, {e.device} {e.dtype}, "  # type: ignore[attr-defined]
                f"{e.total_steps} steps ({e.steps_per_epoch}/epoch){lr}"  # type: ignore[attr-defined]
            )
            if e.resumed_from:  # type: ignore[attr-defined]
                self._print(f"resumed from {e.resumed_from} at step {e.resumed_step}")  # type: ignore[attr-defined]
            for c in e.config_changes:  # type: ignore[attr-defined]
                self._print(f"changed on resume: {c}")
        elif t == "step":
            now = time.time()
            done = e.step - self._step0  # type: ignore[attr-defined]
            if now - self._last >= self.interval or e.step == self.total or done <= 1:  # type: ignore[attr-defined]
                self._last = now
                el = now - self._t0
                eta = el / max(1, done) * (self.total - e.step) + e.end_phase_s  # type: ignore[attr-defined]
                flag = " SKIPPED" if e.skipped else ""  # type: ignore[attr-defined]
                self._print(
                    f"step {e.step:>6}/{self.total} | epoch {e.epoch + 1} | loss {e.loss:.4f} | "  # type: ignore[attr-defined]
                    f"lr {e.lr:.2e} | {e.tokens_per_sec:,.0f} tok/s | ETA {fmt_duration(eta)}{flag}"  # type: ignore[attr-defined]
                )
        elif t == "eval":
            self._print(f"eval  step {e.step}: train loss {e.train_loss:.4f} | val loss {e.val_loss:.4f}")  # type: ignore[attr-defined]
        elif t == "sample":
            text = e.text.replace("\n", " ")  # type: ignore[attr-defined]
            if e.expected is not None:  # type: ignore[attr-defined]  # instruction finetuning
                ask = e.prompt.replace("\n", " ")[:80]  # type: ignore[attr-defined]
                want = e.expected.replace("\n", " ")[:120]  # type: ignore[attr-defined]
                said = repr(text[:160]) if text.strip() else EMPTY_RESPONSE
                self._print(f"sample step {e.step}: {ask} -> {said} (expected {want!r})")
            else:
                self._print(f"sample step {e.step} · epoch {e.epoch + 1}: {text[:200]}")  # type: ignore[attr-defined]
        elif t == "checkpoint":
            self._print(f"checkpoint: {e.path}")  # type: ignore[attr-defined]
        elif t == "log" and e.level in ("warning", "error", "target"):  # type: ignore[attr-defined]
            self._print(f"{e.level}: {e.message}")  # type: ignore[attr-defined]
        elif t == "log" and e.level == "progress":  # type: ignore[attr-defined]
            self._progress(e.message)  # type: ignore[attr-defined]
        elif t == "log" and e.level == "info" and e.message.startswith("wrote "):  # type: ignore[attr-defined]
            self._print(e.message)  # type: ignore[attr-defined]
        elif t == "change":
            self._print(f"step {e.step}: {e.setting.replace('_', '-')} {e.old} -> {e.new} "  # type: ignore[attr-defined]
                        f"(from {e.source})")  # type: ignore[attr-defined]
        elif t == "state" and e.state in ("finished", "stopped", "paused"):  # type: ignore[attr-defined]
            self._print(f"{e.state}: {e.message}" if e.message else e.state)  # type: ignore[attr-defined]
