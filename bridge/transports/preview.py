"""The preview page: a localhost HTTP server showing the output as MJPEG, a live status line and
form controls generated from the parameter table. Open http://127.0.0.1:7860/ in a browser.

Routes: `/` the page, `/stream.mjpg` the MJPEG stream, `/frame.jpg` the newest frame,
`/status` status and parameter values as JSON, `/params` the table, POST `/set` (form fields
`name` and `value`) to change a parameter.
"""

from __future__ import annotations

import html
import io
import json
import logging
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from PIL import Image

from bridge.frames import Frame
from bridge.transports.base import SinkContext, TransportUnavailable

log = logging.getLogger(__name__)
BOUNDARY = "sdbridgeframe"


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
            self._server = ThreadingHTTPServer((host, port), self._handler_class())
        except OSError as exc:
            # Final, not retried: a port another process holds stays taken, and a bridge that
            # ran on without its preview would show the other process's page at this address.
            raise TransportUnavailable(
                f"the preview cannot listen on http://{host}:{port}/: {exc.strerror or exc}. "
                "Is another bridge running? Stop it, or pick another port: "
                "--set extra_outputs.0.port=... for the default preview (output.port when the "
                "preview is the main output)"
            ) from exc
        self._server.daemon_threads = True
        self.host, self.port = str(self._server.server_address[0]), int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="preview-http", daemon=True
        )
        self._thread.start()
        log.info("preview at %s", self.url)

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

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
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
                    while not sink._closed:
                        got = sink.next_jpeg(last, 1.0)
                        if got is None:
                            continue
                        last, jpeg = got
                        head = (
                            f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                        )
                        self.wfile.write(head.encode() + jpeg + b"\r\n")
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the browser went away

            def do_POST(self) -> None:
                if self.path != "/set":
                    self._send(404, b"not found", "text/plain")
                    return
                length = min(int(self.headers.get("Content-Length") or 0), 65536)
                form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"), keep_blank_values=True)
                name = (form.get("name") or [""])[0]
                error = sink.ctx.submit(name, form.get("value") or [""])
                self._json(400 if error else 200, {"ok": not error, "error": error})

        return Handler


def _control(row: Mapping[str, Any]) -> str:
    name, kind, default = row["name"], row["type"], row["default"]
    esc = html.escape(name)
    if kind == "bool":
        checked = " checked" if default else ""
        return f'<input type="checkbox" name="{esc}"{checked} onchange="send(this.name, this.checked)">'
    if kind in ("float", "int"):
        step = "any" if kind == "float" else "1"
        lo, hi = row["min"], row["max"]
        return (
            f'<input type="range" name="{esc}" min="{lo}" max="{hi}" step="{step if kind == "int" else (hi - lo) / 200}" '
            f'value="{default}" oninput="this.nextElementSibling.value=this.value" onchange="send(this.name, this.value)">'
            f'<input type="number" name="{esc}" step="{step}" value="{default}" onchange="send(this.name, this.value)">'
        )
    if kind == "int_list":
        value = " ".join(str(v) for v in default)
    elif kind == "blend":
        value = " | ".join(f"{t}:{w}" for t, w in default)
    else:
        value = str(default)
    return f'<input type="text" name="{esc}" value="{html.escape(value)}" size="40" onchange="send(this.name, this.value)">'


def page(ctx: SinkContext) -> str:
    """The preview page, with one control per live parameter of the table."""
    rows = []
    for row in ctx.params:
        if row["live"]:
            rows.append(
                f'<tr><td title="{html.escape(row["doc"])}">{html.escape(row["name"])}</td>'
                f'<td data-param="{html.escape(row["name"])}">{_control(row)}</td></tr>'
            )
    return _PAGE.replace("{ROWS}", "\n".join(rows))


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>StreamDiffusion Bridge</title>
<style>
body{background:#111;color:#ddd;font:14px system-ui,sans-serif;margin:1em}
img{max-width:100%;image-rendering:auto;background:#000}
#status{font-family:monospace;margin:.5em 0}
#error{color:#f77;font-family:monospace}
td{padding:2px 8px}
</style></head><body>
<h3>StreamDiffusion Bridge</h3>
<img id="out" src="/stream.mjpg" alt="output">
<div id="status">connecting...</div><div id="error"></div>
<form onsubmit="return false"><table>
{ROWS}
</table></form>
<script>
async function send(name, value) {
  const body = new URLSearchParams({name: name, value: String(value)});
  const r = await fetch('/set', {method: 'POST', body: body});
  const j = await r.json();
  document.getElementById('error').textContent = j.error || '';
}
async function poll() {
  try {
    const s = await (await fetch('/status')).json();
    document.getElementById('status').textContent =
      `${s.state} ${s.mode} | ${(+s.fps).toFixed(1)} fps | latency ${(+s.latency_ms).toFixed(1)} ms | ` +
      `skip ${(100 * s.skip_rate).toFixed(0)}% | dropped ${s.dropped}` + (s.error ? ` | ${s.error}` : '');
  } catch (e) { document.getElementById('status').textContent = 'bridge not reachable'; }
  setTimeout(poll, 500);
}
poll();
</script></body></html>
"""
