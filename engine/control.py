r"""A run's control channel: a Unix socket owned by the training process.

The client side imports no torch, so that shell commands answer quickly.

The socket is ``RUN/control.sock`` (or, where that path is too long for a socket, a file in a
private ``gpt-tui-UID`` folder of the temp dir, named in ``RUN/control.json``). Only the owner
can use it: the socket is mode 0600 and each peer's user id is checked where the OS reports it.

The protocol is newline-delimited JSON. A request is one object ``{"cmd": NAME, ...}``; the reply
is one object ``{"ok": true, ...}`` or ``{"ok": false, "error": MESSAGE}``. Commands:

``status``, ``pause``, ``resume``, ``toggle_pause``, ``checkpoint``, ``eval``,
``generate`` (``prompt``, ``settings``: SampleSettings fields, ``raw``; replies with the ``id``
of the GenerateEvents), ``cancel_generation``, ``set`` (``setting``, ``value``, ``source``: a live
change, refused with a reason; ``changes``: a list of ``{setting, value}`` applied at the same step,
all or none; with ``check``: only checked, nothing queued), ``stop`` (``save``), and ``subscribe``: after its reply the
connection streams every event the engine emits, one ``{"event": RECORD}`` per line (the records
of ``metrics.jsonl``, plus streamed generations). Several connections may subscribe.

A socket left by a process that died is detected (nothing accepts on it) and replaced.

Besides the server and its client, this module holds the two other :class:`RunController`\ s:
:class:`RemoteController` (a run in another process, through its channel) and
:class:`ReadOnlyController` (a run that has ended), and :func:`open_run`, which picks one.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import os
import queue
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import GptTuiError
from .events import Event, LogEvent, event_from_record, read_metrics
from .recorder import Recorder
from .runs import CONTROL_INFO, FINAL_STATES, SOCKET, RunDir

if TYPE_CHECKING:
    from .config import LiveChange
    from .sampling import SampleSettings

MAX_SOCKET_PATH = 100  # sun_path holds 104-108 bytes depending on the OS
BATCH_S = 0.2
"""Events go to a viewer in batches at most this many seconds apart."""


class ControlError(GptTuiError):
    """The control channel of a run cannot be used."""


# ================================================================== locating
def socket_path_for(run_dir: str) -> str:
    """Where a run's socket goes: in the run directory, or a short private path when that is too long."""
    p = RunDir(run_dir).socket
    if len(p.encode()) <= MAX_SOCKET_PATH:
        return p
    d = os.path.join(tempfile.gettempdir(), f"gpt-tui-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    digest = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:20]
    return os.path.join(d, f"{digest}.sock")


def read_info(run_dir: str) -> dict[str, Any] | None:
    """``RUN/control.json`` (socket path, pid, host) of the process serving the run, if any."""
    try:
        with open(RunDir(run_dir).control_info) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def is_run_dir(run_dir: str) -> bool:
    return RunDir(run_dir).is_run()


def last_state(run_dir: str) -> tuple[str | None, int]:
    return RunDir(run_dir).last_state()


# ==================================================================== server
def _peer_uid(conn: socket.socket) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[1]


def _answers(path: str) -> bool:
    """Whether a live process accepts connections on the socket at ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class _Subscriber:
    """One viewer's event stream: a bounded queue drained by its own writer thread."""

    def __init__(self, conn: socket.socket, lock: threading.Lock, on_drop: Any, first: bytes) -> None:
        self.conn = conn
        self.lock = lock
        self.on_drop = on_drop
        self.q: queue.Queue[bytes | None] = queue.Queue(maxsize=20000)
        self.q.put(first)  # the reply to subscribe goes out before any event
        self.alive = True
        self.thread = threading.Thread(target=self._run, name="gpt-tui-viewer", daemon=True)

    def push(self, line: bytes | None) -> None:
        if not self.alive:
            return
        try:
            self.q.put_nowait(line)
        except queue.Full:  # a viewer that stopped reading is dropped, never waited for
            self.drop()

    def drop(self) -> None:
        if self.alive:
            self.alive = False
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
            self.on_drop(self)

    def _run(self) -> None:
        """Send what is queued in batches, at most ``BATCH_S`` apart: a viewer (and this thread) wakes a
        few times a second, not at every step, which on a busy CPU would stall the training threads."""
        first = True
        while self.alive:
            lines = [self.q.get()]
            if not first:
                time.sleep(BATCH_S)
            first = False
            while True:
                try:
                    lines.append(self.q.get_nowait())
                except queue.Empty:
                    break
            end = None in lines
            data = b"".join(line for line in lines[: lines.index(None)] if line) if end else b"".join(lines)
            try:
                if data:
                    with self.lock:
                        self.conn.sendall(data)
            except OSError:
                break
            if end:
                break
        self.drop()


class ControlServer:
    """Serves a trainer's commands and events on the run's socket (see the module docstring).

    Thread-safe: the engine thread only calls :meth:`emit` (which never blocks); connections
    are handled in their own threads and reach the trainer only through its command methods.
    """

    def __init__(self, trainer: Any, run_dir: str | None = None) -> None:
        self.trainer = trainer
        self.run_dir = os.path.abspath(run_dir or trainer.run_dir)
        self.path = socket_path_for(self.run_dir)
        self._listener: socket.socket | None = None
        self._subs: list[_Subscriber] = []
        self._lock = threading.Lock()
        self._cmd_lock = threading.Lock()
        self._closed = threading.Event()

    # ----------------------------------------------------------- lifecycle
    def start(self) -> ControlServer:
        """Bind the socket (replacing a stale one), write control.json, start accepting, hook into events."""
        if os.path.exists(self.path):
            if _answers(self.path):
                info = read_info(self.run_dir) or {}
                raise ControlError(
                    f"run {self.run_dir} is already being trained by process {info.get('pid', '?')}",
                    f"stop it first (gpt-tui stop {self.run_dir}) or train into another --out",
                )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # left by a process that died
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: no window where others could connect
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        s.listen(16)
        s.settimeout(0.5)
        self._listener = s
        from .checkpoint import write_json_atomic

        write_json_atomic(os.path.join(self.run_dir, CONTROL_INFO), {
            "socket": self.path, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
        })
        threading.Thread(target=self._accept_loop, name="gpt-tui-control", daemon=True).start()
        self.trainer.add_sink(self)
        atexit.register(self.close)
        return self

    def close(self) -> None:
        """Stop serving: deliver what viewers have queued, remove the socket and control.json."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        info = read_info(self.run_dir) or {}
        if info.get("pid") == os.getpid():
            for p in (self.path, os.path.join(self.run_dir, CONTROL_INFO)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub.push(None)
        for sub in subs:
            sub.thread.join(timeout=2.0)

    # -------------------------------------------------------------- events
    def emit(self, event: Event) -> None:
        """Sink interface: fan an event out to the subscribed viewers (never blocks)."""
        with self._lock:
            if not self._subs:
                return
            subs = list(self._subs)
        line = (json.dumps({"event": event.to_record()}, ensure_ascii=False) + "\n").encode()
        for sub in subs:
            sub.push(line)

    def _drop(self, sub: _Subscriber) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    # --------------------------------------------------------- connections
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()  # type: ignore[union-attr]
            except TimeoutError:
                continue
            except OSError:
                return
            uid = _peer_uid(conn)
            if uid is not None and uid != os.getuid():
                conn.close()
                continue
            conn.settimeout(None)
            threading.Thread(target=self._serve, args=(conn,), name="gpt-tui-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        lock = threading.Lock()
        sub: _Subscriber | None = None
        try:
            with conn, conn.makefile("rb") as rf:
                for raw in rf:
                    try:
                        req = json.loads(raw)
                        if not isinstance(req, dict):
                            raise ValueError("a request is a JSON object")
                        reply = self.handle(req)
                    except (ValueError, TypeError, GptTuiError) as e:
                        reply = {"ok": False, "error": str(e)}
                    if reply.pop("_subscribe", False) and sub is None:
                        # Every event emitted before this point is already in metrics.jsonl.
                        sub = _Subscriber(conn, lock, self._drop, (json.dumps(reply) + "\n").encode())
                        with self._lock:
                            self._subs.append(sub)
                        sub.thread.start()  # the reply goes out once every later event reaches this viewer
                        continue
                    with lock:
                        conn.sendall((json.dumps(reply) + "\n").encode())
        except OSError:
            pass
        finally:
            if sub is not None:
                sub.drop()

    def status(self) -> dict[str, Any]:
        t = self.trainer
        return {
            "ok": True, "pid": os.getpid(), "run_dir": self.run_dir, "state": t.state, "step": t.step,
            "total_steps": t.total_steps, "paused": t.paused, "tokens_seen": t.tokens_seen,
            "world_size": t.world, "last_checkpoint": t.last_checkpoint, "template": t.template,
        }

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """Carry out one request through the trainer's thread-safe commands; returns the reply."""
        t = self.trainer
        cmd = req.get("cmd")
        with self._cmd_lock:
            if cmd == "status":
                return self.status()
            if cmd == "subscribe":
                return dict(self.status(), _subscribe=True)
            if cmd == "pause":
                t.pause()
            elif cmd == "resume":
                t.resume()
            elif cmd == "toggle_pause":
                return {"ok": True, "paused": t.toggle_pause()}
            elif cmd == "checkpoint":
                t.request_checkpoint()
            elif cmd == "eval":
                t.request_eval()
            elif cmd == "generate":
                prompt = req.get("prompt")
                if not isinstance(prompt, str):
                    raise ValueError("generate needs a prompt string")
                from .sampling import SampleSettings

                settings = SampleSettings.from_dict(req.get("settings") or {})
                return {"ok": True, "id": t.request_generate(prompt, settings, bool(req.get("raw", False)))}
            elif cmd == "cancel_generation":
                t.cancel_generation()
            elif cmd == "set":
                return self._set(req)
            elif cmd == "stop":
                t.stop(save=bool(req.get("save", True)))
            else:
                raise ValueError(f"unknown command {cmd!r}")
            return self.status()


    def _set(self, req: dict[str, Any]) -> dict[str, Any]:
        """``set``: one change (``setting``, ``value``) or several applied at the same step (``changes``:
        a list of them); with ``check``, only checked. The reply lists each change's ``setting`` and ``new``
        (and names the first's at the top level)."""
        many = req.get("changes")
        if many is not None and not (isinstance(many, list) and all(isinstance(c, dict) for c in many)):
            raise ValueError("changes must be a list of {setting, value} objects")
        items = [(str(c.get("setting", "")), str(c.get("value", ""))) for c in many] if many is not None else [
            (str(req.get("setting", "")), str(req.get("value", "")))]
        if not items:
            raise ValueError("set needs a setting and a value")
        source = str(req.get("source", "shell"))
        t = self.trainer
        done = t.check_changes(items, source) if req.get("check") else t.change_many(items, source)
        out = [{"setting": c.setting, "new": c.new} for c in done]
        return {"ok": True, **out[0], "changes": out}


def settings_to_dict(s: SampleSettings | None) -> dict[str, Any]:
    return s.to_dict() if s is not None else {}


def serve(trainer: Any) -> ControlServer | None:
    """Open the control channel of a set-up trainer (rank 0 only under torchrun)."""
    if not getattr(trainer, "is_main", True):
        return None
    return ControlServer(trainer).start()


# ==================================================================== client
class ControlClient:
    """Talks to a run's control channel; raises :class:`ControlError` with a fix when it cannot."""

    def __init__(self, run_dir: str, timeout: float = 10.0) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.timeout = timeout

    def socket_path(self) -> str:
        info = read_info(self.run_dir) or {}
        return info.get("socket") or os.path.join(self.run_dir, SOCKET)

    def connect(self) -> socket.socket:
        """A connected socket, or a ControlError saying why there is no live run to talk to."""
        if not is_run_dir(self.run_dir):
            raise ControlError(f"{self.run_dir} is not a gpt-tui run directory (no metrics.jsonl or config.json)",
                               "give the directory a `gpt-tui train` run writes to (its --out)")
        path = self.socket_path()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(path)
        except PermissionError:
            s.close()
            raise ControlError(f"no permission to use the control channel of {self.run_dir}",
                               "only the user who started the run can control it") from None
        except OSError as e:
            s.close()
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                raise ControlError(f"cannot reach the run in {self.run_dir} ({e.strerror or e})",
                                   "check that its process is running") from None
            raise self.not_running() from None
        return s

    def not_running(self) -> ControlError:
        """The error for a run with no live process: finished, or died (offer --resume)."""
        state, step = last_state(self.run_dir)
        if state in FINAL_STATES:
            err = ControlError(f"run {self.run_dir} is not running (it {state} at step {step})",
                               f"open it read-only with gpt-tui attach {self.run_dir}, or continue it with "
                               f"gpt-tui train --resume {self.run_dir} --detach")
        else:
            info = read_info(self.run_dir) or {}
            who = f"process {info['pid']}" if info.get("pid") else "its process"
            err = ControlError(f"run {self.run_dir} is not running: {who} ended without finishing (last step {step})",
                               f"continue it with gpt-tui train --resume {self.run_dir} --detach")
        return err

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one command; returns the reply (raises ControlError when the run refuses it)."""
        with contextlib.closing(self.connect()) as s:
            reply = _LineReader(s).request(cmd, args)
        if not reply.get("ok"):
            raise ControlError(f"the run refused {cmd}: {reply.get('error', 'no reason given')}", exit_code=1)
        return reply

    def subscribe(self) -> EventStream:
        """A live stream of the run's events (its first reply is the status)."""
        s = self.connect()
        reader = _LineReader(s)
        try:
            status = reader.request("subscribe", {})
        except BaseException:
            s.close()
            raise
        return EventStream(reader, status)


class _LineReader:
    """JSON lines from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def line(self) -> dict[str, Any] | None:
        """The next JSON object, or None at the end of the stream."""
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return None
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\n", 1)
            try:
                msg = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(msg, dict):
                return msg

    def request(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            self.sock.sendall((json.dumps({"cmd": cmd, **args}) + "\n").encode())
            reply = self.line()
        except OSError as e:
            raise ControlError(f"the run stopped answering ({e})", "check its log") from None
        if reply is None:
            raise ControlError("the run closed the control channel before answering", "check its log")
        return reply


class EventStream:
    """Event records from a subscribed connection; iteration ends when the run closes it."""

    def __init__(self, reader: _LineReader, status: dict[str, Any]) -> None:
        self.reader = reader
        self.sock = reader.sock
        self.status = status

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            self.sock.settimeout(None)
        except OSError:  # closed before the reader started (a viewer closed at once)
            return
        while True:
            try:
                msg = self.reader.line()
            except OSError:
                return
            if msg is None:
                return
            if isinstance(msg.get("event"), dict):
                yield msg["event"]

    def wait_for(self, predicate: Any, timeout: float) -> dict[str, Any] | None:
        """The first event record for which ``predicate(record)`` is true, or None (timeout or end)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 and b"\n" not in self.reader.buf:  # what already arrived is read even at the deadline
                return None
            self.sock.settimeout(max(left, 1e-3))
            try:
                msg = self.reader.line()
            except OSError:
                return None
            if msg is None:
                return None
            rec = msg.get("event")
            if isinstance(rec, dict) and predicate(rec):
                return rec

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


# ================================================================ controllers
def _key(rec: dict[str, Any]) -> tuple[Any, ...]:
    return rec.get("type"), rec.get("time"), rec.get("step")


def load_history(run_dir: str, recorder: Recorder) -> set[tuple[Any, ...]]:
    """Feed the records of ``RUN/metrics.jsonl`` to ``recorder``; returns their keys (to skip repeats)."""
    seen = set()
    for rec in read_metrics(RunDir(run_dir).metrics):
        event = event_from_record(rec)
        if event is not None:
            recorder.emit(event)
            seen.add(_key(rec))
    return seen


class RemoteController:
    """The :class:`engine.commands.RunController` of a run in another process (through its channel).

    :meth:`start` rebuilds the history into ``recorder`` and starts a thread that feeds it the
    live events; ``connected`` turns False when the run's process goes away. Closing it
    (:meth:`close`) leaves the run going.
    """

    controls = True

    def __init__(self, run_dir: str, recorder: Recorder | None = None) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.recorder = recorder or Recorder()
        self.client = ControlClient(self.run_dir)
        self.connected = False
        self.template: str | None = None
        self.pid: int | None = None
        """The training process (its CPU and memory are what the system pane shows)."""
        self._paused = False
        self._stream: EventStream | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> RemoteController:
        """Subscribe, load the history, then follow live (raises ControlError when the run is not live)."""
        self._stream = self.client.subscribe()  # first, so no event falls between history and live
        self._paused = bool(self._stream.status.get("paused"))
        self.template = self._stream.status.get("template")
        self.pid = self._stream.status.get("pid")
        seen = load_history(self.run_dir, self.recorder)
        self.connected = True
        self._thread = threading.Thread(target=self._follow, args=(self._stream, seen), name="gpt-tui-attach",
                                        daemon=True)
        self._thread.start()
        return self

    def _follow(self, stream: EventStream, seen: set[tuple[Any, ...]]) -> None:
        for rec in stream:
            if _key(rec) in seen:
                continue
            event = event_from_record(rec)
            if event is None:
                continue
            if rec.get("type") == "state":
                self._paused = rec.get("state") == "paused"
            self.recorder.emit(event)
        if self.connected:
            self.connected = False
            if self.recorder.state not in FINAL_STATES:
                self.recorder.emit(LogEvent(level="warning", message=(
                    "the run's process closed the control channel; "
                    f"if it died, continue it with gpt-tui train --resume {self.run_dir}")))

    def close(self) -> None:
        """Stop following (the run keeps training)."""
        self.connected = False
        if self._stream is not None:
            self._stream.close()

    @property
    def paused(self) -> bool:
        return self._paused

    def toggle_pause(self) -> bool:
        self._paused = bool(self.client.call("toggle_pause")["paused"])
        return self._paused

    def pause(self) -> None:
        self.client.call("pause")

    def resume(self) -> None:
        self.client.call("resume")

    def request_checkpoint(self) -> None:
        self.client.call("checkpoint")

    def request_eval(self) -> None:
        self.client.call("eval")

    def request_generate(self, prompt: str, settings: SampleSettings | None = None, raw: bool = False) -> int:
        return int(self.client.call("generate", prompt=prompt, settings=settings_to_dict(settings), raw=raw)["id"])

    def cancel_generation(self) -> None:
        self.client.call("cancel_generation")

    def change(self, setting: str, value: str, source: str = "dashboard") -> LiveChange:
        return self.change_many([(setting, value)], source)[0]

    def change_many(self, items: list[tuple[str, str]], source: str = "dashboard") -> list[LiveChange]:
        from .config import LiveChange

        try:
            reply = self.client.call("set", changes=[{"setting": s, "value": v} for s, v in items], source=source)
        except ControlError as e:  # the run's own reason, without the channel's wrapping
            raise GptTuiError(e.problem.split(": ", 1)[-1], e.fix) from None
        return [LiveChange(c["setting"], c["new"], source=source) for c in reply["changes"]]

    def stop(self, save: bool = True) -> None:
        self.client.call("stop", save=save)


class ReadOnlyController:
    """The controller of a run that has ended: nothing to command (the dashboard shows it read-only)."""

    paused = False
    connected = False
    controls = False
    template = None

    def __init__(self, run_dir: str) -> None:
        self.run_dir = os.path.abspath(run_dir)

    def _refuse(self, *args: Any, **kw: Any) -> Any:
        raise ControlError(f"run {self.run_dir} has ended; it is shown read-only",
                           f"continue it with gpt-tui train --resume {self.run_dir}")

    pause = resume = toggle_pause = request_checkpoint = request_eval = request_generate = _refuse
    cancel_generation = change = change_many = stop = _refuse

    def close(self) -> None:
        pass


def open_run(run_dir: str) -> tuple[RemoteController | ReadOnlyController, Recorder, bool]:
    """(controller, recorder, read_only) for a run directory; ControlError when there is nothing to show."""
    run_dir = os.path.abspath(run_dir)
    if not is_run_dir(run_dir):
        raise ControlError(f"{run_dir} is not a gpt-tui run directory (no metrics.jsonl or config.json)",
                           "give the directory a `gpt-tui train` run writes to (its --out)")
    recorder = Recorder()
    try:
        return RemoteController(run_dir, recorder).start(), recorder, False
    except ControlError:
        state, _ = last_state(run_dir)
        if state not in FINAL_STATES:
            raise  # the process died mid-run: the error offers --resume
    load_history(run_dir, recorder)
    return ReadOnlyController(run_dir), recorder, True


def refuse_live_run(run_dir: str | None) -> None:
    """Fail when another process is training into ``run_dir``."""
    if run_dir is None or not is_run_dir(run_dir):
        return
    try:
        st = ControlClient(run_dir, timeout=2.0).call("status")
    except ControlError:
        return
    raise ControlError(f"run {run_dir} is already being trained by process {st['pid']}",
                       f"attach with gpt-tui attach {run_dir}, stop it with gpt-tui stop {run_dir}, "
                       "or choose another --out")
