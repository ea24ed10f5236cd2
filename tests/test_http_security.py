"""The preview and OSCQuery HTTP servers under attack, over raw sockets (issue 11, items 1 and 2):
bad and huge Content-Lengths, slowloris, a flood of idle connections, cross-site posts and
DNS rebinding. Each server runs for real on a free loopback port; the parameter store behind
the preview is real, and "changed nothing" is read from it."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bridge.control.oscquery import OscQueryServer
from bridge.params import BY_NAME, ParamError, ParamStore, coerce, table, text_args
from bridge.transports.base import SinkContext
from bridge.transports.preview import PreviewSink

TIMEOUT_S = 1.0  # the servers' per-request deadline in these tests
CAP = 8  # their connection cap


def _form_submit(store: ParamStore) -> Any:
    """What the runtime hands the preview: text fields -> coerced value -> the store."""

    def submit(name: str, raw: Any) -> str:
        param = BY_NAME.get(name)
        if param is None:
            return f"no parameter {name!r}"
        try:
            value = coerce(param, [a for item in raw for a in text_args(param, item)]).value
        except ParamError as exc:
            return str(exc)
        store.submit(name, value)
        return ""

    return submit


@pytest.fixture
def store() -> ParamStore:
    return ParamStore({})


def start(kind: str, store: ParamStore, timeout_s: float = TIMEOUT_S) -> Any:
    """A running preview or OSCQuery server on a free port, in front of `store`."""
    if kind == "preview":
        ctx = SinkContext(status=lambda: {"state": "running"}, submit=_form_submit(store), params=table())
        return PreviewSink(port=0, ctx=ctx, timeout_s=timeout_s, max_connections=CAP)
    server = OscQueryServer(
        host="127.0.0.1",
        port=0,
        osc_port=7000,
        values=store.snapshot,
        status=dict,
        advertise=False,
        timeout_s=timeout_s,
        max_connections=CAP,
    )
    server.start()
    return server


@pytest.fixture
def preview(store: ParamStore) -> Iterator[PreviewSink]:
    sink = start("preview", store)
    yield sink
    sink.close()


@pytest.fixture
def oscquery(store: ParamStore) -> Iterator[OscQueryServer]:
    server = start("oscquery", store)
    yield server
    server.close()


def exchange(port: int, data: bytes, *, wait_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send `data` on a fresh connection and read one reply: status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        return read_reply(sock)


def read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed without a reply after {raw!r}"
        raw += chunk
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def post(port: int, body: bytes, *extra: str, host: str = "") -> bytes:
    head = ["POST /set HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


FORM = "Content-Type: application/x-www-form-urlencoded"
SEED = b"name=seed&value=9"


def closed_within(sock: socket.socket, bound_s: float, trickle: bytes = b"") -> float:
    """Seconds until the server closes `sock` (sending `trickle` a byte at a time, every 0.2 s,
    as a slowloris does); fails past `bound_s`."""
    started = time.monotonic()
    sock.settimeout(0.2)
    sent = 0
    while time.monotonic() - started < bound_s:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - started
        if trickle:
            try:
                sock.sendall(trickle[sent % len(trickle) : sent % len(trickle) + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
            sent += 1
    raise AssertionError(f"the connection was still open after {bound_s} s")


# ---------------------------------------------------------------------------- bodies
@pytest.mark.parametrize(
    ("length_header", "reason"),
    [
        ("Content-Length: -1", "Content-Length must be one number"),
        ("Content-Length: abc", "Content-Length must be one number"),
        ("Content-Length: 17\r\nContent-Length: 9", "Content-Length must be one number"),
        ("", "no Content-Length"),
    ],
)
def test_a_bad_or_missing_length_is_a_400_and_the_body_is_not_read(
    preview: PreviewSink, store: ParamStore, length_header: str, reason: str
) -> None:
    extra = [FORM, length_header] if length_header else [FORM]
    status, headers, body = exchange(preview.port, post(preview.port, SEED, *extra))
    assert status == 400 and reason in json.loads(body)["error"]
    assert headers["connection"] == "close"
    assert store.latest("seed") == 2  # the body was not taken as a form


def test_a_150_mb_body_is_refused_with_413_unread_and_the_server_serves_on(
    preview: PreviewSink, store: ParamStore
) -> None:
    claimed = 150 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", preview.port), timeout=5) as sock:
        sock.sendall(post(preview.port, SEED, FORM, f"Content-Length: {claimed}"))  # 17 of 150 MB
        started = time.monotonic()
        status, _, body = read_reply(sock)
        assert time.monotonic() - started < TIMEOUT_S  # answered at once, not after waiting for the body
    assert (
        status == 413
        and json.loads(body)["error"] == f"the body is {claimed} bytes; at most 65536 are accepted"
    )
    assert store.latest("seed") == 2
    ok = post(preview.port, SEED, FORM, f"Content-Length: {len(SEED)}")
    assert exchange(preview.port, ok)[0] == 200 and store.latest("seed") == 9


def test_a_body_under_64_kb_is_read_whole(preview: PreviewSink, store: ParamStore) -> None:
    prompt = "a" * 1_500  # under the table's prompt cap; the padding field makes the body ~60 KB
    form = f"name=prompt&value={prompt}&pad={'x' * 58_000}".encode()
    status, _, _ = exchange(preview.port, post(preview.port, form, FORM, f"Content-Length: {len(form)}"))
    assert status == 200 and store.latest("prompt") == prompt


# ---------------------------------------------------------------------------- time and connections
@pytest.mark.parametrize("server", ["preview", "oscquery"])
def test_an_idle_and_a_trickling_connection_are_closed_after_the_deadline(
    server: str, request: pytest.FixtureRequest
) -> None:
    port = request.getfixturevalue(server).port
    with socket.create_connection(("127.0.0.1", port)) as idle:
        assert closed_within(idle, bound_s=TIMEOUT_S + 4) >= TIMEOUT_S * 0.9
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\n")
        assert (
            closed_within(slow, bound_s=TIMEOUT_S + 4, trickle=b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaa\r\n") >= 0.8
        )


@pytest.mark.parametrize("kind", ["preview", "oscquery"])
def test_200_idle_connections_do_not_make_200_threads(kind: str, store: ParamStore) -> None:
    # a deadline longer than the flood takes to connect, so no slot comes free meanwhile
    server = start(kind, store, timeout_s=30.0)
    port = server.port
    before = threading.active_count()
    sockets: list[socket.socket] = []
    try:
        sockets += [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
        time.sleep(0.3)  # let the server accept what it will
        assert threading.active_count() - before <= CAP
        busy = 0
        for sock in sockets:
            sock.settimeout(0.05)
            with contextlib.suppress(TimeoutError):
                busy += sock.recv(65536).startswith(b"HTTP/1.1 503 Service Unavailable")
        assert busy >= 200 - CAP - 5  # turned away at once (a few may still wait in the listen backlog)
        for sock in sockets:
            sock.close()  # the held slots come free as their clients go
        deadline = time.monotonic() + 5
        while True:
            status = exchange(port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())[0]
            if status == 200:
                break
            assert time.monotonic() < deadline, f"the server still answers {status} after the flood"
            time.sleep(0.1)
    finally:
        for sock in sockets:
            sock.close()
        server.close()


# ---------------------------------------------------------------------------- CSRF and rebinding
@pytest.mark.parametrize(
    ("extra", "status", "reason"),
    [
        (["Origin: http://evil.example", FORM], 403, "Origin 'http://evil.example' is another site"),
        (["Origin: null", FORM], 403, "Origin null"),
        (["Origin: http://127.0.0.1:1", FORM], 403, "is another site"),  # another port, another origin
        (["Content-Type: text/plain"], 415, "the body must be application/x-www-form-urlencoded"),
        (["Content-Type: multipart/form-data; boundary=x"], 415, "got 'multipart/form-data'"),
        ([], 415, "got 'no Content-Type'"),
    ],
)
def test_a_cross_site_post_changes_nothing(
    preview: PreviewSink, store: ParamStore, extra: list[str], status: int, reason: str
) -> None:
    data = post(preview.port, SEED, *extra, f"Content-Length: {len(SEED)}")
    got, _, body = exchange(preview.port, data)
    assert got == status and reason in json.loads(body)["error"]
    assert store.latest("seed") == 2


@pytest.mark.parametrize("origin_host", ["127.0.0.1", "localhost"])
def test_the_pages_own_post_reaches_the_store(
    preview: PreviewSink, store: ParamStore, origin_host: str
) -> None:
    """A browser's same-origin fetch of the page's form: Origin is the page's own."""
    origin = f"Origin: http://{origin_host}:{preview.port}"
    data = post(preview.port, SEED, origin, FORM + "; charset=UTF-8", f"Content-Length: {len(SEED)}",
                host=f"{origin_host}:{preview.port}")  # fmt: skip
    status, _, body = exchange(preview.port, data)
    assert (status, json.loads(body)) == (200, {"ok": True, "error": ""})
    assert store.latest("seed") == 9


