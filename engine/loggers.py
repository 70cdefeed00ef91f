"""Copies of a run's metrics for TensorBoard and Weights & Biases (``--log``, ``gpt-tui log-export``).

``metrics.jsonl`` stays the record of a run; these sinks only copy the same events elsewhere:

* ``tensorboard``: scalars and sample text in ``RUN/tensorboard/`` (``torch.utils.tensorboard``).
* ``wandb``: the same through ``wandb`` (files in ``RUN/wandb/``; ``WANDB_MODE=offline`` keeps them
  there for a later ``wandb sync``), with the run's settings as the W&B config.

Each sink hands events to its own thread, so ``emit`` never blocks the engine. A logger that fails
(disk full, network, the library raising) is switched off and reported once through ``report``;
training goes on. Scalars are keyed ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_sec``, ``train/mfu``, ``eval/train_loss``, ``eval/val_loss`` (and ``eval/val_bpb``
when an eval event carries it) at the optimizer step; samples go under ``samples``.
"""

from __future__ import annotations

import atexit
import html
import json
import os
import queue
import secrets
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .errors import GptTuiError
from .events import Event, event_from_record, read_metrics

# name -> (module imported by the logger, its pip package)
LOGGERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}
EXTRA_INSTALL = "pip install 'gpt-tui[logging]'"
FINAL_STATES = ("finished", "stopped", "failed")

Report = Callable[[str], None]


def _as_list(names: Iterable[str] | str | None) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip().lower()
            if name and name not in out:
                out.append(name)
    return out


def check_loggers(names: Iterable[str] | str | None, flag: str = "--log") -> list[str]:
    """The loggers named (``none`` for none; commas or repeats for several), checked to be known
    and importable; raises GptTuiError (one line naming the fix) otherwise."""
    wanted = [n for n in _as_list(names) if n != "none"]
    for name in wanted:
        if name not in LOGGERS:
            raise GptTuiError(f"unknown {flag} {name!r}", f"choose {' or '.join(LOGGERS)} (repeat {flag} for both)")
    for name in wanted:
        module, package = LOGGERS[name]
        try:
            __import__(module)
        except ImportError as e:
            raise GptTuiError(
                f"{flag} {name} needs the {package} package, which cannot be imported ({_first_line(e)})",
                f"{EXTRA_INSTALL} (or just pip install {package})",
            ) from None
    return wanted


# ======================================================================== what is logged
def scalars(event: Event) -> dict[str, float]:
    """The scalars an event carries, under the names both loggers use (empty for other events)."""
    e: Any = event
    out: dict[str, float] = {}
    if event.type == "step":
        out = {"train/loss": e.loss, "train/lr": e.lr, "train/grad_norm": e.grad_norm,
               "train/tokens_per_sec": e.tokens_per_sec}
        if e.mfu is not None:
            out["train/mfu"] = e.mfu
    elif event.type == "eval":
        out = {"eval/train_loss": e.train_loss, "eval/val_loss": e.val_loss}
        bpb = getattr(e, "val_bpb", None)
        if bpb is not None:
            out["eval/val_bpb"] = bpb
    return {k: float(v) for k, v in out.items()}


