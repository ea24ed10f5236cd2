"""Shared-memory frame ring: writer and reader. Standalone: numpy and the standard library only,
so TouchDesigner's Python can use a copy of this file (`touchdesigner/sdbridge_shm.py`).

The byte layout is specified in `docs/shm-protocol.md`; keep the two in step.

Two segments:
  * the control segment, named `name`, 256 bytes, lives as long as the writer;
  * a data segment per layout generation, named `{name}_g{generation}`, holding `slot_count`
    slots of (64-byte slot header + pixels). A size or format change makes a new one.

A reader never returns a torn frame: each slot carries `write_seq` (stored before the pixels)
and `commit_seq` (stored after). The reader copies the pixels between reading `commit_seq` and
`write_seq`, and keeps the copy only when both equal (a seqlock); the layout works the same way
with `layout_seq`, which is odd while the writer changes the layout.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

MAGIC = b"SDBR"
VERSION = 1
CONTROL_SIZE = 256
SLOT_HEADER = 64
FORMATS = {"rgba": 0, "bgra": 1, "rgb": 2, "bgr": 3}
FORMAT_NAMES = {code: name for name, code in FORMATS.items()}
FLAG_CLOSED = 1

# control segment fields: (offset, struct format)
_MAGIC = (0, "4s")
_VERSION = (4, "<I")
_LAYOUT_SEQ = (8, "<Q")
_LAYOUT = (16, "<IIIIII")  # width, height, channels, format, slot_count, flags
_SLOT_STRIDE = (40, "<Q")
_LATEST = (48, "<QI")  # latest_seq, latest_slot
_DATA_NAME = (64, "64s")
_WRITER_PID = (128, "<Q")
_HEARTBEAT = (136, "<d")
# slot header fields, relative to the slot start
_WRITE_SEQ = (0, "<Q")
_COMMIT_SEQ = (8, "<Q")
_FRAME_META = (16, "<dQ")  # t_capture (time.time(), seconds), source_seq


def _get(buf: memoryview, field: tuple[int, str], base: int = 0) -> tuple[object, ...]:
    return struct.unpack_from(field[1], buf, base + field[0])


def _put(buf: memoryview, field: tuple[int, str], *values: object, base: int = 0) -> None:
    struct.pack_into(field[1], buf, base + field[0], *values)


# Every SharedMemory this module builds is built under this lock (see _open_existing).
_OPEN_LOCK = threading.Lock()


def _create(name: str, size: int) -> shared_memory.SharedMemory:
    with _OPEN_LOCK:
        return shared_memory.SharedMemory(name=name, create=True, size=size)


def _open_existing(name: str) -> shared_memory.SharedMemory:
    """Attach to a segment someone else owns without registering it with this process's resource
    tracker: Python < 3.13 registers every attach, and the tracker unlinks what is registered
    when the process exits, which would destroy the writer's segment when a reader quits. The
    registration is skipped rather than undone, so a writer in the same process keeps its own."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg,unused-ignore]
    if os.name != "posix":
        return shared_memory.SharedMemory(name=name)
    from multiprocessing import resource_tracker

    with _OPEN_LOCK:
        register = resource_tracker.register
        resource_tracker.register = lambda *_args, **_kwargs: None  # type: ignore[assignment]
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = register  # type: ignore[assignment]


@dataclass(frozen=True)
class FrameInfo:
    """What the reader learned with a frame."""

    seq: int  # ring sequence, 1, 2, 3, ... across resizes
    source_seq: int  # the writer's own frame number
    t_capture: float  # time.time() when the frame was captured, seconds
    width: int
    height: int
    format: str  # rgba | bgra | rgb | bgr
    generation: int  # layout generation: changes when size or format change


