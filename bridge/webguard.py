"""The guard both HTTP servers (the preview page, OSCQuery) stand behind.

What it holds off:
- unbounded work: a request head and body must arrive within `timeout_s` in all (a slowloris
  that trickles a byte a second is cut off), a body is read only with one valid
  `Content-Length` of at most 64 KB, and the server serves at most `max_connections`
  connections at a time (one thread each); the next ones get a 503 and are closed at once;
- DNS rebinding: a `Host` that is not the bound address, `localhost`, a loopback address or a
  configured name is refused, for every method. A wildcard bind also accepts any IP literal
  (a rebinding page always names its own domain, never an address);
- cross-site requests (CSRF): a state-changing request whose `Origin` is not this server's own
  (also `Origin: null`) is refused, and bodies must be `application/x-www-form-urlencoded`;
  a browser's same-origin fetch sends the page's own origin and passes;
- optionally, a token: with `token` set, every request carries it as the `sdbridge_token`
  cookie (set by opening any page once with `?token=...`) or the `X-Sdbridge-Token` header.

No torch here: `control` and `transports` both import this module.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import select
import socket
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from bridge.params import cut

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # bytes; a form with a long prompt fits many times over
TIMEOUT_S = 10.0  # a whole request head and body, and any socket read or write
MAX_CONNECTIONS = 32  # at once; each holds one thread
LOG_EVERY_S = 2.0  # at most one log line per server about refused requests
FORM = "application/x-www-form-urlencoded"
TOKEN_COOKIE = "sdbridge_token"
TOKEN_HEADER = "X-Sdbridge-Token"
WILDCARDS = ("", "0.0.0.0", "::")
_DIGITS = re.compile(r"[0-9]{1,18}")


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name in a `Host` header or URL netloc, lower case, without port or brackets:
    "[::1]:7860" -> "::1", "LocalHost.:80" -> "localhost"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Refusal(Exception):
    """A request the guard turns away: `status` and a reason that says what to do."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Guard:
    """Who may talk to one server bound to `host`:`port`. `allowed_hosts` are the extra names
    (a machine name, a DNS name) clients may use in `Host` and `Origin`; `setting` is the config
    key that lists them, named in refusals."""

    host: str
    port: int
    allowed_hosts: Collection[str] = ()
    token: str = ""
    setting: str = "allowed_hosts"
    timeout_s: float = TIMEOUT_S
    names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        names = {"localhost", "127.0.0.1", "::1", *(host_name(h) for h in self.allowed_hosts)}
        if self.host not in WILDCARDS:
            names.add(host_name(self.host))
        object.__setattr__(self, "names", frozenset(names))

    def host_allowed(self, name: str) -> bool:
        if name in self.names:
            return True
        return self.host in WILDCARDS and _is_ip(name)

    def check_host(self, value: str | None) -> None:
        """Raises `Refusal` for a `Host` header naming someone else (DNS rebinding)."""
        if value is None:
            raise Refusal(400, "the request has no Host header (HTTP/1.1 requires one)")
        name = host_name(value)
        if not self.host_allowed(name):
            raise Refusal(
                403,
                f"Host {cut(value)!r} is not this bridge's address ({self.host}, localhost); "
                f"if it is a name of this machine, add it to {self.setting}",
            )

    def check_origin(self, value: str | None, host: str | None) -> None:
        """Raises `Refusal` unless `Origin` is absent (not a browser) or the page's own: the
        origin of the `Host` the request went to (after `check_host`). Comparing with Host, not
        with a list, keeps a wildcard bind safe too: a page on another address may share the
        port, never the address."""
        if value is None:
            return
        if value.strip() == "null":
            raise Refusal(403, "Origin null (a sandboxed or local page) may not change the show")
        url = urlsplit(value.strip())
        target = urlsplit(f"//{host or ''}")
        try:
            port, target_port = url.port or {"http": 80}.get(url.scheme), target.port or 80
        except ValueError:  # a port that is not a number
            port, target_port = None, 0
        name = host_name(url.hostname or "")
        same = name == host_name(target.hostname or "") and port == target_port
        if url.scheme != "http" or not same or not self.host_allowed(name):
            raise Refusal(
                403,
                f"Origin {cut(value)!r} is another site; only pages served by this bridge "
                f"(http://{cut(host or '?', 100)}) may change the show",
            )

    def token_ok(self, request: BaseHTTPRequestHandler) -> bool:
        if not self.token:
            return True
        given = request.headers.get(TOKEN_HEADER) or _cookie(
            request.headers.get("Cookie") or "", TOKEN_COOKIE
        )
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