def _fence(text: str) -> str:
    """A Markdown code block holding ``text`` verbatim (the fence longer than any backtick run in it)."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def sample_markdown(event: Event) -> str:
    """A sample as Markdown: the prompt and continuation verbatim; instruction samples also show
    the expected response."""
    e: Any = event
    if e.expected is not None:
        return (f"**Instruction**\n\n{_fence(e.prompt)}\n\n**Response**\n\n{_fence(e.text)}\n\n"
                f"**Expected**\n\n{_fence(e.expected)}")
    return _fence(e.prompt + e.text)


def _run_facts(start: Any) -> dict[str, Any]:
    return {"run_dir": start.run_dir, "n_params": start.n_params, "n_trainable": start.n_trainable,
            "device": start.device, "dtype": start.dtype, "total_steps": start.total_steps,
            "steps_per_epoch": start.steps_per_epoch, "world_size": start.world_size}


def _import_wandb() -> Any:
    # W&B must not write to the terminal: the dashboard draws on it (WANDB_SILENT=false shows its lines).
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb


def check_wandb_login() -> None:
    """Refuse an online W&B run without credentials: wandb would prompt for them on the terminal,
    under the dashboard. Offline and disabled modes (WANDB_MODE or ``wandb offline``) need none."""
    wandb = _import_wandb()
    try:
        from wandb.sdk.lib.wbauth import authenticate_session

        settings = wandb.setup().settings
        if str(getattr(settings, "mode", "online")) in ("offline", "dryrun", "disabled"):
            return
        auth = authenticate_session(host=settings.base_url, source="gpt-tui --log wandb", prompt=False,
                                    update_session=False)
    except Exception:  # noqa: BLE001  (another wandb version: wandb.init decides, and a failure is reported)
        return
    if auth is None:
        raise GptTuiError(
            "W&B has no login here and is not in offline mode",
            "run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to keep the W&B files in "
            "RUN/wandb for a later `wandb sync`",
        )


# ================================================================================ writers
class Writer(Protocol):
    """Writes events to one logging library, synchronously; may raise."""

    name: str

    def handle(self, event: Event) -> None: ...

    def flush(self) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class TensorBoardWriter:
    """Scalars and sample text through ``torch.utils.tensorboard.SummaryWriter`` into ``log_dir``.

    Resuming appends to the same folder: each session's event file starts with a session-start record
    (SummaryWriter's ``purge_step``) at its first step, and TensorBoard hides what earlier sessions
    logged from that step on, so each step keeps the value of the session that resumed.
    """

    name = "tensorboard"

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self._w: Any = None
        self.counts: dict[str, int] = {}

    def _writer(self, purge_step: int = 0) -> Any:
        if self._w is None:
            from torch.utils.tensorboard import SummaryWriter

            self._w = SummaryWriter(log_dir=self.log_dir, purge_step=purge_step, flush_secs=10)
        return self._w

    def handle(self, event: Event) -> None:
        e: Any = event
        if event.type == "start":
            # every session starts with a session-start record at its first step: TensorBoard takes a
            # later one as a restart and hides what the earlier sessions logged from that step on
            first = e.resumed_step + 1 if e.resumed_from else 0
            w = self._writer(first)
            text = _fence(json.dumps({"train": e.config, "run": _run_facts(e)}, indent=2, default=str))
            w.add_text("config", text, first, walltime=e.time)
            return
        values = scalars(event)
        if values:
            w = self._writer()
            for tag, v in values.items():
                w.add_scalar(tag, v, e.step, walltime=e.time)
                self.counts[tag] = self.counts.get(tag, 0) + 1
        elif event.type == "sample":
            self._writer().add_text("samples", sample_markdown(event), e.step, walltime=e.time)
            self.counts["samples"] = self.counts.get("samples", 0) + 1

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self, failed: bool = False) -> None:
        w, self._w = self._w, None
        if w is not None:
            w.close()


class WandbWriter:
    """The same scalars and samples through ``wandb``, files under ``dir``/wandb.

    ``step`` is the x axis of every metric (W&B's own step counter only counts calls), so a resumed
    run may log steps again. With ``run_id_file``, the W&B run id is kept there and a resumed run
    continues the same W&B run (``resume="allow"``); offline, each session is its own folder under
    ``wandb/`` and ``wandb sync`` merges them into that run.
    """

    name = "wandb"

    def __init__(self, dir: str, run_name: str, run_id_file: str | None = None) -> None:  # noqa: A002
        self.dir = dir
        self.run_name = run_name
        self.run_id_file = run_id_file
        self._run: Any = None
        self._failed = False
        self.counts: dict[str, int] = {}

    def _run_id(self) -> str:
        if self.run_id_file is None:
            return secrets.token_hex(4)
        try:
            with open(self.run_id_file, encoding="utf-8") as f:
                rid = f.read().strip()
            if rid:
                return rid
        except OSError:
            pass
        rid = secrets.token_hex(4)  # W&B run ids: lowercase letters and digits
        with open(self.run_id_file, "w", encoding="utf-8") as f:
            f.write(rid + "\n")
        return rid

    def _init(self, start: Any) -> Any:
        wandb = _import_wandb()
        os.makedirs(os.path.join(self.dir, "wandb"), exist_ok=True)
        config: dict[str, Any] = {}
        if start is not None:
            config = dict(start.config)
            config["run"] = _run_facts(start)
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "gpt-tui",
            name=self.run_name,
            id=self._run_id(),
            resume="allow",
            dir=self.dir,
            config=config,
            # never write to the terminal: the dashboard owns it
            settings=wandb.Settings(console="off", quiet=True, silent=True),
        )
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        self._run = run
        return run

    def handle(self, event: Event) -> None:
        e: Any = event
        if event.type == "start":
            if self._run is None:
                self._init(e)
            return
        if event.type == "failed" or (event.type == "state" and e.state == "failed"):
            self._failed = True
        values = scalars(event)
        if values:
            run = self._run or self._init(None)
            run.log({"step": e.step, **values})
            for tag in values:
                self.counts[tag] = self.counts.get(tag, 0) + 1
        elif event.type == "sample":
            wandb = _import_wandb()
            run = self._run or self._init(None)
            body = html.escape(e.prompt + e.text) if e.expected is None else (
                f"<b>Instruction</b><pre>{html.escape(e.prompt)}</pre><b>Response</b><pre>{html.escape(e.text)}"
                f"</pre><b>Expected</b><pre>{html.escape(e.expected)}</pre>")
            if e.expected is None:
                body = f"<pre>{body}</pre>"
            run.log({"step": e.step, "samples": wandb.Html(body, inject=False, data_is_not_path=True)})
            self.counts["samples"] = self.counts.get("samples", 0) + 1

    def flush(self) -> None:
        pass  # wandb streams to its own service process

    def close(self, failed: bool = False) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.finish(exit_code=1 if (failed or self._failed) else 0)


# ========================================================================= the sink
_CLOSE = object()
_OPEN: weakref.WeakSet[LoggerSink] = weakref.WeakSet()


def _stderr_report(message: str) -> None:
    try:
        print(f"gpt-tui: warning: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _describe(e: BaseException) -> str:
    text = _first_line(e)
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


class LoggerSink:
    """A sink that never blocks nor raises: events go through a queue to a thread that runs the
    writer. A writer that raises is closed and switched off, and ``report`` is told once (from the
    thread that emits or closes, never from the writer's thread)."""

    def __init__(self, writer: Writer, report: Report | None = None, max_queue: int = 100_000) -> None:
        self.writer = writer
        self.name = writer.name
        self.report = report or _stderr_report
        self._q: queue.Queue[Any] = queue.Queue(max_queue)
        self._lock = threading.Lock()
        self.error: str | None = None
        self._reported = False
        self._closed = False
        self._writer_closed = False
        self._run_failed = False
        self._thread = threading.Thread(target=self._work, name=f"gpt-tui-log-{self.name}", daemon=True)
        self._thread.start()
        _OPEN.add(self)

    @property
    def active(self) -> bool:
        return not self._closed and self.error is None

    def emit(self, event: Event) -> None:
        if self._closed:
            return
        if self.error is not None:
            self._report_once()
            return
        if event.type == "failed" or (event.type == "state" and getattr(event, "state", "") == "failed"):
            self._run_failed = True
        try:
            self._q.put_nowait(event)
        except queue.Full:
            self._fail(f"it fell behind ({self._q.maxsize} events waiting)")
            self._report_once()

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = f"{self.name} logging is off for the rest of the run: {reason}; training goes on " \
                             "and metrics.jsonl has every event"

    def _report_once(self) -> None:
        with self._lock:
            if self.error is None or self._reported:
                return
            self._reported = True
            message = self.error
        try:
            self.report(message)
        except Exception:  # noqa: BLE001  (reporting must not raise into the engine either)
            _stderr_report(message)

    def _close_writer(self) -> None:
        if self._writer_closed:
            return
        self._writer_closed = True
        try:
            self.writer.close(failed=self._run_failed)
        except Exception as e:  # noqa: BLE001
            self._fail(_describe(e))

    def _work(self) -> None:
        while True:
            event = self._q.get()
            if event is _CLOSE:
                break
            if self.error is not None:
                continue
            try:
                self.writer.handle(event)
                if event.type == "state" and getattr(event, "state", "") in FINAL_STATES:
                    self.writer.flush()
            except Exception as e:  # noqa: BLE001
                self._fail(_describe(e))
                self._close_writer()
        self._close_writer()

    def close(self, timeout: float = 60.0) -> None:
        """Write what is queued, close the writer (flushed), and report a failure not yet reported."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        try:
            self._q.put(_CLOSE, timeout=timeout)
            self._thread.join(timeout)
        except queue.Full:
            pass
        if self._thread.is_alive():
            self._fail(f"it did not finish writing within {timeout:.0f}s")
        self._report_once()


def build_loggers(names: Iterable[str] | str | None, run_dir: str, report: Report | None = None) -> list[LoggerSink]:
    """The sinks for ``--log`` (none for an empty list), writing under ``run_dir``."""
    names = check_loggers(names)
    if "wandb" in names:
        check_wandb_login()
    sinks: list[LoggerSink] = []
    for name in names:
        writer: Writer
        if name == "tensorboard":
            writer = TensorBoardWriter(os.path.join(run_dir, "tensorboard"))
        else:
            writer = WandbWriter(run_dir, os.path.basename(os.path.normpath(run_dir)),
                                 run_id_file=os.path.join(run_dir, "wandb", "gpt-tui-run-id"))
        sinks.append(LoggerSink(writer, report))
    return sinks


def close_loggers(sinks: Iterable[Any]) -> None:
    """Close the sinks of build_loggers (flushing them); never raises."""
    for s in sinks:
        try:
            s.close()
        except Exception as e:  # noqa: BLE001
            _stderr_report(f"closing a logger failed: {_describe(e)}")


@atexit.register
def _close_open_loggers() -> None:
    """A run that ended without closing its loggers (an error between setup and fit) still flushes them."""
    close_loggers(list(_OPEN))


# ============================================================================ log-export
def history(run_dir: str) -> list[Event]:
    """The events of ``RUN/metrics.jsonl`` as the run's loggers would have seen them: when a later
    session resumed from an earlier step, the points the earlier session logged after it are dropped."""
    events: list[Event] = []
    for rec in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        e: Any = event_from_record(rec)
        if e is None:
            continue
        if e.type == "eval" and rec.get("val_bpb") is not None and getattr(e, "val_bpb", None) is None:
            e.val_bpb = rec["val_bpb"]  # written by runs whose eval events carry it
        if e.type == "start" and e.resumed_from:
            events = [x for x in events if getattr(x, "step", 0) <= e.resumed_step or x.type == "start"]
        events.append(e)
    return events


def export_metrics(run_dir: str, to: str = "tensorboard", out: str | None = None) -> tuple[str, dict[str, int]]:
    """Write a finished (or live) run's metrics.jsonl to TensorBoard or W&B; returns where and the
    number of points per tag. ``out``: the TensorBoard folder (default RUN/tensorboard) or the folder
    that gets W&B's ``wandb/`` (default RUN)."""
    if to not in LOGGERS:
        raise GptTuiError(f"unknown --to {to!r}", f"choose {' or '.join(LOGGERS)}")
    if not os.path.isdir(run_dir):
        raise GptTuiError(f"run directory {run_dir} does not exist", "give a run directory (see `gpt-tui runs`)")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise GptTuiError(f"{run_dir} has no metrics.jsonl", "give the directory of a gpt-tui run (see `gpt-tui runs`)")
    events = history(run_dir)
    if not any(e.type in ("step", "eval", "sample") for e in events):
        raise GptTuiError(f"{path} holds no steps, evals or samples", "nothing to export; train the run first")
    check_loggers([to], flag="--to")
    if to == "wandb":
        check_wandb_login()
    writer: TensorBoardWriter | WandbWriter
    if to == "tensorboard":
        dest = os.path.abspath(out or os.path.join(run_dir, "tensorboard"))
        if os.path.isdir(dest) and any(f.startswith("events.out.tfevents") for f in os.listdir(dest)):
            raise GptTuiError(f"{dest} already holds TensorBoard event files",
                              "give --out DIR for another folder, or remove that one")
        writer = TensorBoardWriter(dest)
    else:
        dest = os.path.abspath(out or run_dir)
        writer = WandbWriter(dest, os.path.basename(os.path.normpath(os.path.abspath(run_dir))))
    try:
        for e in events:
            writer.handle(e)
    except GptTuiError:
        raise
    except Exception as e:  # noqa: BLE001
        raise GptTuiError(f"writing {to} to {dest} failed ({_describe(e)})", "check the folder and free space") from None
    finally:
        writer.close()
    if to == "wandb":
        dest = os.path.join(dest, "wandb")
    return dest, dict(writer.counts)