class ShmWriter:
    """Writes frames into a ring other processes can read. One thread calls `write`; `close()`
    (idempotent) marks the ring closed and unlinks both segments."""

    def __init__(self, name: str = "sdbridge_out", *, slot_count: int = 3) -> None:
        if not 2 <= slot_count <= 16:
            raise ValueError(f"slot_count must be within [2, 16], got {slot_count}")
        self.name = name
        self.slot_count = slot_count
        try:
            self._control = _create(name, CONTROL_SIZE)
        except FileExistsError:
            raise FileExistsError(
                f"shared memory {name!r} already exists: another bridge is writing it, or one was "
                f"killed without cleanup. Pick another name (--set output.name=...) or remove "
                f"/dev/shm/{name} if no bridge is running"
            ) from None
        assert self._control.buf is not None
        self._buf: memoryview = self._control.buf
        self._buf[:CONTROL_SIZE] = bytes(CONTROL_SIZE)
        _put(self._buf, _VERSION, VERSION)
        _put(self._buf, _WRITER_PID, os.getpid())
        _put(self._buf, _MAGIC, MAGIC)  # last: a reader checks the magic before anything else
        self._data: shared_memory.SharedMemory | None = None
        self._layout: tuple[int, int, int, str] | None = None
        self._layout_seq = 0
        self._seq = 0
        self._closed = False

    @property
    def generation(self) -> int:
        return self._layout_seq // 2

    def write(
        self, pixels: np.ndarray, *, fmt: str = "rgba", source_seq: int = 0, t_capture: float | None = None
    ) -> int:
        """Publish one (H, W, C) uint8 frame; returns its ring sequence number."""
        if self._closed:
            raise RuntimeError(f"shm writer {self.name!r} is closed")
        if pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise ValueError(f"pixels must be (H, W, C) uint8, got {pixels.shape} {pixels.dtype}")
        height, width, channels = pixels.shape
        if FORMATS.get(fmt) is None or channels != (4 if fmt in ("rgba", "bgra") else 3):
            raise ValueError(
                f"format {fmt!r} does not fit {channels}-channel pixels (use rgba/bgra or rgb/bgr)"
            )
        if self._layout != (width, height, channels, fmt):
            self._relayout(width, height, channels, fmt)
        assert self._data is not None and self._data.buf is not None
        data = self._data.buf
        self._seq += 1
        slot = self._seq % self.slot_count
        base = slot * self._stride
        _put(data, _WRITE_SEQ, self._seq, base=base)
        dst = np.ndarray((height, width, channels), np.uint8, data, offset=base + SLOT_HEADER)
        np.copyto(dst, pixels)
        _put(data, _FRAME_META, time.time() if t_capture is None else t_capture, source_seq, base=base)
        _put(data, _COMMIT_SEQ, self._seq, base=base)
        _put(self._buf, _LATEST, self._seq, slot)
        _put(self._buf, _HEARTBEAT, time.time())
        return self._seq

    def _relayout(self, width: int, height: int, channels: int, fmt: str) -> None:
        old = self._data
        self._layout_seq += 1  # odd: readers wait
        _put(self._buf, _LAYOUT_SEQ, self._layout_seq)
        self._stride = SLOT_HEADER + -(-width * height * channels // 64) * 64
        data_name = f"{self.name}_g{(self._layout_seq + 1) // 2}"
        self._data = _create(data_name, self._stride * self.slot_count)
        assert self._data.buf is not None
        self._data.buf[: self._stride * self.slot_count] = bytes(self._stride * self.slot_count)
        _put(self._buf, _LAYOUT, width, height, channels, FORMATS[fmt], self.slot_count, 0)
        _put(self._buf, _SLOT_STRIDE, self._stride)
        _put(self._buf, _DATA_NAME, data_name.encode())
        self._layout_seq += 1  # even: stable again
        _put(self._buf, _LAYOUT_SEQ, self._layout_seq)
        self._layout = (width, height, channels, fmt)
        if old is not None:  # readers still mapping it keep a valid view until they move on
            old.close()
            old.unlink()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _put(self._buf, _LAYOUT, *(_get(self._buf, _LAYOUT)[:5]), FLAG_CLOSED)
        del self._buf
        for segment in (self._data, self._control):
            if segment is not None:
                segment.close()
                segment.unlink()
        self._data = None


class ShmReader:
    """Reads the newest frame of a ring written by `ShmWriter`, in any process.

    Never raises while the writer is missing or restarting: `read()` returns None and `state`
    says why. `close()` detaches (idempotent); the writer owns the segments.
    """

    def __init__(self, name: str = "sdbridge_out", *, retries: int = 8) -> None:
        self.name = name
        self.retries = retries
        self.state = "not connected"
        self.torn_retries = 0  # copies discarded because the writer overwrote the slot meanwhile
        self._control: shared_memory.SharedMemory | None = None
        self._data: shared_memory.SharedMemory | None = None
        self._data_name = b""
        self._last_seq = 0

    def _connect(self) -> memoryview | None:
        if self._control is not None and self._control.buf is not None:
            buf = self._control.buf
            flags = _get(buf, _LAYOUT)[5]
            if not isinstance(flags, int) or not flags & FLAG_CLOSED:
                return buf
            self._detach()  # the writer closed; a new one may have taken the name
        try:
            control = _open_existing(self.name)
        except FileNotFoundError:
            self.state = f"no shared memory named {self.name!r}: is the bridge running with an shm output of that name?"
            return None
        assert control.buf is not None
        buf = control.buf
        if len(buf) < CONTROL_SIZE or _get(buf, _MAGIC)[0] != MAGIC:
            control.close()
            self.state = f"shared memory {self.name!r} is not an sdbridge frame ring (bad magic)"
            return None
        version = _get(buf, _VERSION)[0]
        if version != VERSION:
            control.close()
            self.state = (
                f"shared memory {self.name!r} speaks protocol version {version}; this reader speaks {VERSION}"
            )
            return None
        self._control = control
        self.state = "connected"
        return buf

    def _detach(self) -> None:
        for segment in (self._data, self._control):
            if segment is not None:
                segment.close()
        self._data = self._control = None
        self._data_name = b""

    def read(self, out: np.ndarray | None = None) -> tuple[np.ndarray, FrameInfo] | None:
        """The newest frame if it is newer than the last one returned, else None.

        `out`, if given and of the right shape, receives the pixels (no allocation)."""
        buf = self._connect()
        if buf is None:
            return None
        for _ in range(self.retries):
            layout_seq = _get(buf, _LAYOUT_SEQ)[0]
            assert isinstance(layout_seq, int)
            if layout_seq % 2:
                time.sleep(0)  # the writer is mid-resize
                continue
            width, height, channels, fmt_code, _slots, _flags = _get(buf, _LAYOUT)
            (stride,) = _get(buf, _SLOT_STRIDE)
            data_name = bytes(_get(buf, _DATA_NAME)[0]).rstrip(b"\0")  # type: ignore[call-overload]
            latest_seq, slot = _get(buf, _LATEST)
            if _get(buf, _LAYOUT_SEQ)[0] != layout_seq:
                continue  # the writer began a resize while the header was read: it may be mixed
            if not data_name or latest_seq == 0:
                self.state = "connected, no frame yet"
                return None
            if latest_seq == self._last_seq:
                return None
            if data_name != self._data_name:
                if self._data is not None:
                    self._data.close()
                    self._data = None
                try:
                    self._data = _open_existing(data_name.decode())
                except FileNotFoundError:
                    continue  # replaced by a newer layout in between; read the header again
                self._data_name = data_name
            assert self._data is not None and self._data.buf is not None
            assert isinstance(slot, int) and isinstance(stride, int)
            data, base = self._data.buf, slot * stride
            shape = (int(height), int(width), int(channels))  # type: ignore[call-overload]
            if len(data) < base + SLOT_HEADER + shape[0] * shape[1] * shape[2]:
                # a header that does not fit its segment (a faulty writer): never index past it
                self._data.close()
                self._data, self._data_name = None, b""
                continue
            commit = _get(data, _COMMIT_SEQ, base)[0]
            src = np.ndarray(shape, np.uint8, data, offset=base + SLOT_HEADER)  # type: ignore[arg-type]
            if out is None or out.shape != shape or out.dtype != np.uint8:
                out = np.empty(shape, np.uint8)
            np.copyto(out, src)
            t_capture, source_seq = _get(data, _FRAME_META, base)
            del src
            if _get(data, _WRITE_SEQ, base)[0] != commit or _get(buf, _LAYOUT_SEQ)[0] != layout_seq:
                self.torn_retries += 1
                continue
            assert isinstance(commit, int)
            if commit <= self._last_seq or commit == 0:
                return None
            self._last_seq = commit
            info = FrameInfo(
                seq=commit,
                source_seq=int(source_seq),  # type: ignore[call-overload]
                t_capture=float(t_capture),  # type: ignore[arg-type]
                width=int(width),  # type: ignore[call-overload]
                height=int(height),  # type: ignore[call-overload]
                format=FORMAT_NAMES.get(int(fmt_code), "rgba"),  # type: ignore[call-overload]
                generation=layout_seq // 2,
            )
            return out, info
        return None

    def close(self) -> None:
        self._detach()
        self.state = "closed"
