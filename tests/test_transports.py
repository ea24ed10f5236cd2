"""Sources and sinks that run here: frames, synthetic, image, video, camera errors, preview,
null, the factories and missing-extra errors."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bridge.config import SinkConfig, SourceConfig
from bridge.frames import Frame, PixelFormat, fit, from_format, to_format
from bridge.params import table
from bridge.transports.base import MissingExtra, SinkContext, TransportUnavailable
from bridge.transports.registry import open_sink, open_source
from bridge.transports.synthetic import test_pattern as pattern_frame


def test_pixel_formats_round_trip() -> None:
    rgba = np.random.default_rng(1).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    for fmt in PixelFormat:
        out = to_format(rgba, fmt)
        assert out.shape[2] == fmt.channels and out.flags.c_contiguous
        back = from_format(out, fmt)
        assert np.array_equal(back[..., :3], rgba[..., :3])
        assert np.all(back[..., 3] == (rgba[..., 3] if fmt.channels == 4 else 255))
    assert np.array_equal(to_format(rgba, PixelFormat.BGRA)[..., 0], rgba[..., 2])
    assert np.array_equal(to_format(rgba, PixelFormat.RGBA, flip=True), rgba[::-1])
    with pytest.raises(ValueError, match="rgb pixels need 3 channels"):
        from_format(rgba, PixelFormat.RGB)
    with pytest.raises(ValueError, match=r"pixels must be \(H, W, 3\|4\) uint8"):
        to_format(rgba.astype(np.float32), PixelFormat.RGB)
    with pytest.raises(ValueError, match="pixel format must be one of rgba, bgra, rgb, bgr, got 'yuv'"):
        PixelFormat.parse("yuv")


def test_fit_covers_and_centre_crops() -> None:
    wide = np.zeros((100, 200, 4), np.uint8)
    wide[:, 50:150] = 255  # the centre square
    out = fit(wide, 64, 64)
    assert out.shape == (64, 64, 4) and out.min() == 255  # only the centre survives the crop
    assert fit(wide, 200, 100) is wide
    tall = fit(np.arange(4 * 2 * 3, dtype=np.uint8).reshape(4, 2, 3), 4, 8)
    assert tall.shape == (8, 4, 3)


def test_synthetic_source_is_deterministic() -> None:
    src = open_source(SourceConfig(kind="synthetic", fps=0), width=32, height=24)
    frames = [src.read(1.0) for _ in range(3)]
    assert [f.seq for f in frames if f] == [0, 1, 2]
    assert all(f is not None and np.array_equal(f.pixels, pattern_frame(f.seq, 32, 24)) for f in frames)
    assert not np.array_equal(pattern_frame(0, 32, 24), pattern_frame(1, 32, 24))
    paced = open_source(SourceConfig(kind="synthetic", fps=1), width=8, height=8)
    assert paced.read(1.0) is not None
    assert paced.read(0.01) is None  # the next tick is a second away
    src.close()


def test_image_source(tmp_path: Path) -> None:
    path = tmp_path / "still.png"
    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    src = open_source(SourceConfig(kind="image", path=str(path), fps=0), width=64, height=64)
    a, b = src.read(1.0), src.read(1.0)
    assert a is not None and b is not None and b.seq == a.seq + 1
    assert np.array_equal(a.pixels[..., :3], rgb) and a.pixels.shape == (20, 30, 4)
    with pytest.raises(FileNotFoundError, match=r"the image input: no such file .*nope\.png"):
        open_source(SourceConfig(kind="image", path=str(tmp_path / "nope.png")), width=8, height=8)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        open_source(SourceConfig(kind="image", path=str(tmp_path / "bad.png")), width=8, height=8)
    with pytest.raises(ValueError, match=r"needs a file: set input\.path"):
        open_source(SourceConfig(kind="image"), width=8, height=8)


def test_video_source_loops(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (32, 24))
    levels = [0, 80, 160, 240]
    for level in levels:
        writer.write(np.full((24, 32, 3), level, np.uint8))
    writer.release()
    src = open_source(SourceConfig(kind="video", path=str(path), fps=0, loop=True), width=8, height=8)
    got = []
    for _ in range(6):
        frame = src.read(1.0)
        assert frame is not None and frame.pixels.shape == (24, 32, 4)
        got.append(round(float(frame.pixels[..., :3].mean())))
    src.close()
    assert all(abs(g - w) <= 6 for g, w in zip(got, levels + levels[:2], strict=True)), got  # JPEG-coded
    once = open_source(SourceConfig(kind="video", path=str(path), fps=1000, loop=False), width=8, height=8)
    assert [once.read(1.0) is not None for _ in range(5)] == [True, True, True, True, False]
    once.close()


def test_camera_that_does_not_exist() -> None:
    pytest.importorskip("cv2")
    with pytest.raises(OSError, match=r"camera 97 \(input.device\) could not be opened: "):
        open_source(SourceConfig(kind="camera", device=97), width=8, height=8)


def test_missing_opencv_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    with pytest.raises(MissingExtra) as info:
        open_source(SourceConfig(kind="video", path=__file__), width=8, height=8)
    message = str(info.value)
    assert 'pip install "streamdiffusion-bridge[video]"' in message and "input.kind=image" in message


def test_unknown_kinds_list_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match="unknown input kind 'webcam'; valid kinds: synthetic, image, video, camera, shm"
    ):
        open_source(SourceConfig(kind="webcam"), width=8, height=8)
    with pytest.raises(ValueError, match="unknown output kind 'hdmi'; valid kinds: shm, preview, null"):
        open_sink(SinkConfig(kind="hdmi"))


def test_null_sink_counts() -> None:
    sink = open_sink(SinkConfig(kind="null"))
    sink.write(Frame(np.zeros((2, 2, 4), np.uint8), 5))
    assert getattr(sink, "frames", 0) == 1
    sink.close()


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def test_preview_page_stream_status_and_controls() -> None:
    submitted: list[tuple[str, list[str]]] = []

    def submit(name: str, args: Any) -> str:
        submitted.append((name, list(args)))
        return "" if name == "guidance" else f"no parameter {name!r}"

    ctx = SinkContext(status=lambda: {"state": "running", "fps": 9.5}, submit=submit, params=table())
    sink = open_sink(SinkConfig(kind="preview", port=0, fps=0), ctx)
    base = sink.url  # type: ignore[attr-defined]
    try:
        assert get(base + "frame.jpg", timeout=10)[0] == 503  # nothing yet
        status, body, ctype = get(base)
        page = body.decode()
        assert status == 200 and ctype.startswith("text/html")
        for row in table():
            assert (f'data-param="{row["name"]}"' in page) == row["live"], row["name"]
        assert 'src="/stream.mjpg"' in page
        assert json.loads(get(base + "status")[1]) == {"state": "running", "fps": 9.5}
        assert len(json.loads(get(base + "params")[1])) == len(table())
        frame = np.zeros((16, 16, 4), np.uint8)
        frame[..., 0] = 255
        sink.write(Frame(frame, 1))
        status, jpeg, ctype = get(base + "frame.jpg")
        assert status == 200 and ctype == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
        with urllib.request.urlopen(base + "stream.mjpg", timeout=5) as stream:
            assert stream.headers["Content-Type"] == "multipart/x-mixed-replace; boundary=sdbridgeframe"
            sink.write(Frame(frame, 2))
            head = stream.readline() + stream.readline() + stream.readline()
            assert head == b"--sdbridgeframe\r\nContent-Type: image/jpeg\r\n\r\n"
            part = stream.read(2)
            while not part.endswith(b"\r\n--sdbridgeframe\r\n"):  # a part ends at the next boundary
                part += stream.read(1)
            part = part[: -len(b"\r\n--sdbridgeframe\r\n")]
            decoded = np.asarray(Image.open(__import__("io").BytesIO(part)))
            assert decoded.shape == (16, 16, 3) and decoded[..., 0].min() > 240
        request = urllib.request.Request(base + "set", data=b"name=guidance&value=2.5", method="POST")
        with urllib.request.urlopen(request, timeout=5) as r:
            assert json.loads(r.read()) == {"ok": True, "error": ""}
        bad = urllib.request.Request(base + "set", data=b"name=nope&value=1", method="POST")
        refused = _raises(bad)
        status, body = refused.code, refused.read()
        assert status == 400 and json.loads(body)["error"] == "no parameter 'nope'"
        assert submitted == [("guidance", ["2.5"]), ("nope", ["1"])]
    finally:
        sink.close()
        sink.close()


def _raises(request: urllib.request.Request) -> urllib.error.HTTPError:
    try:
        urllib.request.urlopen(request, timeout=5)
    except urllib.error.HTTPError as exc:
        return exc
    raise AssertionError("expected an HTTP error")


def test_preview_busy_port_names_the_fix() -> None:
    first = open_sink(SinkConfig(kind="preview", port=0), SinkContext())
    try:
        with pytest.raises(  # final: a port another process holds stays taken
            TransportUnavailable,
            match=r"the preview cannot listen on http://127\.0\.0\.1:\d+/: .*extra_outputs\.0\.port",
        ):
            open_sink(SinkConfig(kind="preview", port=first.port), SinkContext())  # type: ignore[attr-defined]
    finally:
        first.close()