@pytest.mark.parametrize("server", ["preview", "oscquery"])
@pytest.mark.parametrize("host", ["evil.example", "evil.example:7860", "127.0.0.1.evil.example"])
def test_a_foreign_host_is_refused(server: str, host: str, request: pytest.FixtureRequest) -> None:
    port = request.getfixturevalue(server).port
    status, _, body = exchange(port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert status == 403 and f"Host {host!r} is not this bridge's address" in json.loads(body)["error"]
    for mine in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert exchange(port, f"GET / HTTP/1.1\r\nHost: {mine}\r\n\r\n".encode())[0] == 200, mine


def test_a_configured_name_is_served(store: ParamStore) -> None:
    server = OscQueryServer(
        host="127.0.0.1", port=0, osc_port=7000, values=store.snapshot, status=dict, advertise=False,
        allowed_hosts=["studio-pc.local"],
    )  # fmt: skip
    server.start()
    try:
        host = f"Host: studio-pc.local:{server.port}"
        assert exchange(server.port, f"GET / HTTP/1.1\r\n{host}\r\n\r\n".encode())[0] == 200
        refused = exchange(server.port, b"GET / HTTP/1.1\r\nHost: other.local\r\n\r\n")
        assert refused[0] == 403 and "add it to osc.oscquery_allowed_hosts" in json.loads(refused[2])["error"]
    finally:
        server.close()


def test_a_websocket_from_another_site_or_host_is_refused(oscquery: OscQueryServer) -> None:
    upgrade = (
        "GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{origin}\r\n"
    )
    mine = f"127.0.0.1:{oscquery.port}"
    refused = exchange(
        oscquery.port, upgrade.format(host=mine, origin="Origin: http://evil.example\r\n").encode()
    )
    assert refused[0] == 403
    assert exchange(oscquery.port, upgrade.format(host="evil.example", origin="").encode())[0] == 403
    with socket.create_connection(("127.0.0.1", oscquery.port), timeout=5) as sock:
        sock.sendall(upgrade.format(host=mine, origin=f"Origin: http://{mine}\r\n").encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 Switching Protocols")


# ---------------------------------------------------------------------------- the token
def test_with_a_token_every_request_needs_it_and_the_page_keeps_working(store: ParamStore) -> None:
    ctx = SinkContext(status=lambda: {"state": "running"}, submit=_form_submit(store), params=table())
    sink = PreviewSink(port=0, ctx=ctx, token="s3cret", timeout_s=TIMEOUT_S)
    port = sink.port
    try:
        get = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        status, _, body = exchange(port, (get + "\r\n").encode())
        assert status == 401 and "/?token=" in json.loads(body)["error"]
        assert (
            exchange(port, f"GET /?token=wrong HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())[0] == 401
        )
        status, headers, _ = exchange(
            port, f"GET /?token=s3cret HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        )
        assert status == 303 and headers["location"] == "/"
        assert headers["set-cookie"] == "sdbridge_token=s3cret; Path=/; HttpOnly; SameSite=Strict"
        cookie = "Cookie: sdbridge_token=s3cret"
        assert exchange(port, (get + cookie + "\r\n\r\n").encode())[0] == 200  # the page, then its fetches
        no_cookie = post(port, SEED, f"Origin: http://127.0.0.1:{port}", FORM, f"Content-Length: {len(SEED)}")
        assert exchange(port, no_cookie)[0] == 401 and store.latest("seed") == 2
        own = post(
            port, SEED, f"Origin: http://127.0.0.1:{port}", FORM, cookie, f"Content-Length: {len(SEED)}"
        )
        assert exchange(port, own)[0] == 200 and store.latest("seed") == 9
    finally:
        sink.close()


def test_a_preview_for_other_machines_warns_and_serves_its_addresses(
    store: ParamStore, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = SinkContext(submit=_form_submit(store), params=table())
    with caplog.at_level(logging.WARNING, logger="bridge.transports.preview"):
        sink = PreviewSink(host="0.0.0.0", port=0, ctx=ctx, timeout_s=TIMEOUT_S)
    try:
        assert "reachable from other machines" in caplog.text and "set a token" in caplog.text
        # a wildcard bind serves any address of the machine; names still have to be listed
        assert (
            exchange(sink.port, f"GET / HTTP/1.1\r\nHost: 127.0.0.2:{sink.port}\r\n\r\n".encode())[0] == 200
        )
        assert exchange(sink.port, b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")[0] == 403
        # a page on another address may share the port, never the address: Origin must match Host
        here = f"127.0.0.2:{sink.port}"
        for origin, status in ((f"http://10.9.9.9:{sink.port}", 403), (f"http://{here}", 200)):
            data = post(sink.port, SEED, f"Origin: {origin}", FORM, f"Content-Length: {len(SEED)}", host=here)
            assert exchange(sink.port, data)[0] == status, origin
        assert store.latest("seed") == 9
    finally:
        sink.close()


def test_websocket_listeners_outlive_the_deadline_and_count_against_the_cap(
    oscquery: OscQueryServer, store: ParamStore
) -> None:
    ws_client = pytest.importorskip("websockets.sync.client")
    from pythonosc.osc_message import OscMessage

    url = f"ws://127.0.0.1:{oscquery.port}/"
    get = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{oscquery.port}\r\n\r\n".encode()
    with contextlib.ExitStack() as stack:
        listeners = [stack.enter_context(ws_client.connect(url, open_timeout=5)) for _ in range(CAP)]
        assert exchange(oscquery.port, get)[0] == 503  # every slot is listening
        first = listeners[0]
        first.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/sd/delta"}))
        time.sleep(TIMEOUT_S * 2.5)  # idle past the deadline: a listener is not a slowloris
        store.commit("delta", 2.0)
        message = OscMessage(first.recv(timeout=5))
        assert (message.address, message.params) == ("/sd/delta", [2.0])
    deadline = time.monotonic() + 5
    while exchange(oscquery.port, get)[0] != 200:
        assert time.monotonic() < deadline, "closed listeners never gave their slots back"
        time.sleep(0.05)


# ---------------------------------------------------------------------------- a real browser
class Browser:
    """Headless Debian chromium driven over the DevTools protocol: one page, `goto(url)` and
    `run(js)` (an awaited expression's value)."""

    def __init__(self, tmp: Any) -> None:
        import subprocess

        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={tmp}", "about:blank"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        line = ""
        while "DevTools listening on" not in line:
            assert time.monotonic() < deadline and self.proc.poll() is None, "chromium did not start"
            line = self.proc.stderr.readline()
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        import urllib.request

        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(p for p in pages if p["type"] == "page")
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(
            connect(page["webSocketDebuggerUrl"], open_timeout=10, max_size=2**24)
        )
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=20))
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return dict(reply["result"])

    def goto(self, url: str, lands: str = "") -> None:
        """Open `url` and wait for its document (the MJPEG stream never finishes loading) at
        `lands` (default `url`; a redirect lands elsewhere)."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 20
        while self.run("document.readyState") == "loading" or self.run("location.href") != (lands or url):
            assert time.monotonic() < deadline, f"{url} did not load"
            time.sleep(0.1)

    def run(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return result["result"].get("value")

    def close(self) -> None:
        self._stack.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


# the page's own request, as its script sends it: a same-origin fetch with a form body
PAGE_POST = (
    "fetch('{url}set', {{method: 'POST', body: new URLSearchParams({{name: 'seed', value: '{seed}'}})}})"
    ".then(r => r.status, e => 'blocked: ' + e)"
)


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)"
)
def test_in_a_real_browser_the_page_posts_and_another_site_cannot(store: ParamStore, tmp_path: Any) -> None:
    pytest.importorskip("websockets.sync.client")
    ctx = SinkContext(status=lambda: {"state": "running"}, submit=_form_submit(store), params=table())
    preview = PreviewSink(port=0, ctx=ctx, token="s3cret")
    untokened = PreviewSink(port=0, ctx=ctx)  # the attacked one: no token, only the Origin check guards it
    elsewhere = PreviewSink(port=0, ctx=SinkContext())  # another origin: the same host, another port
    browser = Browser(tmp_path)
    try:
        browser.goto(f"{preview.url}?token=s3cret", lands=preview.url)  # once; then the cookie carries it
        assert browser.run("document.querySelector('[data-param]') !== null")  # the page itself, not a 401
        assert browser.run(PAGE_POST.format(url="/", seed=9)) == 200
        assert browser.run("fetch('/status').then(r => r.status)") == 200  # the page's polling
        assert browser.run("fetch('/stream.mjpg').then(r => r.status)") == 200  # and its <img>
        assert store.latest("seed") == 9
        browser.goto(f"http://localhost:{elsewhere.port}/")
        # a page elsewhere posts a plain form to the preview (no-cors: the browser sends it anyway)
        sneaky = PAGE_POST.format(url=untokened.url, seed=5).replace("{method:", "{mode: 'no-cors', method:")
        browser.run(sneaky)  # resolves once the server has answered
        assert store.latest("seed") == 9  # refused: a foreign Origin
    finally:
        browser.close()
        preview.close()
        untokened.close()
        elsewhere.close()


def test_refusals_are_counted_and_logged_a_line_at_a_time(
    preview: PreviewSink, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.webguard"):
        for _ in range(20):
            assert exchange(preview.port, b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")[0] == 403
    assert preview._server.refusals == 20
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and "preview refused GET / from 127.0.0.1: Host 'evil.example'" in lines[0]


def test_oscquery_speaks_http_1_1_and_keeps_the_connection(oscquery: OscQueryServer) -> None:
    with socket.create_connection(("127.0.0.1", oscquery.port), timeout=5) as sock:
        for path in ("/sd/guidance", "/?HOST_INFO", "/sd/guidance?VALUE"):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{oscquery.port}\r\n\r\n".encode())
            status, headers, body = read_reply(sock)
            assert status == 200 and headers.get("connection") != "close", path
        assert json.loads(body) == {"VALUE": [1.2]}
