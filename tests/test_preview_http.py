"""The preview server at the HTTP level, over real sockets: the MJPEG stream's framing, and the
page's controls and labels as HTML. (The page's behaviour in a browser: test_preview_browser.)"""

from __future__ import annotations

import io
import re
import socket

import numpy as np
from PIL import Image

from bridge.frames import Frame
from bridge.params import table
from bridge.transports import preview_page
from bridge.transports.base import SinkContext
from bridge.transports.preview import PreviewSink

# Written out here rather than taken from the module: the bytes a browser must see.
HEAD = b"--sdbridgeframe\r\nContent-Type: image/jpeg\r\n\r\n"


def solid(rgb: tuple[int, int, int], seq: int) -> Frame:
    pixels = np.zeros((24, 32, 4), np.uint8)
    pixels[..., :3] = rgb
    pixels[..., 3] = 255
    return Frame(pixels, seq)


def read_until(sock: socket.socket, data: bytearray, count: int) -> None:
    """Read until `data` holds `count` part heads; the socket's timeout bounds each read."""
    while data.count(HEAD) < count:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the stream ended after {len(data)} bytes")
        data += chunk


def test_stream_completes_each_frame_as_soon_as_it_is_sent() -> None:
    """A browser draws an MJPEG part once the next part's head has arrived; the server sends
    that head right after each frame, so the newest frame shows at once, even when it is the
    only one (the page that showed no image for seconds on a slow bridge)."""
    sink = PreviewSink(port=0, fps=0, ctx=SinkContext())
    try:
        sink.write(solid((255, 0, 0), 1))
        with socket.create_connection((sink.host, sink.port), timeout=5) as sock:
            sock.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = bytearray()
            read_until(sock, data, 2)  # no second frame is written before this returns
            headers, _, body = bytes(data).partition(b"\r\n\r\n")
            assert b"Content-Type: multipart/x-mixed-replace; boundary=sdbridgeframe" in headers
            parts = body.split(b"\r\n" + HEAD)
            assert parts[0].startswith(HEAD)
            red = np.asarray(Image.open(io.BytesIO(parts[0][len(HEAD) :])))
            assert red.shape == (24, 32, 3) and red[..., 0].min() > 240 and red[..., 2].max() < 15
            sink.write(solid((0, 0, 255), 2))
            read_until(sock, data, 3)
            body = bytes(data).partition(b"\r\n\r\n")[2]
            blue = np.asarray(Image.open(io.BytesIO(body.split(b"\r\n" + HEAD)[1])))
            assert blue[..., 2].min() > 240 and blue[..., 0].max() < 15
    finally:
        sink.close()


def test_page_controls_labels_and_seed() -> None:
    # the table's labels; a row without one shows its name
    rows = [{k: v for k, v in r.items() if k != "label"} if r["name"] == "prompt" else r for r in table()]
    html = preview_page.page(SinkContext(width=320, height=180, params=rows))

    found = re.findall(r'<th scope="row" title="[^"]*">([^<]*)</th><td data-param="([^"]+)"', html)
    by_param = {name: text for text, name in found}
    assert by_param["guidance"] == "Guidance" and by_param["ssf/max_skip"] == "Max skipped frames"
    assert by_param["prompt"] == "prompt"  # no label anywhere: the name
    assert set(by_param) == {r["name"] for r in table() if r["live"]}

    seed = re.search(r'<td data-param="seed">(.*?)</td>', html)
    assert seed is not None
    assert '<input type="number" name="seed"' in seed[1] and 'type="range"' not in seed[1]
    assert 'min="0" max="2147483647" step="1"' in seed[1]
    assert '<button type="button" class="random" data-for="seed">new random seed</button>' in seed[1]
    guidance = re.search(r'<td data-param="guidance">(.*?)</td>', html)
    assert guidance is not None and 'type="range"' in guidance[1] and 'type="number"' in guidance[1]

    assert '<img id="out" src="/stream.mjpg" width="320" height="180"' in html
    assert "max-width:calc(75vh * 320 / 180)" in html  # the image never grows taller than the window
    # served offline: nothing is loaded from anywhere else
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html) and "https://" not in html
    assert "application/x-www-form-urlencoded" in html  # the form's POSTs


def test_page_escapes_what_it_shows() -> None:
    rows = [
        dict(r, label='<b>"x"</b>', doc="a <tag> & 'quote'") if r["name"] == "prompt" else r for r in table()
    ]
    rows = [
        dict(r, default="</script><script>alert(1) {SCRIPT}") if r["name"] == "prompt" else r for r in rows
    ]
    html = preview_page.page(SinkContext(params=rows))
    assert "<b>" not in html and "&lt;b&gt;&quot;x&quot;&lt;/b&gt;" in html
    assert 'value="&lt;/script&gt;&lt;script&gt;alert(1) {SCRIPT}"' in html  # shown as typed, inert
