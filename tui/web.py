"""The dashboard in a web browser: ``gpt-tui attach RUN --web`` and ``gpt-tui train --web``.

textual-serve runs a *command* for each browser page and relays its screen and keys over a
websocket. Every page here runs ``gpt-tui attach RUN``: a viewer of the run through its control
channel, whose keys work as in a terminal (``q`` closes that page's viewer; the run goes on). So:

- ``attach RUN --web`` serves pages of a run that trains in another process (detached, headless ...);
- ``train --web`` trains in this process with no screen of its own (the engine thread and its control
  channel, as under the dashboard) and, once setup has made the run directory, serves pages of
  itself. Ctrl+C, SIGTERM or SIGHUP stop the run at a step boundary with a checkpoint, then the
  server; a run that ends by itself stays served, read-only, until then.

A page's command sets ``GPT_TUI_WEB=1``: under textual-serve the app has no terminal of its own
(stdin is a pipe), and :func:`tui.common.has_terminal` takes that variable (or textual-serve's
``TEXTUAL_DRIVER``) for one.

Access: the server binds 127.0.0.1 unless ``--host`` says otherwise (with a warning); the way in from
another machine is SSH port forwarding. Each server makes a random token; its address carries it
(``/?token=...``), the page turns it into a same-site cookie, and a websocket without that cookie, or
opened from another origin (another site in the same browser), is refused: on a shared machine
other users can reach 127.0.0.1 too.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from engine.errors import GptTuiError

from .common import WEB_PAGE_ENV

if TYPE_CHECKING:
    from .app import DashboardApp

COOKIE = "gpt_tui_token"
READY_TIMEOUT = 30.0
"""Seconds ``train --web`` waits for its control channel to answer before serving pages of it."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_web(host: str, port: int) -> None:
    """Fail early (one line) when the web extra is missing or the port is taken; warn about a public host."""
    try:
        import textual_serve  # noqa: F401
    except ImportError:
        raise GptTuiError("--web needs textual-serve, which is not installed",
                          "pip install 'gpt-tui[web]' (or pip install textual-serve)") from None
    if not 0 < port < 65536:
        raise GptTuiError(f"--port {port} is not a port", "give a port from 1 to 65535, e.g. --port 8000")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise GptTuiError(f"--host {host} is not an address here ({e.strerror})",
                          "give 127.0.0.1 (the default) or an address of this machine") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise GptTuiError(f"cannot serve on {host}:{port}: {e.strerror}",
                              "choose another --port (or stop what uses that one)") from None
    if not is_loopback(host):
        print(f"gpt-tui: warning: serving on {host}:{port}, not only on this machine: anyone who can reach it "
              "and has the page's address controls the run (pause, stop, generate); the default 127.0.0.1 "
              f"with `ssh -L {port}:127.0.0.1:{port} HOST` keeps it to you", file=sys.stderr, flush=True)


def page_command(run_dir: str) -> str:
    """What each browser page runs: a viewer of the run (``gpt-tui attach``), told it has a terminal."""
    return f"{WEB_PAGE_ENV}=1 " + shlex.join([sys.executable, "-m", "tui.cli", "attach", os.path.abspath(run_dir)])


def page_url(host: str, port: int, token: str) -> str:
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/?token={token}"


def refusal(token: str, query_token: str | None, cookie: str | None, origin: str | None, host: str,
            websocket: bool) -> str | None:
    """Why a request is refused (None: let it in). The page needs the token (in the address or the
    cookie it set); its websocket needs the cookie and, from a browser, the page's own origin."""
    given = cookie if websocket else (query_token or cookie)
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        return "this page needs the address with its token, as printed where gpt-tui serves it (…/?token=…)"
    if websocket and origin is not None and urlsplit(origin).netloc != host:
        return f"websocket from another origin ({origin}) refused"
    return None


