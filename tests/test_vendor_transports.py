"""Spout, Syphon and the virtual camera on our side of the vendor boundary.

These media cannot run on Linux, so the vendor modules are stand-ins (tests/vendor_fakes.py)
that check every call against the vendor's documented API, including Spout's rule that its
OpenGL context belongs to the thread that made it. What is tested: formats, flips, sizes and
size changes, a sender that vanishes and returns, the thread each call is made on, and the
exact errors for a missing library, the wrong OS and a missing camera driver."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import pytest

from bridge.config import ConfigError, SinkConfig, SourceConfig, load_config
from bridge.frames import Frame
from bridge.runtime import FINAL_ERRORS, CaptureRunner, Mailbox, SinkRunner
from bridge.transports.base import MissingExtra, SinkContext, TransportUnavailable
from bridge.transports.registry import open_sink, open_source
from tests.vendor_fakes import MTL_BGRA8, install_pyvirtualcam, install_spoutgl, install_syphon


def pattern(width: int, height: int, seq: int = 0) -> np.ndarray:
    """Every pixel distinct enough to catch a swapped channel, a flip or a transposed size."""
    y, x = np.mgrid[0:height, 0:width]
    rgba = np.empty((height, width, 4), np.uint8)
    rgba[..., 0] = (x * 7 + seq) % 256
    rgba[..., 1] = (y * 11) % 256
    rgba[..., 2] = (x + y * 3) % 256
    rgba[..., 3] = 200
    return rgba


def read_until(source: Any, timeout_s: float = 2.0) -> Frame:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame = source.read(0.05)
        if frame is not None:
            return frame  # type: ignore[no-any-return]
    raise AssertionError("no frame arrived")


def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ------------------------------------------------------------------------------ errors by OS


LINUX_ALTERNATIVES = "Use ndi, virtualcam (v4l2loopback) or shm here"


@pytest.mark.parametrize(
    "kind,os_name,extra",
    [("spout", "Windows", "spout"), ("syphon", "macOS", "syphon")],
)
def test_the_wrong_os_names_the_alternatives(
    monkeypatch: pytest.MonkeyPatch, kind: str, os_name: str, extra: str
) -> None:
    monkeypatch.setattr("bridge.transports.base.current_platform", lambda: "linux")
    expected = (
        f"{kind.capitalize()} works only on {os_name} (this machine runs Linux). {LINUX_ALTERNATIVES}; "
        f'on {os_name}: pip install "streamdiffusion-bridge[{extra}]"'
    )
    with pytest.raises(TransportUnavailable) as sink_error:
        open_sink(SinkConfig(kind=kind))
    assert str(sink_error.value) == expected
    with pytest.raises(TransportUnavailable) as source_error:
        open_source(SourceConfig(kind=kind, name="TD"), width=64, height=64)
    assert str(source_error.value) == expected


def test_the_right_os_without_the_library_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bridge.transports.base.current_platform", lambda: "win32")
    monkeypatch.setitem(sys.modules, "SpoutGL", None)  # not installed
    with pytest.raises(MissingExtra) as error:
        open_sink(SinkConfig(kind="spout"))
    assert str(error.value) == (
        "Spout needs the 'SpoutGL' module, which is not installed. Install it with: "
        'pip install "streamdiffusion-bridge[spout]". Alternatives here: ndi, virtualcam or shm'
    )
    monkeypatch.setattr("bridge.transports.base.current_platform", lambda: "darwin")
    monkeypatch.setitem(sys.modules, "syphon", None)
    with pytest.raises(
        MissingExtra,
        match=r'pip install "streamdiffusion-bridge\[syphon\]"\. Alternatives here: ndi, virtualcam or shm',
    ):
        open_sink(SinkConfig(kind="syphon"))
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)
    with pytest.raises(
        MissingExtra, match=r"The virtual camera needs the \'pyvirtualcam\' module.*\[virtualcam\]"
    ):
        open_sink(SinkConfig(kind="virtualcam"), SinkContext(width=64, height=64))


# ------------------------------------------------------------------------------------ Spout


@pytest.mark.parametrize("fmt", ["rgba", "bgra", "rgb", "bgr"])
def test_spout_sink_sends_each_format_and_the_source_receives_rgba(
    monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    world = install_spoutgl(monkeypatch)
    sink = open_sink(SinkConfig(kind="spout", name="sdbridge", format=fmt))
    source = open_source(SourceConfig(kind="spout", name="sdbridge"), width=64, height=64)
    try:
        picture = pattern(40, 24)
        sink.write(Frame(picture, 1))
        width, height, gl_format, invert, fbo = world.calls[-1][1]
        assert (width, height, invert, fbo) == (40, 24, False, 0)
        assert gl_format == {"rgba": 0x1908, "bgra": 0x80E1, "rgb": 0x1907, "bgr": 0x80E0}[fmt]
        got = read_until(source)
        assert got.pixels.shape == (24, 40, 4)
        assert np.array_equal(got.pixels[..., :3], picture[..., :3])
        alpha = picture[..., 3] if fmt in ("rgba", "bgra") else np.full((24, 40), 255, np.uint8)
        assert np.array_equal(got.pixels[..., 3], alpha)
    finally:
        source.close()
        sink.close()
    assert world.contexts_open == 0 and not world.wrong_thread


def test_spout_flips_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    install_spoutgl(monkeypatch)
    picture = pattern(16, 8)
    sink = open_sink(SinkConfig(kind="spout", name="flipped", flip=True))
    plain = open_source(SourceConfig(kind="spout", name="flipped"), width=16, height=16)
    unflip = open_source(SourceConfig(kind="spout", name="flipped", flip=True), width=16, height=16)
    sink.write(Frame(picture, 1))
    assert np.array_equal(read_until(plain).pixels, picture[::-1])
    assert np.array_equal(read_until(unflip).pixels, picture)
    for closable in (plain, unflip, sink):
        closable.close()


def test_spout_receiver_follows_size_changes_and_a_vanished_sender(monkeypatch: pytest.MonkeyPatch) -> None:
    world = install_spoutgl(monkeypatch)
    source = open_source(SourceConfig(kind="spout", name="TD"), width=64, height=64)
    assert source.read(0.05) is None  # no sender yet
    assert source.waiting == "waiting for the Spout sender 'TD'"  # type: ignore[attr-defined]
    sink = open_sink(SinkConfig(kind="spout", name="TD"))
    sink.write(Frame(pattern(32, 16), 1))
    assert read_until(source).pixels.shape == (16, 32, 4)
    assert source.waiting == ""  # type: ignore[attr-defined]
    assert source.read(0.05) is None  # nothing new: no duplicate frame
    sink.write(Frame(pattern(48, 40, seq=5), 2))  # the sender is resized
    resized = read_until(source)
    assert resized.pixels.shape == (40, 48, 4)
    assert np.array_equal(resized.pixels, pattern(48, 40, seq=5)[..., :4])
    sink.close()  # the sender vanishes
    assert source.read(0.05) is None
    assert source.waiting == "waiting for the Spout sender 'TD'"  # type: ignore[attr-defined]
    again = open_sink(SinkConfig(kind="spout", name="TD"))  # and comes back
    again.write(Frame(pattern(32, 16, seq=9), 1))
    assert np.array_equal(read_until(source).pixels, pattern(32, 16, seq=9))
    source.close()
    again.close()
    assert world.contexts_open == 0 and not world.wrong_thread


@pytest.mark.parametrize("counted", [False, True])
def test_spout_hands_each_sender_frame_on_once(monkeypatch: pytest.MonkeyPatch, counted: bool) -> None:
    """Real Spout's isFrameNew() is true after every receive unless frame counting is on
    (SpoutFrameCount.cpp:145, :540), so polling every 2 ms would hand the engine the same frame
    again and again, each a full readback. A counted sender is followed by its frame number and
    costs one readback per frame; an uncounted one is read at input.fps and a repeat is dropped."""
    world = install_spoutgl(monkeypatch)
    world.frame_count = counted
    sink = open_sink(SinkConfig(kind="spout", name="TD"))
    source = open_source(SourceConfig(kind="spout", name="TD", fps=30.0), width=64, height=64)
    try:
        sink.write(Frame(pattern(32, 16), 1))
        first = read_until(source)
        started = time.monotonic()
        repeats = [source.read(0.02) for _ in range(15)]  # ~0.3 s of polling a sender that sent once
        elapsed = time.monotonic() - started
        assert repeats == [None] * 15  # no duplicate frame reaches the engine
        if counted:
            assert world.readbacks == 1  # Spout copies nothing for a frame already seen
        else:
            assert world.readbacks <= 2 + elapsed * 30.0  # at most one readback per sender frame
        sink.write(Frame(pattern(32, 16, seq=4), 2))
        second = read_until(source)
        assert np.array_equal(second.pixels, pattern(32, 16, seq=4)) and second.seq == first.seq + 1
    finally:
        source.close()
        sink.close()


def test_spout_contexts_live_on_the_runner_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink is opened, written and closed on its runner's thread, the receiver created,
    read and released on the capture thread: the fake refuses any call from another thread."""
    world = install_spoutgl(monkeypatch)
    runner = SinkRunner("spout", lambda: open_sink(SinkConfig(kind="spout", name="live")))
    runner.wait_open(5.0)
    box: Mailbox[Frame] = Mailbox()
    capture = CaptureRunner(open_source(SourceConfig(kind="spout", name="live"), width=8, height=8), box)
    for seq in range(1, 6):
        runner.box.put(Frame(pattern(24, 12, seq), seq))
        wait_for(lambda seq=seq: runner.written >= seq)  # type: ignore[misc]
    got = box.get(2.0)
    assert got is not None and got.pixels.shape == (12, 24, 4)
    capture.stop(2.0)
    runner.stop(2.0)
    assert runner.failures == 0 and capture.failures == 0
    assert not world.wrong_thread and world.contexts_open == 0
    assert ("releaseSender", "live") in world.calls and ("releaseReceiver", "live") in world.calls


