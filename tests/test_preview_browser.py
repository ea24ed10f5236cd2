"""The preview page in a real browser: Debian's headless Chromium, driven over its DevTools
protocol (JSON messages over a WebSocket, https://chromedevtools.github.io/devtools-protocol/),
against a real bridge on the tiny model and against a bare preview server.

Skipped when Chromium is not installed (`apt-get install chromium`; `.ci/run` installs it)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pythonosc.udp_client import SimpleUDPClient

from bridge.frames import Frame
from bridge.params import table
from bridge.runtime import in_background
from bridge.transports.base import SinkContext
from bridge.transports.preview import PreviewSink
from tests.conftest import tiny_bridge

websocket = pytest.importorskip("websocket", reason="websocket-client is in the dev extra")

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
)
WINDOW = (1280, 800)


class Tab:
    """One Chromium tab: `call` sends a DevTools command and returns its result; the events
    that arrive meanwhile are kept in `events` (Runtime.enable reports exceptions and console
    messages as events)."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.events: list[dict[str, Any]] = []
        self._id = 0
        self.call("Runtime.enable")
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method} failed: {message['error']}")
                return dict(message["result"])
            self.events.append(message)

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, what: str, timeout_s: float = 20.0) -> Any:
        """Evaluate `expression` every 0.1 s until it is truthy; its value."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"{what}: not within {timeout_s:.0f} s (last value {value!r})")

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait(
            f"location.href === {json.dumps(url)} && document.readyState !== 'loading'", f"loading {url}"
        )

    def problems(self) -> list[Any]:
        """Uncaught exceptions and console errors since the last `open`."""
        self.eval("0")  # collect the events that have arrived
        return [
            e["params"]
            for e in self.events
            if e.get("method") == "Runtime.exceptionThrown"
            or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error")
        ]

    def close(self) -> None:
        self.ws.close()


@pytest.fixture(scope="module")
def tab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tab]:
    assert CHROMIUM is not None
    profile = tmp_path_factory.mktemp("chromium-profile")
    log_path = profile.parent / "chromium.log"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",  # a container's small /dev/shm would crash the renderer
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not open its DevTools port: {_tail(log_path)}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        tab = Tab(next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"))
        try:
            yield tab
        finally:
            tab.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # chromium and its helpers share the new session
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def control(name: str, kind: str = "") -> str:
    """A JS expression for the control of parameter `name` (of input type `kind`, if given)."""
    selector = f'[data-param="{name}"] input' + (f'[type="{kind}"]' if kind else "")
    return f"document.querySelector({json.dumps(selector)})"


# ---------------------------------------------------------------- against a real bridge


@pytest.fixture(scope="module")
def live(tiny_pipe: Any) -> Iterator[tuple[Any, str, tuple[str, int]]]:
    osc_port = free_udp_port()
    overrides = [
        f"osc.port={osc_port}",
        "osc.status_targets=[]",
        "output.kind=preview",
        "output.port=0",
        "runtime.fps=15",
    ]
    bridge = tiny_bridge(tiny_pipe, overrides)
    with in_background(bridge, start_timeout_s=120):
        preview = bridge.sinks[0].sink
        assert isinstance(preview, PreviewSink)
        yield bridge, preview.url, ("127.0.0.1", osc_port)


def test_page_shows_the_output_fitted_status_plot_and_states(tab: Tab, live: Any) -> None:
    _bridge, url, _osc = live
    tab.open(url)
    tab.wait("document.getElementById('out').naturalWidth > 0", "the output image drawn")
    size = tab.eval(
        """(() => { const img = document.getElementById('out'), r = img.getBoundingClientRect();
        return {nw: img.naturalWidth, nh: img.naturalHeight, w: r.width, h: r.height,
                column: img.parentElement.getBoundingClientRect().width, vh: innerHeight}; })()"""
    )
    assert size["nw"] == size["nh"] == 64
    assert abs(size["w"] - size["column"]) < 1, size  # fills its column's width
    assert abs(size["h"] - size["w"] * size["nh"] / size["nw"]) < 1, size  # aspect kept
    assert size["w"] >= 4 * size["nw"], size  # scaled up on a wide page, not drawn at 64 px
    assert size["h"] <= 0.75 * size["vh"] + 1, size  # and never taller than the window allows

    line = tab.wait(
        r"(t => /^running live \| \d+\.\d+ fps/.test(t) && !t.startsWith('running live | 0.00') && t)"
        "(document.getElementById('status').textContent)",
        "the status line with a running state and fps",
    )
    assert re.search(
        r"latency \d+\.\d ms \| engine \d+\.\d ms \| skip \d+% \| dropped \d+ \| frames \d+", line
    )

    # the plot has drawn its lines (bright pixels below the legend; the grid is dark grey)
    tab.wait(
        """(() => { const c = document.getElementById('plot'), top = Math.ceil(20 * devicePixelRatio);
        const d = c.getContext('2d').getImageData(0, top, c.width, c.height - top).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (Math.max(d[i], d[i + 1], d[i + 2]) > 150) n++;
        return n > 20; })()""",
        "the fps / frame-time plot drawn",
    )
    states = tab.wait(
        "(t => t.includes('output preview') && t) (document.querySelector('#io tbody').innerText)",
        "the input and output states",
    )
    rows = [row.split("\t") for row in states.strip().split("\n")]
    assert rows[0][:2] == ["input", "open"], rows
    assert rows[1][:2] == ["output preview", "open"], rows
    assert tab.problems() == []


def test_form_follows_osc_without_fighting_the_edited_control(tab: Tab, live: Any) -> None:
    bridge, url, osc = live
    tab.open(url)
    tab.wait(f"{control('prompt')}.value === 'a photo of a cat, studio lighting'", "the start-up prompt")
    client = SimpleUDPClient(*osc)
    client.send_message("/sd/prompt", "neon city")
    client.send_message("/sd/guidance", 2.5)
    client.send_message("/sd/freeze", True)
    tab.wait(
        f"{control('prompt')}.value === 'neon city' && {control('guidance', 'number')}.value === '2.5'"
        f" && {control('guidance', 'range')}.value === '2.5' && {control('freeze')}.checked",
        "the form following changes made over OSC",
    )

    # a field being typed into is left alone while the others follow, also once the typist has
    # paused past the 2 s edit guard (the focus alone holds it then)
    tab.eval(f"{control('prompt')}.focus(), {control('prompt')}.select()")
    tab.call("Input.insertText", text="my own words")
    time.sleep(2.5)
    client.send_message("/sd/prompt", "another city")
    client.send_message("/sd/guidance", 3.5)
    tab.wait(f"{control('guidance', 'number')}.value === '3.5'", "guidance following while prompt is edited")
    assert bridge.store.get("prompt") == "another city"  # the page saw it and left the field alone
    assert tab.eval(f"{control('prompt')}.value") == "my own words"

    # a slider dragged but not released sends nothing and returns to the live value after the guard
    tab.eval(
        f"{control('guidance', 'range')}.value = 9, {control('guidance', 'range')}.dispatchEvent(new Event('input'))"
    )
    assert tab.eval(f"{control('guidance', 'number')}.value") == "9"  # the pair moves together
    tab.wait(
        f"{control('guidance', 'range')}.value === '3.5' && {control('guidance', 'number')}.value === '3.5'",
        "an abandoned slider edit giving way to the live value",
        timeout_s=10,
    )
    assert bridge.store.get("guidance") == 3.5

    # Enter sends the field; the checkbox and the random seed button send theirs (form-encoded POSTs)
    for kind in ("keyDown", "keyUp"):
        tab.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
    tab.eval(f"{control('freeze')}.click()")
    tab.eval("document.querySelector('button.random').click()")
    seed = int(tab.eval(f"{control('seed')}.value"))
    deadline = time.monotonic() + 10
    while (bridge.store.get("prompt"), bridge.store.get("freeze"), bridge.store.get("seed")) != (
        "my own words",
        False,
        seed,
    ):
        assert time.monotonic() < deadline, (bridge.store.snapshot(), seed)
        time.sleep(0.1)
    assert tab.eval("document.getElementById('form-error').textContent") == ""
    assert tab.problems() == []


# ---------------------------------------------------------------- against a bare preview server


def test_a_single_frame_shows_at_once_and_any_status_shape_is_shown(tab: Tab) -> None:
    current: dict[str, Any] = {}
    ctx = SinkContext(width=64, height=48, status=lambda: dict(current), params=table())
    sink = PreviewSink(port=0, fps=0, ctx=ctx)
    try:
        pixels = np.zeros((48, 64, 4), np.uint8)
        pixels[..., 0] = 255
        sink.write(Frame(pixels, 1))  # the only frame there will be: nothing pushes it out
        tab.open(sink.url)
        tab.wait("document.getElementById('out').naturalWidth === 64", "the only frame drawn", timeout_s=10)
        assert tab.eval("document.getElementById('out').naturalHeight") == 48
        # an empty status: placeholders, no errors
        tab.wait(
            "document.getElementById('status').textContent.startsWith('– | – fps | latency – ms')",
            "placeholders for absent status fields",
        )
        current.update(
            state="running",
            fps=0.4,
            exposure_ev=1.25,  # a field this page has never heard of
            params={"guidance": 7.25, "prompt": "slow bridge"},
            inputs=[{"label": "camera", "state": "reopening", "error": "camera: no frames for 2.0 s"}],
            outputs={"shm": {"state": "open", "written": 12, "last_error": "output shm: OSError: earlier"}},
        )
        tab.wait(
            "(t => t.includes('0.40 fps') && t.includes('exposure_ev 1.25'))"
            "(document.getElementById('status').textContent)",
            "a fraction of a frame per second and a new field shown",
        )
        tab.wait(f"{control('prompt')}.value === 'slow bridge'", "the form following")
        assert tab.eval(f"{control('guidance', 'number')}.value") == "7.25"
        rows = tab.eval("document.querySelector('#io tbody').innerText").strip().split("\n")
        assert rows == [
            "input camera\treopening\t\tcamera: no frames for 2.0 s",
            "output shm\topen\t12\tearlier: output shm: OSError: earlier",
        ]
        assert tab.problems() == []
        assert tab.eval(DRAWN_RGB) == [255, 0, 0]

        # the bridge restarts on the same port: the page reconnects its stream by itself
        port = sink.port
        sink.close()
        tab.wait(
            "document.getElementById('status').textContent.startsWith('bridge not reachable')",
            "the page noticing the bridge has gone",
        )
        sink = PreviewSink(port=port, fps=0, ctx=ctx)
        pixels[..., :3] = (0, 0, 255)
        sink.write(Frame(pixels, 1))
        tab.wait(f"JSON.stringify({DRAWN_RGB}) === '[0,0,255]'", "the restarted bridge's frame drawn")
        assert tab.problems() == []
    finally:
        sink.close()


# The colour at the centre of the output image as drawn now (a canvas copy of the <img>).
DRAWN_RGB = """(() => { const img = document.getElementById('out'), c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d');
    g.drawImage(img, 0, 0); const d = g.getImageData(c.width >> 1, c.height >> 1, 1, 1).data;
    return [d[0], d[1], d[2]].map(v => Math.round(v / 16) * 16 > 255 ? 255 : Math.round(v / 16) * 16); })()"""