class _DeadlineReader:
    """The connection's input, read through one deadline per request: each `recv` waits at most
    the time left, so a client trickling bytes cannot hold a thread past `timeout_s`."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self._sock = sock
        self._timeout_s = timeout_s
        self._buffer = bytearray()
        self._deadline = time.monotonic() + timeout_s
        self.closed = False

    def restart(self, timeout_s: float) -> None:
        self._deadline = time.monotonic() + timeout_s

    def _fill(self) -> bool:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(left)
        try:
            chunk = self._sock.recv(65536)
        finally:
            self._sock.settimeout(self._timeout_s)  # what writes wait at most
        self._buffer += chunk
        return bool(chunk)

    def readline(self, limit: int = -1) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0 and (limit < 0 or end < limit):
                return self._take(end + 1)
            if 0 <= limit <= len(self._buffer):
                return self._take(limit)
            if not self._fill():
                return self._take(len(self._buffer))

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            raise ValueError("read() needs a length here: the guard never reads to the end of a stream")
        while len(self._buffer) < n and self._fill():
            pass
        return self._take(min(n, len(self._buffer)))

    def take_buffered(self) -> bytes:
        """What the client sent after the request head (a WebSocket's first frames)."""
        return self._take(len(self._buffer))

    def _take(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def close(self) -> None:
        self.closed = True


class GuardedHandler(BaseHTTPRequestHandler):
    """A request handler whose `Host` (and token) is checked before any `do_*` runs. Subclasses
    call `read_form()` for a state-changing request."""

    server: GuardedServer
    rfile: Any  # a _DeadlineReader (BaseHTTPRequestHandler's type is a BufferedIOBase)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's buffered file: replaced by a reader with a deadline
        self.rfile = _DeadlineReader(self.connection, self.server.guard.timeout_s)
        self.connection.settimeout(self.server.guard.timeout_s)  # writes too: a stuck reader is dropped

    def handle_one_request(self) -> None:
        self.rfile.restart(self.server.guard.timeout_s)
        super().handle_one_request()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        guard = self.server.guard
        try:
            if self.request_version != "HTTP/1.0" or self.headers.get("Host") is not None:
                guard.check_host(self.headers.get("Host"))
        except Refusal as refusal:
            self.refuse(refusal)
            return False
        if guard.token and not guard.token_ok(self):
            url = urlsplit(self.path)
            query = parse_qs(url.query, keep_blank_values=True)
            given = (query.pop("token", None) or [""])[0]
            if given and hmac.compare_digest(given.encode(), guard.token.encode()):
                self._set_token_cookie(url.path, urlencode(query, doseq=True))
            else:
                self.refuse(
                    Refusal(
                        401,
                        "this bridge needs its token: open the page once as "
                        f"http://HOST:{guard.port}/?token=<the preview's token setting>",
                    )
                )
            return False
        return True

    def _set_token_cookie(self, path: str, query: str) -> None:
        """The one request that carries the token in its URL: remember it in a cookie and send
        the browser on to the same page without it (so it leaves no trace in the address bar)."""
        self.send_response(303)
        self.send_header("Location", path + (f"?{query}" if query else ""))
        self.send_header(
            "Set-Cookie", f"{TOKEN_COOKIE}={self.server.guard.token}; Path=/; HttpOnly; SameSite=Strict"
        )
        self.send_header("Content-Length", "0")
        self.end_headers()

    def refuse(self, refusal: Refusal) -> None:
        """Answer with the refusal as JSON and close the connection (an unread body must never
        be taken for the next request)."""
        self.server.note_refusal(
            f"{self.command} {cut(self.path, 80)} from {self.client_address[0]}: {refusal.reason}"
        )
        self.close_connection = True
        body = json.dumps({"ok": False, "error": refusal.reason}).encode()
        self.send_response(refusal.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def read_form(self) -> dict[str, list[str]]:
        """The body of a state-changing request as form fields. Raises `Refusal` (403 for a foreign
        origin, 415 for another body type, 400 for a bad length, 413 over 64 KB) before reading
        anything it would refuse."""
        self.server.guard.check_origin(self.headers.get("Origin"), self.headers.get("Host"))
        kind = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if kind != FORM:
            raise Refusal(415, f"the body must be {FORM} (a form), got {cut(kind or 'no Content-Type')!r}")
        if self.headers.get("Transfer-Encoding") is not None:
            raise Refusal(400, "chunked bodies are not accepted; send a Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise Refusal(400, "the request has a body but no Content-Length; send one")
        if len(set(lengths)) > 1 or not _DIGITS.fullmatch(lengths[0].strip()):
            raise Refusal(400, f"Content-Length must be one number >= 0, got {cut(', '.join(lengths))!r}")
        length = int(lengths[0])
        if length > MAX_BODY:
            raise Refusal(413, f"the body is {length} bytes; at most {MAX_BODY} are accepted")
        body = self.rfile.read(length)
        if len(body) < length:
            raise Refusal(400, f"the body ended after {len(body)} of {length} bytes")
        return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=100)


class GuardedServer(ThreadingHTTPServer):
    """A threading HTTP server with at most `max_connections` connection threads at once."""

    daemon_threads = True
    request_queue_size = (
        128  # the listen backlog: a burst is accepted (and answered) rather than left in SYN retries
    )

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[GuardedHandler],
        *,
        label: str,
        allowed_hosts: Collection[str] = (),
        token: str = "",
        setting: str = "allowed_hosts",
        timeout_s: float = TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__(address, handler)
        self.label = label
        self.guard = Guard(
            host=address[0],
            port=int(self.server_address[1]),
            allowed_hosts=allowed_hosts,
            token=token,
            setting=setting,
            timeout_s=timeout_s,
        )
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0  # connections turned away because all slots were busy
        self.refusals = 0  # requests refused by the guard
        self._log_lock = threading.Lock()
        self._logged_at = -LOG_EVERY_S
        self._unlogged = 0

    def note_refusal(self, what: str) -> None:
        """Count a refused request and log it, at most one line per `LOG_EVERY_S` (a flood of bad
        requests must not flood the log), saying how many went unlogged in between."""
        with self._log_lock:
            self.refusals += 1
            now = time.monotonic()
            if now - self._logged_at < LOG_EVERY_S:
                self._unlogged += 1
                return
            unlogged, self._unlogged, self._logged_at = self._unlogged, 0, now
        more = f" (and {unlogged} more refused since the last line)" if unlogged else ""
        log.warning("%s refused %s%s", self.label, what, more)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            log.debug(
                "%s: %d connections open, refusing %s", self.label, self.max_connections, client_address
            )
            _busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _busy(sock: socket.socket) -> None:
    body = b'{"ok": false, "error": "too many connections; try again"}'
    head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    try:
        if select.select([], [sock], [], 0)[1]:
            sock.setblocking(False)
            sock.send(head.encode() + b"Connection: close\r\nRetry-After: 1\r\n\r\n" + body)
    except OSError:
        pass  # the client is gone or its buffer is full: closing is answer enough