def test_spout_without_an_opengl_context_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    world = install_spoutgl(monkeypatch)
    world.fail_context = True
    with pytest.raises(
        OSError, match=r"Spout sender: could not create an OpenGL context on this thread; is a GPU driver"
    ):
        open_sink(SinkConfig(kind="spout"))


# ----------------------------------------------------------------------------------- Syphon


def test_syphon_server_to_client_with_resize_and_return(monkeypatch: pytest.MonkeyPatch) -> None:
    world = install_syphon(monkeypatch)
    source = open_source(SourceConfig(kind="syphon", name="sdbridge"), width=64, height=64)
    assert source.read(0.05) is None
    assert source.waiting == "waiting for the Syphon server 'sdbridge'"  # type: ignore[attr-defined]
    sink = open_sink(SinkConfig(kind="syphon", name="sdbridge"))
    picture = pattern(20, 10)
    sink.write(Frame(picture, 1))
    assert world.published[-1] == ("sdbridge", (20, 10), False)
    monkeypatch.setattr("bridge.transports.syphon.DISCOVERY_INTERVAL_S", 0.0)
    got = read_until(source)  # the fake serves BGRA textures: converted back to RGBA
    assert np.array_equal(got.pixels, picture)
    sink.write(Frame(pattern(30, 12, seq=3), 2))  # a new size: a new texture
    assert np.array_equal(read_until(source).pixels, pattern(30, 12, seq=3))
    sink.close()
    assert source.read(0.05) is None and world.clients == 0  # the client let go of the dead server
    back = open_sink(SinkConfig(kind="syphon", name="sdbridge", flip=True))
    back.write(Frame(picture, 1))
    assert world.published[-1] == ("sdbridge", (20, 10), True)
    assert np.array_equal(read_until(source).pixels, picture[::-1])
    source.close()
    back.close()
    assert world.clients == 0 and not world.servers