def make_server(command: str, host: str, port: int, token: str, title: str,
                on_signal: Callable[[], bool] | None = None) -> Any:
    """A textual-serve server of ``command`` with the token check, our own start line and signals.

    ``on_signal`` is asked on SIGINT/SIGTERM/SIGHUP whether to stop serving now (None: always)."""
    from aiohttp import web
    from aiohttp.web_runner import GracefulExit
    from textual_serve.server import Server

    class DashboardServer(Server):
        def __init__(self) -> None:
            super().__init__(command, host=host, port=port, title=title)
            self.loop: asyncio.AbstractEventLoop | None = None

        def initialize_logging(self) -> None:
            logging.basicConfig(level=logging.WARNING, format="gpt-tui web: %(message)s")

        async def on_startup(self, app: web.Application) -> None:
            self.loop = asyncio.get_running_loop()
            try:
                self.loop.add_signal_handler(signal.SIGHUP, self.request_exit)
            except (NotImplementedError, RuntimeError):
                pass
            print(f"gpt-tui: serving {title} at {page_url(host, port, token)}  (Ctrl+C stops)", flush=True)

        def request_exit(self) -> None:
            if on_signal is None or on_signal():
                raise GracefulExit()

        def stop_soon(self) -> None:
            """Stop serving (from any thread)."""
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.request_stop)

        def request_stop(self) -> None:
            raise GracefulExit()

        def check(self, request: web.Request, websocket: bool) -> None:
            why = refusal(token, request.query.get("token"), request.cookies.get(COOKIE),
                          request.headers.get("Origin"), request.host, websocket)
            if why:
                raise web.HTTPForbidden(text=f"gpt-tui: {why}\n")

        async def handle_index(self, request: web.Request) -> Any:
            self.check(request, websocket=False)
            # The page's websocket goes back to the address the browser used (a forwarded port, a name).
            self.public_url = f"{request.scheme}://{request.host}"
            response = await super().handle_index(request)
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
            return response

        async def handle_websocket(self, request: web.Request) -> Any:
            self.check(request, websocket=True)
            return await super().handle_websocket(request)

    return DashboardServer()


def new_token() -> str:
    return os.environ.get("GPT_TUI_WEB_TOKEN") or secrets.token_urlsafe(18)


# ------------------------------------------------------------------ attach RUN --web


def serve_attach(run_dir: str, host: str, port: int) -> None:
    """Serve the dashboard of a run in another process until Ctrl+C."""
    from engine.control import open_run
    from engine.runs import RunDir

    controller, _, _ = open_run(run_dir)  # its errors now, on one line: not a run, a process that died
    controller.close()
    check_web(host, port)
    make_server(page_command(run_dir), host, port, new_token(), f"the dashboard of {RunDir(run_dir).name}").serve()


# ------------------------------------------------------------------ train --web


def web_runner(host: str, port: int) -> Callable[[DashboardApp], None]:
    """What ``train --web`` runs instead of the dashboard (``tui.launch.run_dashboard`` calls it with its
    app, whose engine thread it has started): checks now, serving once the run is set up."""
    check_web(host, port)
    token = new_token()
    return lambda app: serve_training(app, host, port, token)


class TrainingStop:
    """The signals of ``train --web``: the first stops the run with a checkpoint (the server stops when
    it has); the next, or any once the run has ended, stops serving at once."""

    def __init__(self, app: DashboardApp) -> None:
        self.app = app
        self.count = 0

    @property
    def requested(self) -> bool:
        return self.count > 0

    def __call__(self) -> bool:
        engine = self.app.engine
        self.count += 1
        if engine is None or engine.done:
            return True
        if self.count == 1:
            _say("gpt-tui: stopping: a checkpoint at the next step, then the server stops (again: at once)")
            self.app.quitting = True
            self.app.controller.cancel_generation()
            self.app.controller.stop(save=True)
            return False
        self.app.forced = True  # run_dashboard exits at once (130); checkpoints on disk are whole
        return True


def _wait_set_up(app: DashboardApp) -> str | None:
    """The run directory once the engine has set up and serves its channel; None when it ended first."""
    from engine.control import ControlClient, ControlError

    from .common import SignalStopper

    engine = app.engine
    assert engine is not None
    with SignalStopper(lambda: app.controller.stop(save=True)):
        while engine.in_setup and not engine.done:
            time.sleep(0.1)
        if engine.done or engine.error is not None:
            return None
        run_dir = getattr(app.controller, "run_dir", None) or app.run_dir
        if not run_dir:
            return None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not engine.done:
            try:
                ControlClient(run_dir, timeout=1.0).call("status")
                break
            except ControlError:
                time.sleep(0.1)
    return None if engine.done else str(run_dir)


def serve_training(app: DashboardApp, host: str, port: int, token: str) -> None:
    """Serve pages of the run ``app``'s engine trains, until a signal; returns to run_dashboard, which
    stops and joins the engine if it still runs and reports how the run ended."""
    from engine.runs import RunDir

    run_dir = _wait_set_up(app)
    if run_dir is None:
        return
    stop = TrainingStop(app)
    server = make_server(page_command(run_dir), host, port, token, f"the dashboard of {RunDir(run_dir).name}", stop)

    def watch() -> None:
        engine = app.engine
        assert engine is not None
        engine.join()
        if stop.requested:
            server.stop_soon()
            return
        what = f"failed: {engine.error}" if engine.error is not None else (engine.result or "ended")
        _say(f"gpt-tui: the run {what}; its dashboard stays served read-only (Ctrl+C stops serving)")

    threading.Thread(target=watch, name="gpt-tui-web-watch", daemon=True).start()
    server.serve()


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
