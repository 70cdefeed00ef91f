"""The dashboard in a browser: ``gpt-tui attach RUN --web`` and ``gpt-tui train --web`` (textual-serve).

The end-to-end tests talk to the server as a browser does: the page (with its token), then its
websocket, which carries the served app's screen one way and keys the other; and, where Chromium is
installed, a headless Chromium driven over the DevTools protocol takes a screenshot and presses a key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.control import ControlClient
from engine.errors import GptTuiError
from tests.conftest import SMALL_TEXT, run_cli
from tui import web

GPT_TUI = [sys.executable, "-m", "tui.cli"]
TINY = ["--preset", "tiny", "--tokenizer", "char", "--context", "32", "--n-layer", "1", "--n-head", "2",
        "--n-embd", "32", "--batch-size", "2", "--max-steps", "1000000", "--eval-every", "200",
        "--eval-batches", "2", "--sample-every", "0", "--dtype", "fp32", "--device", "cpu", "--threads", "1"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

try:
    import aiohttp
    import textual_serve  # noqa: F401
    HAVE_SERVE = True
except ImportError:
    HAVE_SERVE = False

needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason="textual-serve is not installed (pip install '.[web]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(cache: Path) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", GPT_TUI_CACHE=str(cache), PYTHONUNBUFFERED="1")


def wait_for(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def status(run: Path) -> dict[str, Any]:
    return ControlClient(str(run), timeout=5).call("status")


def resume(run: Path) -> None:
    """Resume the run and wait until it trains again."""
    ControlClient(str(run), timeout=5).call("resume")
    wait_for(lambda: status(run)["state"] == "running", 30, "the run resumed")


# ------------------------------------------------------------------ without a server


def test_a_browser_page_counts_as_a_terminal() -> None:
    code = "from tui.common import has_terminal; print(has_terminal())"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    page = subprocess.run(["sh", "-c", f"GPT_TUI_WEB=1 {sys.executable} -c '{code}'"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert (plain.stdout.strip(), page.stdout.strip()) == ("False", "True")
    cmd = web.page_command("runs/x")
    assert cmd.startswith("GPT_TUI_WEB=1 ") and cmd.endswith(f"-m tui.cli attach {os.path.abspath('runs/x')}")


def test_the_token_and_the_origin_are_checked() -> None:
    tok = "s3cret"
    host = "127.0.0.1:8000"
    assert web.refusal(tok, tok, None, None, host, websocket=False) is None  # the printed address
    assert web.refusal(tok, None, tok, None, host, websocket=False) is None  # a reload: the cookie
    assert "token" in web.refusal(tok, None, None, None, host, websocket=False)
    assert "token" in web.refusal(tok, "guess", None, None, host, websocket=False)
    assert web.refusal(tok, None, tok, "http://127.0.0.1:8000", host, websocket=True) is None
    assert "token" in web.refusal(tok, tok, None, None, host, websocket=True)  # the socket needs the cookie
    assert "another origin" in web.refusal(tok, None, tok, "http://evil.example", host, websocket=True)
    assert web.is_loopback("127.0.0.1") and web.is_loopback("localhost") and web.is_loopback("::1")
    assert not web.is_loopback("0.0.0.0") and not web.is_loopback("10.1.2.3")


@needs_serve
def test_check_web_refuses_a_taken_port_and_warns_about_a_public_host(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(GptTuiError, match="cannot serve on 127.0.0.1"):
            web.check_web("127.0.0.1", s.getsockname()[1])
    web.check_web("127.0.0.1", free_port())
    assert capsys.readouterr().err == ""
    web.check_web("0.0.0.0", free_port())
    err = capsys.readouterr().err
    assert err.startswith("gpt-tui: warning: serving on 0.0.0.0:") and "controls the run" in err
    assert "ssh -L" in err


def test_bad_web_input_is_one_line(tmp_path: Path) -> None:
    cases = [
        (["attach", str(tmp_path), "--web", "--port", str(free_port())], "is not a gpt-tui run directory"),
        (["train", "--web", "--detach", "--data", "x.txt"], "--web and --detach do not go together"),
        (["train", "--web", "--headless", "--data", "x.txt"], "--web and --headless do not go together"),
    ]
    for args, said in cases:
        r = run_cli(*args, timeout=60)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpt-tui: error: ") and said in lines[0], r.stderr


# ------------------------------------------------------------------ a live run and its web server


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A headless tiny run training in the background for this module's tests."""
    if not HAVE_SERVE:
        pytest.skip("textual-serve is not installed (pip install '.[web]')")
    d = tmp_path_factory.mktemp("web")
    (d / "corpus.txt").write_text(SMALL_TEXT, encoding="utf-8")
    run = d / "run"
    log = (d / "train.log").open("w")
    proc = subprocess.Popen([*GPT_TUI, "train", "--headless", "--data", str(d / "corpus.txt"), *TINY, "--out", str(run)],
                            stdout=log, stderr=subprocess.STDOUT, env=env(d / "cache"))
    try:
        wait_for(lambda: proc.poll() is None and _answers(run), 90, "the run's control channel")
        yield run
    finally:
        try:
            ControlClient(str(run), timeout=5).call("stop", save=False)
            proc.wait(30)
        except Exception:  # noqa: BLE001
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


