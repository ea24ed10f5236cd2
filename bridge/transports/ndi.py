"""NDI (Windows, macOS, Linux): a sender sink and a receiver source over cyndilib.

cyndilib's wheels carry the NDI runtime. A receiver finds senders with NDI discovery (mDNS),
which many stage and venue networks block. `input.address` names the hosts to look at
directly: they go into the `ips` list of an NDI config file written for this process, which is
NDI's own way to find senders without mDNS (the "extra IPs" of NDI Access Manager). NDI reads
that file once, before its first sender, finder or receiver exists, so `use_addresses` must run
before any NDI object is made; the runtime calls it through `registry.prepare_media` first
thing.

NDI compresses video, so received pixels differ slightly from the sent ones.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from bridge.frames import Frame, PixelFormat, from_format, to_format
from bridge.transports.base import import_vendor, poll_for_frame

log = logging.getLogger(__name__)

CONFIG_NAME = "ndi-config.v1.json"
FIND_INTERVAL_S = 0.5  # how often a receiver without its sender looks again
# NDI's finder asks the `ips` hosts again at growing intervals (a sender that appeared 10 s
# after the finder was seen 7 s later here); a fresh finder asks at once. So a receiver still
# without its sender starts a new finder this often.
FINDER_REFRESH_S = 3.0
DEFAULT_FPS = 30.0

_state: dict[str, Any] = {"started": False, "addresses": ()}


def cyndilib() -> Any:
    """The cyndilib module, or the error that names the extra to install."""
    module = import_vendor("cyndilib", what="NDI", extra="ndi")
    _state["started"] = True
    return module


def parse_addresses(text: str) -> tuple[str, ...]:
    """`input.address`: hosts or IPs, comma-separated; a `:port` is dropped (NDI discovery
    finds each sender's port on the host itself)."""
    hosts = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [IPv6]:port
            host = item[1:].split("]", 1)[0]
        elif item.count(":") == 1:
            host = item.split(":", 1)[0]
        else:
            host = item
        if not host:
            raise ValueError(f"input.address: {item!r} has no host; give a host name or an IP")
        hosts.append(host)
    return tuple(hosts)


def _user_config() -> dict[str, Any]:
    """The NDI config this process would otherwise use, so our addresses add to it."""
    folder = os.environ.get("NDI_CONFIG_DIR")
    path = Path(folder) / CONFIG_NAME if folder else Path.home() / ".ndi" / CONFIG_NAME
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def use_addresses(addresses: tuple[str, ...]) -> Path | None:
    """Make NDI look for senders on `addresses` as well as through discovery, by pointing
    NDI_CONFIG_DIR at a config file that lists them (merged into the user's own config).
    Returns that file, or None when there is nothing to add."""
    if not addresses:
        return None
    if _state["started"]:
        if set(addresses) <= set(_state["addresses"]):
            return None
        raise ValueError(
            "input.address must be known before NDI starts in this process; "
            "it is read from the config at start, so restart the bridge to change it"
        )
    config = _user_config()
    ndi = config.setdefault("ndi", {})
    networks = ndi.setdefault("networks", {})
    known = [ip.strip() for ip in str(networks.get("ips", "")).split(",") if ip.strip()]
    networks["ips"] = ",".join(dict.fromkeys([*known, *addresses]))
    folder = Path(tempfile.mkdtemp(prefix="sdbridge-ndi-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / CONFIG_NAME
    path.write_text(json.dumps(config))
    os.environ["NDI_CONFIG_DIR"] = str(folder)
    _state["addresses"] = addresses
    log.info("NDI: looking for senders on %s as well as through discovery", ", ".join(addresses))
    return path


def _fourcc(ndi: Any, fmt: PixelFormat) -> Any:
    if fmt is PixelFormat.RGBA:
        return ndi.FourCC.RGBA
    if fmt is PixelFormat.BGRA:
        return ndi.FourCC.BGRA
    raise ValueError(f"output.format for ndi must be rgba or bgra, got {fmt.value!r}")


class NdiSink:
    """Sends frames as the NDI source `name` (seen on the network as "MACHINE (name)"). Each
    frame carries its resolution and the frame rate `fps`; a new frame size re-creates the
    sender's frame description."""

    def __init__(self, *, name: str = "sdbridge", fmt: str = "rgba", fps: float = DEFAULT_FPS) -> None:
        self._ndi = cyndilib()
        self.name = name or "sdbridge"
        self.format = PixelFormat.parse(fmt)
        self._fourcc = _fourcc(self._ndi, self.format)
        if fps < 0:
            raise ValueError(f"ndi fps must be positive, got {fps}")
        self.frame_rate = Fraction(fps or DEFAULT_FPS).limit_denominator(1001)
        self._sender: Any = None
        self.size: tuple[int, int] | None = None

    def _start(self, width: int, height: int) -> None:
        self._stop_sender()
        frame = self._ndi.VideoSendFrame()
        frame.set_resolution(width, height)
        frame.set_fourcc(self._fourcc)
        frame.set_frame_rate(self.frame_rate)
        sender = self._ndi.Sender(self.name, clock_video=False, clock_audio=False)
        sender.set_video_frame(frame)
        sender.open()
        self._sender = sender
        self.size = (width, height)
        log.info("NDI: sending %r at %dx%d, %s fps", self.name, width, height, self.frame_rate)

    def write(self, frame: Frame) -> None:
        pixels = to_format(frame.pixels, self.format)
        height, width = pixels.shape[:2]
        if self._sender is None or self.size != (width, height):
            self._start(width, height)
        if not self._sender.write_video(pixels.reshape(-1)):
            raise OSError(f"NDI sender {self.name!r} is not running")

    def _stop_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()

    def close(self) -> None:
        self._stop_sender()


class NdiSource:
    """Receives from the NDI source `name`: the full NDI name ("MACHINE (stream)") or just the
    stream part, on any machine. While it is missing `read` returns None (the bridge holds its
    last output); NDI reconnects by itself when the sender comes back, and a sender never seen
    yet is looked for again every half second."""

    def __init__(self, *, name: str, address: str = "", poll_s: float = 0.002) -> None:
        if not name:
            raise ValueError('the ndi input needs a source name: set input.name (e.g. "sdbridge")')
        use_addresses(parse_addresses(address))
        self._ndi = cyndilib()
        self.name = name
        self.poll_s = poll_s
        self._finder: Any = None
        self._finder_born = 0.0
        self._receiver: Any = None
        self._video: Any = None
        self._connected_to = ""
        self._next_look = 0.0
        self._last_stamp: float | None = None
        self._seq = 0
        self.size: tuple[int, int] | None = None
        self.frame_rate: Fraction | None = None
        self.waiting = f"waiting for the NDI source {name!r}"

    def matches(self, full_name: str) -> bool:
        return full_name == self.name or full_name.endswith(f"({self.name})")

    def _new_finder(self) -> None:
        if self._finder is not None:
            self._finder.close()
        self._finder = self._ndi.Finder()
        self._finder.open()
        self._finder_born = time.perf_counter()

    def _open(self) -> None:
        ndi = self._ndi
        self._new_finder()
        self._receiver = ndi.Receiver(
            color_format=ndi.RecvColorFormat.RGBX_RGBA,
            bandwidth=ndi.RecvBandwidth.highest,
            recv_name="sdbridge",
        )
        self._video = ndi.VideoFrameSync()
        self._receiver.frame_sync.set_video_frame(self._video)

    def _look(self) -> None:
        now = time.perf_counter()
        if now < self._next_look:
            return
        self._next_look = now + FIND_INTERVAL_S
        if now - self._finder_born >= FINDER_REFRESH_S:
            self._new_finder()
        self._finder.update_sources()
        for full_name in self._finder.get_source_names():
            if self.matches(full_name):
                source = self._finder.get_source(full_name)
                self._receiver.set_source(source)
                self._connected_to = full_name
                log.info("NDI: receiving from %r", full_name)
                return
        self.waiting = f"waiting for the NDI source {self.name!r} (seen: {self._seen()})"

    def _seen(self) -> str:
        names = list(self._finder.get_source_names())
        return ", ".join(repr(n) for n in names) if names else "none"

    def _poll(self) -> Frame | None:
        if not self._connected_to:
            self._look()
            if not self._connected_to:
                return None
        self._receiver.frame_sync.capture_video()
        video = self._video
        width, height = int(video.xres), int(video.yres)
        stamp = float(video.get_timestamp_posix())
        if width == 0 or height == 0 or stamp == self._last_stamp:
            if not self._receiver.is_connected():
                self.waiting = f"the NDI source {self._connected_to!r} went away; waiting for it"
            return None
        self._last_stamp = stamp
        data = video.get_array()
        stride = int(video.get_line_stride()) or width * 4
        pixels = data[: stride * height].reshape(height, stride)[:, : width * 4].reshape(height, width, 4)
        fourcc = video.get_fourcc()
        fmt = (
            PixelFormat.BGRA if fourcc in (self._ndi.FourCC.BGRA, self._ndi.FourCC.BGRX) else PixelFormat.RGBA
        )
        rgba = from_format(np.ascontiguousarray(pixels), fmt)
        if fourcc in (self._ndi.FourCC.RGBX, self._ndi.FourCC.BGRX):
            rgba[..., 3] = 255
        self.size = (width, height)
        self.frame_rate = video.get_frame_rate()
        self.waiting = ""
        self._seq += 1
        return Frame(rgba, self._seq)

    def read(self, timeout_s: float) -> Frame | None:
        if self._receiver is None:
            self._open()
        return poll_for_frame(self._poll, timeout_s, self.poll_s)

    def close(self) -> None:
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.disconnect()
        finder, self._finder = self._finder, None
        if finder is not None:
            finder.close()
