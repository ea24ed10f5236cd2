"""Shared-memory source and sink over the frame ring in `shmring` (docs/shm-protocol.md)."""

from __future__ import annotations

import time

from bridge.frames import Frame, PixelFormat, from_format, to_format
from bridge.transports.base import TransportUnavailable, poll_for_frame
from bridge.transports.shmring import RingInUse, ShmReader, ShmWriter


class ShmSink:
    """Publishes every frame into the ring `name`; other processes read it with `ShmReader`
    (TouchDesigner: touchdesigner/sdbridge_shm.py). `close()` unlinks the segments.

    A name a live writer holds is final (`TransportUnavailable`): no retry frees it. Segments a
    dead writer left are taken over."""

    def __init__(self, *, name: str = "sdbridge_out", fmt: str = "rgba", slots: int = 3) -> None:
        self.format = PixelFormat.parse(fmt)
        try:
            self.writer = ShmWriter(name, slot_count=slots)
        except RingInUse as exc:
            raise TransportUnavailable(str(exc)) from exc

    def write(self, frame: Frame) -> None:
        pixels = frame.pixels
        if self.format is not PixelFormat.RGBA or pixels.shape[2] != 4:
            pixels = to_format(pixels, self.format)
        # perf_counter is per process; readers get wall-clock capture time
        t_wall = time.time() - (time.perf_counter() - frame.t_capture)
        self.writer.write(pixels, fmt=self.format.value, source_seq=frame.seq, t_capture=t_wall)

    def close(self) -> None:
        self.writer.close()


class ShmSource:
    """Reads frames another process writes into the ring `name` (e.g. a TouchDesigner Script
    TOP with `ShmWriter`). Returns None while the writer is absent, dead or stopped, and picks
    up the writer that (re)appears; `waiting` says what it waits for."""

    def __init__(self, *, name: str = "sdbridge_in", poll_s: float = 0.002) -> None:
        self.reader = ShmReader(name)
        self.poll_s = poll_s

    @property
    def waiting(self) -> str:
        state = self.reader.state
        return "" if state == "connected" else state

    def _poll(self) -> Frame | None:
        got = self.reader.read()
        if got is None:
            return None
        pixels, info = got
        return Frame(from_format(pixels, PixelFormat.parse(info.format)), info.source_seq)

    def read(self, timeout_s: float) -> Frame | None:
        return poll_for_frame(self._poll, timeout_s, self.poll_s)

    def close(self) -> None:
        self.reader.close()
