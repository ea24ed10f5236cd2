"""The preview page: a localhost HTTP server showing the output as MJPEG, a live status line, a
plot, each input's and output's state, and form controls generated from the parameter table
(the page itself is `preview_page.py`). Open http://127.0.0.1:7860/ in a browser.

Routes: `/` the page, `/stream.mjpg` the MJPEG stream, `/frame.jpg` the newest frame,
`/status` status and parameter values as JSON, `/params` the table, POST `/set` (form fields
`name` and `value`) to change a parameter.

The server stands behind `bridge.webguard`: Host and Origin checks, form bodies of at most
64 KB, a deadline per request and a cap on connections; with `token` set, every request needs it.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from PIL import Image

from bridge.frames import Frame
from bridge.transports.base import SinkContext, TransportUnavailable
from bridge.transports.preview_page import page
from bridge.webguard import MAX_CONNECTIONS, TIMEOUT_S, GuardedHandler, GuardedServer, Refusal, is_loopback

log = logging.getLogger(__name__)
BOUNDARY = "sdbridgeframe"
# The head of each MJPEG part, sent right after the previous frame rather than with the next:
# Chromium draws a part only once the head of the part after it has arrived, so a frame sent
# with its own head alone stays invisible until the next frame comes (seconds, on a slow
# bridge; never, when one frame is all there is). Parts therefore carry no Content-Length
# (RFC 2046 needs none; a reader finds the end of a frame at the next boundary).
PART_HEAD = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n\r\n".encode()


class PreviewSink:
    """Encodes at most `fps` frames a second to JPEG; each HTTP client streams on its own
    thread, so a slow browser delays only itself. `close()` stops the server (idempotent)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 7860,
        fps: float = 30.0,
        quality: int = 80,
        allowed_hosts: Sequence[str] = (),
        token: str = "",
        timeout_s: float = TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        ctx: SinkContext,
    ) -> None:
        self.ctx = ctx
        self.quality = quality
        self.period_s = 1.0 / fps if fps > 0 else 0.0
        self._jpeg = b""
        self._frame_id = 0
        self._last_encode = 0.0
        self._cond = threading.Condition()
        self._closed = False
        self.encoded = 0
        try:
            self._server = GuardedServer(
                (host, port),
                self._handler_class(),
                label="preview",
                allowed_hosts=allowed_hosts,
                token=token,
                setting="the preview's allowed_hosts (extra_outputs.N.allowed_hosts)",
                timeout_s=timeout_s,
                max_connections=max_connections,
            )
        except OSError as exc:
            # Final, not retried: a port another process holds stays taken, and a bridge that
            # ran on without its preview would show the other process's page at this address.
            raise TransportUnavailable(
                f"the preview cannot listen on http://{host}:{port}/: {exc.strerror or exc}. "
                "Is another bridge running? Stop it, or pick another port: "
                "--set extra_outputs.0.port=... for the default preview (output.port when the "
                "preview is the main output)"
            ) from exc
        self.host, self.port = str(self._server.server_address[0]), int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="preview-http", daemon=True
        )
        self._thread.start()
        log.info("preview at %s", self.url)
        if not is_loopback(host):
            log.warning(
                "the preview at %s is reachable from other machines, and whoever reaches it can change the show%s",
                self.url,
                "; it asks for its token"
                if token
                else "; set a token (the preview's `token` setting) to ask for one",
            )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def write(self, frame: Frame) -> None:
        now = time.perf_counter()
        if now - self._last_encode < self.period_s:
            return  # over the preview's frame-rate cap; the other sinks still get every frame
        self._last_encode = now
        buf = io.BytesIO()
        Image.fromarray(frame.pixels[..., :3]).save(buf, "JPEG", quality=self.quality)
        with self._cond:
            self._jpeg = buf.getvalue()
            self._frame_id += 1
            self.encoded += 1
            self._cond.notify_all()

    def next_jpeg(self, after: int, timeout_s: float) -> tuple[int, bytes] | None:
        """The first JPEG newer than frame id `after`, waiting up to `timeout_s`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._frame_id > after or self._closed, timeout_s):
                return None
            if self._closed:
                return None
            return self._frame_id, self._jpeg

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=1.0)

    def _handler_class(self) -> type[GuardedHandler]:
        sink = self

        class Handler(GuardedHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("preview: " + format, *args)

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def _json(self, code: int, data: Any) -> None:
                self._send(code, json.dumps(data).encode(), "application/json")

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/":
                    self._send(200, page(sink.ctx).encode(), "text/html; charset=utf-8")
                elif path == "/status":
                    self._json(200, dict(sink.ctx.status()))
                elif path == "/params":
                    self._json(200, list(sink.ctx.params))
                elif path == "/frame.jpg":
                    got = sink.next_jpeg(-1, 0.0) if sink._frame_id else sink.next_jpeg(0, 2.0)
                    if got is None:
                        self._send(503, b"no frame yet", "text/plain")
                    else:
                        self._send(200, got[1], "image/jpeg")
                elif path == "/stream.mjpg":
                    self._stream()
                else:
                    self._send(404, b"not found", "text/plain")

            def _stream(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                last = max(sink._frame_id - 1, 0)  # start with the newest frame
                try:
                    self.wfile.write(PART_HEAD)
                    while not sink._closed:
                        got = sink.next_jpeg(last, 1.0)
                        if got is None:
                            continue
                        last, jpeg = got
                        # each frame ends with the next part's head: see PART_HEAD
                        self.wfile.write(jpeg + b"\r\n" + PART_HEAD)
                        self.wfile.flush()
                except OSError:
                    pass  # the browser went away, or stopped reading past the write timeout

            def do_POST(self) -> None:
                if self.path != "/set":
                    self._send(404, b"not found", "text/plain")
                    return
                try:
                    form = self.read_form()
                except Refusal as refusal:
                    self.refuse(refusal)
                    return
                name = (form.get("name") or [""])[0]
                error = sink.ctx.submit(name, form.get("value") or [""])
                self._json(400 if error else 200, {"ok": not error, "error": error})

        return Handler