def _answers(run: Path) -> bool:
    try:
        return status(run)["step"] > 0
    except Exception:  # noqa: BLE001
        return False


class Served:
    """A ``gpt-tui ... --web`` process: its URL once it serves, killed (with its pages) on close."""

    def __init__(self, args: list[str], cache: Path, out: Path) -> None:
        self.port = free_port()
        self.out = out
        self.log = out.open("w")
        self.proc = subprocess.Popen([*GPT_TUI, *args, "--port", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env(cache), start_new_session=True)
        self.url = ""

    def wait_serving(self, timeout: float = 90) -> str:
        def url() -> str | None:
            assert self.proc.poll() is None, f"the server exited: {self.out.read_text()}"
            m = re.search(r"at (http://\S+/\?token=\S+)", self.out.read_text())
            return m.group(1) if m else None

        self.url = wait_for(url, timeout, "the server's address")
        return self.url

    @property
    def token(self) -> str:
        return self.url.rsplit("token=", 1)[1]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and the pages it started
            self.proc.wait(10)
        self.log.close()


async def read_screen(ws: Any, seconds: float, until: str | None = None) -> str:
    """What the served app drew on the page's websocket for ``seconds`` (or until ``until`` shows)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    data = b""
    while loop.time() < end:
        try:
            msg = await asyncio.wait_for(ws.receive(), max(0.05, end - loop.time()))
        except TimeoutError:
            break
        if msg.type == aiohttp.WSMsgType.BINARY:
            data += msg.data
            if until and until in data.decode("utf-8", "replace"):
                break
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            break
    return data.decode("utf-8", "replace")


async def open_page(served: Served, keys: str = "") -> tuple[str, list[int]]:
    """Load the page as a browser does, open its websocket and read the screen; press ``keys``.
    Returns what was drawn and the HTTP statuses of the refused attempts on the way."""
    base = f"http://127.0.0.1:{served.port}"
    refused = []
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(base + "/") as r:
            refused.append(r.status)  # no token
        async with s.get(f"{base}/ws?width=120&height=40") as r:
            refused.append(r.status)  # no cookie yet
        async with s.get(served.url) as r:
            assert r.status == 200
            page = await r.text()
        assert f'data-session-websocket-url="ws://127.0.0.1:{served.port}/ws"' in page
        try:
            async with s.ws_connect(f"{base}/ws?width=120&height=40", origin="http://evil.example"):
                refused.append(101)
        except aiohttp.WSServerHandshakeError as e:
            refused.append(e.status)
        async with s.ws_connect(f"{base}/ws?width=120&height=40", origin=base) as ws:
            screen = await read_screen(ws, 90, until="RUNNING")
            for k in keys:
                await ws.send_str(json.dumps(["stdin", k]))
            if keys:
                screen += await read_screen(ws, 30, until="PAUSED")
    return screen, refused


@pytest.mark.slow
@needs_serve
def test_attach_web_serves_the_dashboard_and_its_keys(live_run: Path, tmp_path: Path) -> None:
    served = Served(["attach", str(live_run), "--web"], tmp_path / "cache", tmp_path / "server.log")
    try:
        served.wait_serving()
        assert served.url.startswith(f"http://127.0.0.1:{served.port}/?token=")
        screen, refused = asyncio.run(open_page(served, keys="p"))
        assert refused == [403, 403, 403]
        assert "RUNNING" in screen and "loss" in screen and "learning rate" in screen
        assert re.search("[\u2800-\u28ff]", screen), "no braille: the charts were not drawn"
        assert "PAUSED" in screen
        wait_for(lambda: status(live_run)["state"] == "paused", 30, "the run paused through the page")
    finally:
        served.close()
        resume(live_run)
    assert served.proc.returncode == 0
    step = status(live_run)["step"]  # closing the server and its pages left the run going
    wait_for(lambda: status(live_run)["step"] > step, 30, "more steps")


# ------------------------------------------------------------------ a real browser


class DevTools:
    """A headless Chromium page driven over the Chrome DevTools protocol (aiohttp's websocket client)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.n = 0
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.frames: list[bytes] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            d = json.loads(msg.data)
            if d.get("id") in self.pending:
                self.pending.pop(d["id"]).set_result(d)
            elif d.get("method") == "Network.webSocketFrameReceived":
                r = d["params"]["response"]
                self.frames.append(base64.b64decode(r["payloadData"]) if r["opcode"] == 2 else r["payloadData"].encode())

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.n += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.n] = fut
        await self.ws.send_str(json.dumps({"id": self.n, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, 30)
        assert "error" not in reply, reply
        return reply.get("result", {})

    def screen(self) -> str:
        """Everything the page's own websocket has received (the terminal's output)."""
        return b"".join(self.frames).decode("utf-8", "replace")

    async def until(self, text: str, timeout: float) -> None:
        end = asyncio.get_running_loop().time() + timeout
        while text not in self.screen():
            assert asyncio.get_running_loop().time() < end, f"{text!r} never reached the page"
            await asyncio.sleep(0.2)


def start_chromium(profile: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([CHROMIUM or "chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", "--window-size=1200,800", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    port_file = Path(profile) / "DevToolsActivePort"
    port = wait_for(lambda: port_file.exists() and port_file.read_text().split()[:1], 60, "Chromium's DevTools port")
    return proc, int(port[0])


async def browse(url: str, cdp_port: int, shot: Path) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{cdp_port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        async with s.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tab = DevTools(ws)
            try:
                await tab.call("Network.enable")
                await tab.call("Page.enable")
                await tab.call("Page.navigate", url=url)
                await tab.until("RUNNING", 90)
                await tab.until("learning rate", 30)
                await asyncio.sleep(2)  # a full frame, charts included, painted
                shot.write_bytes(base64.b64decode((await tab.call("Page.captureScreenshot", format="png"))["data"]))
                view = (await tab.call("Page.getLayoutMetrics"))["cssVisualViewport"]
                x, y = view["clientWidth"] / 2, view["clientHeight"] / 2
                for kind in ("mousePressed", "mouseReleased"):  # click into the page, as a person would
                    await tab.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
                await tab.call("Input.dispatchKeyEvent", type="keyDown", key="p", code="KeyP", text="p",
                               windowsVirtualKeyCode=80)
                await tab.call("Input.dispatchKeyEvent", type="keyUp", key="p", code="KeyP", windowsVirtualKeyCode=80)
                await tab.until("PAUSED", 30)
                return tab.screen()
            finally:
                tab.task.cancel()


@pytest.mark.slow
@needs_serve
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_chromium_shows_the_loss_chart_and_pauses_the_run(live_run: Path, tmp_path: Path) -> None:
    served = Served(["attach", str(live_run), "--web"], tmp_path / "cache", tmp_path / "server.log")
    profile = tempfile.mkdtemp(prefix="gpt-tui-chromium-")
    browser = None
    shot = tmp_path / "dashboard.png"
    try:
        served.wait_serving()
        browser, cdp_port = start_chromium(profile)
        screen = asyncio.run(asyncio.wait_for(browse(served.url, cdp_port, shot), 240))
        wait_for(lambda: status(live_run)["state"] == "paused", 30, "the run paused by a key in Chromium")
    finally:
        if browser is not None:
            browser.terminate()
            try:
                browser.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.wait(10)
        served.close()
        shutil.rmtree(profile, ignore_errors=True)
        resume(live_run)
    assert "loss" in screen and re.search("[\u2800-\u28ff]", screen)  # the loss chart reached the page
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == 1200 and height > 400
    assert len(png) > 20_000, "the screenshot is nearly blank"


# ------------------------------------------------------------------ train --web


@pytest.mark.slow
@needs_serve
def test_train_web_trains_serves_and_stops_with_a_checkpoint_on_ctrl_c(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SMALL_TEXT, encoding="utf-8")
    run = tmp_path / "run"
    served = Served(["train", "--web", "--data", str(corpus), *TINY, "--out", str(run)], tmp_path / "cache",
                    tmp_path / "server.log")
    try:
        served.wait_serving()
        assert status(run)["state"] == "running"  # its own control channel: the pages attach through it
        screen, _ = asyncio.run(open_page(served))
        assert "RUNNING" in screen and str(run.name) in screen
        served.proc.send_signal(signal.SIGINT)
        served.proc.wait(90)
    finally:
        served.close()
    said = served.out.read_text()
    assert served.proc.returncode == 0, said
    assert "gpt-tui: stopped at step" in said
    stops = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
             if '"checkpoint"' in x and '"stop"' in x]
    assert stops and Path(stops[-1]["path"]).exists()