def test_syphon_source_survives_a_frame_without_a_surface(monkeypatch: pytest.MonkeyPatch) -> None:
    """Syphon's newFrameImage is nil when there is no surface to wrap, as when the server quits
    between has_new_frame and the read: the source reads nothing, lets go of the dead server and
    picks the next one up."""
    world = install_syphon(monkeypatch)
    monkeypatch.setattr("bridge.transports.syphon.DISCOVERY_INTERVAL_S", 0.0)
    sink = open_sink(SinkConfig(kind="syphon", name="sdbridge"))
    source = open_source(SourceConfig(kind="syphon", name="sdbridge"), width=8, height=8)
    sink.write(Frame(pattern(8, 8), 1))
    assert np.array_equal(read_until(source).pixels, pattern(8, 8))
    sink.write(Frame(pattern(8, 8, seq=2), 2))
    world.quit_before_image = "sdbridge"
    assert source.read(0.05) is None  # no exception, no frame
    assert world.clients == 0  # the client of the vanished server was stopped
    back = open_sink(SinkConfig(kind="syphon", name="sdbridge"))
    back.write(Frame(pattern(8, 8, seq=3), 1))
    assert np.array_equal(read_until(source).pixels, pattern(8, 8, seq=3))
    source.close()
    back.close()
    sink.close()


