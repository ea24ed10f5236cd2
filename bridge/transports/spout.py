"""Spout (Windows): a sender sink and a receiver source over SpoutGL.

SpoutGL shares OpenGL textures between processes and needs an OpenGL context on the thread
that calls it (`createOpenGL()`). The runtime opens, writes and closes a sink on the sink's own
thread, so `SpoutSink` creates its context when it is built; a source is read and closed on
the capture thread, so `SpoutSource` creates its receiver on the first `read`. SpoutGL moves
8-bit RGBA, BGRA, RGB and BGR; receivers learn of a sender's new size from `isUpdated()`.

Repeats. `isFrameNew()` is only meaningful when Spout counts frames (the "Framecount" setting
of SpoutSettings, and a sender that counts): otherwise it is true after every receive
(SpoutFrameCount.cpp:145 and :540 in jlai/Python-SpoutGL's vendored Spout SDK), and each
`receiveImage` is a full GPU readback. So a counted sender is followed by its frame number
(`getSenderFrame()`; Spout then skips the readback of a repeat itself, SpoutGL.cpp:1967), and an
uncounted one is read at most at `fps` (input.fps, the sender's rate), a frame identical to the
last one handed on being dropped: an unchanged input costs no engine call.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from bridge.frames import Frame, PixelFormat, from_format, to_format
from bridge.transports.base import import_vendor, poll_for_frame

log = logging.getLogger(__name__)

# PixelFormat -> the name of SpoutGL's GL format constant in `SpoutGL.enums`
GL_FORMATS = {
    PixelFormat.RGBA: "GL_RGBA",
    PixelFormat.BGRA: "GL_BGRA_EXT",
    PixelFormat.RGB: "GL_RGB",
    PixelFormat.BGR: "GL_BGR_EXT",
}


def spoutgl() -> Any:
    """The SpoutGL module, or the error that says how to get it (or what to use instead)."""
    return import_vendor("SpoutGL", what="Spout", extra="spout", platform="win32")


def _gl_context(obj: Any, role: str) -> None:
    if not obj.createOpenGL():
        raise OSError(
            f"Spout {role}: could not create an OpenGL context on this thread; "
            "is a GPU driver with OpenGL installed (not the Microsoft Basic Display Adapter)?"
        )


class SpoutSink:
    """Publishes frames as the Spout sender `name`. `flip` lets Spout turn the image upside
    down on the GPU, for receivers that count rows from the bottom."""

    def __init__(self, *, name: str = "sdbridge", fmt: str = "rgba", flip: bool = False) -> None:
        gl = spoutgl()
        self.name = name or "sdbridge"
        self.format = PixelFormat.parse(fmt)
        self.flip = flip
        self._gl_format = int(getattr(gl.enums, GL_FORMATS[self.format]))
        sender = gl.SpoutSender()
        _gl_context(sender, "sender")
        sender.setSenderName(self.name)
        self._sender: Any = sender

    def write(self, frame: Frame) -> None:
        if self._sender is None:
            raise RuntimeError("the Spout sender is closed")
        pixels = to_format(frame.pixels, self.format)
        height, width = pixels.shape[:2]
        if not self._sender.sendImage(pixels, width, height, self._gl_format, self.flip, 0):
            raise OSError(f"Spout sender {self.name!r}: sendImage refused a {width}x{height} frame")

    def close(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.releaseSender()
            sender.closeOpenGL()


class SpoutSource:
    """Receives from the Spout sender `name` ("" = the active sender). While the sender is gone
    `read` returns None (the bridge holds its last output) and SpoutGL keeps looking for it;
    `waiting` says so for status. A sender that does not count its frames is read at most `fps`
    times a second (0: every poll)."""

    def __init__(
        self, *, name: str = "", flip: bool = False, poll_s: float = 0.002, fps: float = 30.0
    ) -> None:
        if fps < 0:
            raise ValueError(f"input.fps for spout must be >= 0 (the sender's rate), got {fps}")
        self._gl = spoutgl()
        self.name = name
        self.flip = flip
        self.poll_s = poll_s
        self.fps = fps
        self._gl_format = int(self._gl.enums.GL_RGBA)
        self._receiver: Any = None
        self._buffer: np.ndarray | None = None
        self._seq = 0
        self._sender_frame = 0  # the counted sender's number of the last frame handed on; 0 = uncounted
        self._last: np.ndarray | None = None  # the pixels last handed on (uncounted senders)
        self._next_read = 0.0  # perf_counter() before which an uncounted sender is not read again
        self.readbacks = 0  # receives that copied pixels, each a GPU readback
        self.size: tuple[int, int] | None = None
        self.waiting = f"waiting for the Spout sender {self._label()}"

    def _label(self) -> str:
        return repr(self.name) if self.name else "(the active one)"

    def _connect(self) -> Any:
        receiver = self._gl.SpoutReceiver()
        _gl_context(receiver, "receiver")
        if self.name:
            receiver.setReceiverName(self.name)
        return receiver

    def _poll(self) -> Frame | None:
        r = self._receiver
        paced = self._buffer is not None and not self._sender_frame and self.fps > 0
        now = time.perf_counter()
        if paced and now < self._next_read:
            return None  # an uncounted sender: its next frame is not due yet
        received = r.receiveImage(self._buffer, self._gl_format, self.flip, 0)
        if r.isUpdated():
            # a new sender or a new size: allocate, and receive into it from the next call on
            width, height = int(r.getSenderWidth()), int(r.getSenderHeight())
            if (width, height) != self.size:
                log.info("Spout sender %s is %dx%d", self._label(), width, height)
            self.size = (width, height)
            self._buffer = np.zeros((height, width, 4), np.uint8)
            self._sender_frame, self._last = 0, None
            return None
        if not received or self._buffer is None or not r.isConnected():
            self.waiting = f"waiting for the Spout sender {self._label()}"
            self._sender_frame, self._last = 0, None
            return None
        self.waiting = ""
        counted = int(r.getSenderFrame()) if r.isFrameCountEnabled() else 0
        if counted:
            if not r.isFrameNew() or counted == self._sender_frame:
                self._sender_frame = counted
                return None  # a repeat: Spout did not copy it (SpoutGL.cpp:1967)
            self._sender_frame = counted
        else:
            self._sender_frame = 0
            self._next_read = now + (1.0 / self.fps if self.fps > 0 else 0.0)
        self.readbacks += 1
        if not counted and self._last is not None and np.array_equal(self._buffer, self._last):
            return None  # an uncounted sender repeated its frame
        self._seq += 1
        pixels = from_format(self._buffer, PixelFormat.RGBA).copy()
        self._last = pixels
        return Frame(pixels, self._seq)

    def read(self, timeout_s: float) -> Frame | None:
        if self._receiver is None:
            self._receiver = self._connect()
        return poll_for_frame(self._poll, timeout_s, self.poll_s)

    def close(self) -> None:
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.releaseReceiver()
            receiver.closeOpenGL()