def test_syphon_source_matches_the_app_name(monkeypatch: pytest.MonkeyPatch) -> None:
    world = install_syphon(monkeypatch)
    sink = open_sink(SinkConfig(kind="syphon", name="Main Output"))
    world.servers["Main Output"]["app"] = "Resolume Arena"
    sink.write(Frame(pattern(8, 8), 1))
    source = open_source(SourceConfig(kind="syphon", name="Resolume Arena"), width=8, height=8)
    assert np.array_equal(read_until(source).pixels, pattern(8, 8))
    assert MTL_BGRA8 == 80
    source.close()
    sink.close()


# --------------------------------------------------------------------------- virtual camera


def test_virtualcam_sends_rgb_or_bgr_at_the_camera_size_and_paces(monkeypatch: pytest.MonkeyPatch) -> None:
    world = install_pyvirtualcam(monkeypatch)
    ctx = SinkContext(width=64, height=48, fps=24.0)
    cam = open_sink(SinkConfig(kind="virtualcam"), ctx)  # format rgba (the default) -> rgb
    assert world.opened == [
        {"width": 64, "height": 48, "fps": 24.0, "fmt": "RGB", "device": None, "backend": None}
    ]
    picture = pattern(64, 48)
    cam.write(Frame(picture, 1))
    assert np.array_equal(world.frames[-1], picture[..., :3])  # alpha dropped
    cam.write(Frame(pattern(128, 96), 2))  # another size: fitted to the camera's
    assert world.frames[-1].shape == (48, 64, 3)
    assert world.sleeps == 2  # paced: one wait for the camera's next slot per frame
    cam.close()
    cam.close()  # idempotent
    assert world.closed == 1

    bgr = open_sink(
        SinkConfig(
            kind="virtualcam",
            format="bgr",
            device="/dev/video7",
            backend="v4l2loopback",
            fps=15,
            width=32,
            height=16,
        ),
        ctx,
    )
    assert world.opened[-1] == {
        "width": 32,
        "height": 16,
        "fps": 15.0,
        "fmt": "BGR",
        "device": "/dev/video7",
        "backend": "v4l2loopback",
    }
    bgr.write(Frame(pattern(32, 16), 1))
    assert np.array_equal(world.frames[-1], pattern(32, 16)[..., 2::-1])
    bgr.close()


@pytest.mark.parametrize(
    "platform,drivers,hint",
    [
        (
            "linux",
            "'v4l2loopback' backend: No v4l2 loopback device found at /dev/video[0-99]. Did you run "
            "'modprobe v4l2loopback'?",
            "sudo apt install v4l2loopback-dkms && sudo modprobe v4l2loopback devices=1 exclusive_caps=1",
        ),
        (
            "win32",
            "'obs' backend: OBS Virtual Camera device not found! Did you install OBS?\n"
            "'unitycapture' backend: No camera registered. Did you install any camera?",
            "install OBS Studio 26 or newer (its Virtual Camera is the device",
        ),
        (
            "darwin",
            "'obs' backend: OBS Virtual Camera is not installed in your system. Use the Virtual Camera "
            "function in OBS 30.0 or later",
            "click Start Virtual Camera once in OBS (macOS then registers the camera extension)",
        ),
    ],
)
def test_virtualcam_without_a_driver_says_how_to_install_one(
    monkeypatch: pytest.MonkeyPatch, platform: str, drivers: str, hint: str
) -> None:
    """Each OS's own backends answer, in pyvirtualcam's words (one line per backend tried,
    camera.py:219-224), followed by this OS's install hint."""
    world = install_pyvirtualcam(monkeypatch, platform=platform)
    world.devices, world.drivers = [], set()
    with pytest.raises(TransportUnavailable) as error:
        open_sink(SinkConfig(kind="virtualcam"), SinkContext(width=64, height=64))
    message = str(error.value)
    assert message.startswith(f"no virtual camera could be opened ({drivers}")
    assert "). To get one: " in message and hint in message


@pytest.mark.parametrize(
    "platform,backend,valid",
    [
        ("linux", "obs", "use v4l2loopback"),
        ("win32", "v4l2loopback", "use obs or unitycapture"),
        ("darwin", "unitycapture", "use obs"),
        ("linux", "v4l2lopback", "use v4l2loopback"),  # a typo
    ],
)
def test_virtualcam_backend_of_another_os_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, platform: str, backend: str, valid: str
) -> None:
    """pyvirtualcam raises KeyError for a backend its OS does not register (camera.py:206);
    the runtime would retry that forever. The config refuses it, with the install hint, and a
    sink opened anyway fails with a final error."""
    install_pyvirtualcam(monkeypatch, platform=platform)
    with pytest.raises(ConfigError) as error:
        load_config(None, ["output.kind=virtualcam", f"output.backend={backend}"])
    message = str(error.value)
    assert f"output.backend {backend!r} is not a virtual camera backend on " in message
    assert valid in message and "To get a virtual camera: " in message
    with pytest.raises(TransportUnavailable, match=r"^output\.backend ") as opened:
        open_sink(SinkConfig(kind="virtualcam", backend=backend), SinkContext(width=64, height=64))
    assert isinstance(opened.value, FINAL_ERRORS)


def test_virtualcam_fake_raises_what_pyvirtualcam_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in itself, against pyvirtualcam's source: the real PixelFormat values, KeyError
    for an unregistered backend, TypeError for a dtype other than uint8."""
    install_pyvirtualcam(monkeypatch, platform="linux")
    import pyvirtualcam

    assert {f.name: f.value for f in pyvirtualcam.PixelFormat} == {
        "RGB": "raw ", "BGR": "24BG", "RGBA": "ABGR", "GRAY": "J400",
        "I420": "I420", "NV12": "NV12", "YUYV": "YUY2", "UYVY": "UYVY",
    }  # fmt: skip
    with pytest.raises(KeyError):
        pyvirtualcam.Camera(8, 8, 30, backend="obs")
    cam = pyvirtualcam.Camera(8, 8, 30)
    with pytest.raises(TypeError, match="unexpected frame dtype: float32 != uint8"):
        cam.send(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(RuntimeError, match=r"'v4l2loopback' backend: Unsupported image format\."):
        pyvirtualcam.Camera(8, 8, 30, fmt=pyvirtualcam.PixelFormat.RGBA)


def test_virtualcam_wrong_device_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    install_pyvirtualcam(monkeypatch)
    with pytest.raises(TransportUnavailable, match=r"^no virtual camera '/dev/video3' could be opened"):
        open_sink(SinkConfig(kind="virtualcam", device="/dev/video3"), SinkContext(width=64, height=64))
