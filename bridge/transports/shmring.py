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

A writer that crashes cannot say so: the control segment carries its pid and a heartbeat it
refreshes every `BEAT_S` seconds, a reader treats a dead pid or a heartbeat older than `STALE_S`
as "writer gone" and reopens the name, and a new writer takes over what a dead one left.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"SDBR"
VERSION = 2
CONTROL_SIZE = 256
SLOT_HEADER = 64
FORMATS = {"rgba": 0, "bgra": 1, "rgb": 2, "bgr": 3}
FORMAT_NAMES = {code: name for name, code in FORMATS.items()}
FLAG_CLOSED = 1
BEAT_S = 0.1  # the writer refreshes the heartbeat at least this often while it is open, seconds
STALE_S = 1.0  # a heartbeat older than this means the writer is gone (or stopped), seconds
CHECK_S = 0.05  # how often a reader looks at the writer's pid and heartbeat, seconds
RETRY_S = 0.1  # how often a reader reopens a name whose writer is gone, seconds
_PID_VERSIONS = (1, 2)  # versions whose writer pid (and heartbeat) sit at offsets 128 (136)

# control segment fields: (offset, struct format)
_MAGIC = (0, "4s")
_VERSION = (4, "<I")
_LAYOUT_SEQ = (8, "<Q")
_LAYOUT = (16, "<IIIIII")  # width, height, channels, format, slot_count, flags
_SLOT_STRIDE = (40, "<Q")
_LATEST = (48, "<QI")  # latest_seq, latest_slot
_DATA_NAME = (64, "64s")
_WRITER_PID = (128, "<Q")
_HEARTBEAT = (136, "<d")  # time.time() of the writer's last beat, seconds
_PID_NS = (144, "<Q")  # the writer's pid namespace (Linux: inode of /proc/self/ns/pid), 0 elsewhere
# slot header fields, relative to the slot start
_WRITE_SEQ = (0, "<Q")
_COMMIT_SEQ = (8, "<Q")
_FRAME_META = (16, "<dQ")  # t_capture (time.time(), seconds), source_seq


def _get(buf: memoryview, field: tuple[int, str], base: int = 0) -> tuple[object, ...]:
    return struct.unpack_from(field[1], buf, base + field[0])


def _put(buf: memoryview, field: tuple[int, str], *values: object, base: int = 0) -> None:
    struct.pack_into(field[1], buf, base + field[0], *values)


def _int(buf: memoryview, field: tuple[int, str]) -> int:
    value = _get(buf, field)[0]
    assert isinstance(value, int)
    return value


# Every SharedMemory this module builds is built under this lock (see _untracked).
_OPEN_LOCK = threading.Lock()
# Names this process writes: a ring whose pid is ours is live only if it is one of these (a
# restarted container can give a new writer the pid its crashed predecessor had).
_WRITING: set[str] = set()


def _create(name: str, size: int) -> shared_memory.SharedMemory:
    """A new segment, registered with this process's resource tracker, which unlinks it if the
    process dies without closing it (data segments: they can be large)."""
    with _OPEN_LOCK:
        return shared_memory.SharedMemory(name=name, create=True, size=size)


@contextlib.contextmanager
def _tracker_off() -> Iterator[None]:
    """Keep this process's resource tracker out of a segment. Python registers every segment it
    creates or attaches (< 3.13) and unlinks what is registered when the process exits, which
    would destroy a writer's segment when a reader quits, or a new writer's control segment
    when the tracker of the dead writer it replaced cleans up late. The calls are skipped rather
    than undone, so a writer in the same process keeps its own registrations."""
    if os.name != "posix":
        yield
        return
    from multiprocessing import resource_tracker

    with _OPEN_LOCK:
        register, unregister = resource_tracker.register, resource_tracker.unregister
        resource_tracker.register = resource_tracker.unregister = lambda *_args, **_kwargs: None  # type: ignore[assignment]
        try:
            yield
        finally:
            resource_tracker.register, resource_tracker.unregister = register, unregister  # type: ignore[assignment]


def _open_existing(name: str) -> shared_memory.SharedMemory:
    """Attach to a segment someone else owns, without this process's resource tracker."""
    with _tracker_off():
        return shared_memory.SharedMemory(name=name)


def _unlink(segment: shared_memory.SharedMemory) -> None:
    """Unlink a segment this process attached to or created untracked (a no-op on Windows,
    where a segment lives as long as someone maps it)."""
    with _tracker_off():
        segment.unlink()


def _remove(name: str) -> bool:
    """Unlink the segment `name` if it exists; True if it did. On Windows there is nothing to
    unlink: a segment goes when its last handle closes (the dead writer's went with it)."""
    if os.name != "posix":
        return False
    try:
        segment = _open_existing(name)
    except FileNotFoundError:
        return False
    try:
        _unlink(segment)
    except FileNotFoundError:
        return False  # someone else (the dead writer's resource tracker) was quicker
    finally:
        segment.close()
    return True


def _pid_namespace() -> int:
    """Which pids this process can see: on Linux the inode of its pid namespace (a container has
    its own), 0 elsewhere. A writer's pid means something to a reader only in the same one."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _pid_running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie has)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = ctypes.c_void_p
        kernel32.OpenProcess.argtypes = (ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32)
        kernel32.GetExitCodeProcess.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32))
        kernel32.CloseHandle.argtypes = (ctypes.c_void_p,)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists, we may not look
        code = ctypes.c_uint32()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return not ok or code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)  # signal 0: only asks whether it exists (never use this on Windows)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return True  # no /proc (macOS): a zombie counts as running until reaped


@dataclass(frozen=True)
class WriterState:
    """What a ring's control segment says about its writer."""

    pid: int
    running: bool | None  # None: the pid is from another pid namespace and cannot be checked
    beat_age_s: float  # seconds since its last heartbeat

    def gone(self) -> str:
        """Why a reader should treat the writer as gone, or "" if it is there."""
        if self.running is False:
            return f"its writer, process {self.pid}, is not running"
        if self.beat_age_s > STALE_S:
            return f"its writer (process {self.pid}) sent no heartbeat for {self.beat_age_s:.1f} s"
        return ""


def writer_state(buf: memoryview, name: str) -> WriterState:
    pid = _int(buf, _WRITER_PID)
    beat = _get(buf, _HEARTBEAT)[0]
    assert isinstance(beat, float)
    running: bool | None = None
    if _int(buf, _PID_NS) == _pid_namespace():
        running = name in _WRITING if pid == os.getpid() else _pid_running(pid)
    return WriterState(pid, running, time.time() - beat)


class RingInUse(FileExistsError):
    """Another writer, still alive, holds the ring's name (or the name is not an sdbridge ring)."""


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
    (idempotent; also run at interpreter exit) marks the ring closed and unlinks both segments.
    A thread of its own refreshes the heartbeat every `BEAT_S` seconds until `close()`.

    The name must be free, or held by a dead writer (its pid not running): this writer then
    takes its segments over, with a log line. A live writer on the name raises `RingInUse`."""

    def __init__(self, name: str = "sdbridge_out", *, slot_count: int = 3) -> None:
        if not 2 <= slot_count <= 16:
            raise ValueError(f"slot_count must be within [2, 16], got {slot_count}")
        self.name = name
        self.slot_count = slot_count
        self._data: shared_memory.SharedMemory | None = None
        self._layout: tuple[int, int, int, str] | None = None
        self._layout_seq = 0
        self._seq = 0
        self._closed = False
        with _OPEN_LOCK:
            if name in _WRITING:
                raise RingInUse(
                    f"shared memory {name!r} is being written by this process already (pid {os.getpid()}). "
                    f"Close that writer first, or pick another name"
                )
            _WRITING.add(name)
        try:
            self._control = self._open_control()
        except BaseException:
            with _OPEN_LOCK:
                _WRITING.discard(name)
            raise
        assert self._control.buf is not None
        self._buf: memoryview = self._control.buf
        self._stop_beat = threading.Event()
        self._beat = threading.Thread(target=self._beat_loop, name=f"shm-beat-{name}", daemon=True)
        self._beat.start()
        atexit.register(self.close)  # an exit without close() (an exception) leaves nothing behind

    def _open_control(self) -> shared_memory.SharedMemory:
        """Create the control segment, or take over the one a dead writer left."""
        for _ in range(3):
            try:
                with _tracker_off():  # it must outlive a crash: a new writer takes it over
                    control = shared_memory.SharedMemory(name=self.name, create=True, size=CONTROL_SIZE)
            except FileExistsError:
                pass
            else:
                assert control.buf is not None
                control.buf[:CONTROL_SIZE] = bytes(CONTROL_SIZE)
                self._stamp(control.buf)
                _put(control.buf, _MAGIC, MAGIC)  # last: a reader checks the magic before anything else
                return control
            try:
                control = _open_existing(self.name)
            except FileNotFoundError:
                continue  # its writer unlinked it in between: create it again
            try:
                self._take_over(control)
            except BaseException:
                control.close()
                raise
            return control
        raise RingInUse(
            f"shared memory {self.name!r} keeps appearing and vanishing: another writer is starting on it"
        )

    def _stamp(self, buf: memoryview) -> None:
        _put(buf, _VERSION, VERSION)
        _put(buf, _WRITER_PID, os.getpid())
        _put(buf, _PID_NS, _pid_namespace())
        _put(buf, _HEARTBEAT, time.time())

    def _take_over(self, control: shared_memory.SharedMemory) -> None:
        """Make the existing control segment ours if its writer is dead; raise RingInUse if not."""
        buf = control.buf
        assert buf is not None
        name = self.name
        if len(buf) < CONTROL_SIZE or bytes(buf[:4]) not in (MAGIC, bytes(4)):
            raise RingInUse(
                f"shared memory {name!r} exists but is not an sdbridge frame ring "
                f"(starts {bytes(buf[:4])!r}, expected {MAGIC!r}). Pick another name"
            )
        if _int(buf, _WRITER_PID) == 0:
            time.sleep(0.05)  # a writer created it this instant and has not stamped it yet
        version = _int(buf, _VERSION)
        if bytes(buf[:4]) == MAGIC and version not in _PID_VERSIONS:
            raise RingInUse(
                f"shared memory {name!r} is a frame ring of protocol version {version}, which this "
                f"writer (version {VERSION}) cannot tell is alive. Stop its writer, or pick another name"
            )
        state = writer_state(buf, name)
        if state.pid == os.getpid() and state.running:
            # no other writer of this process has the name (checked first): the ring is from a
            # crashed predecessor that had our pid (a restarted container)
            state = dataclasses.replace(state, running=False)
        if state.running or (state.running is None and state.beat_age_s <= STALE_S):
            where = "which is running" if state.running else "in another pid namespace (a container?)"
            raise RingInUse(
                f"shared memory {name!r} is being written by process {state.pid}, {where} "
                f"(its last heartbeat {max(state.beat_age_s, 0.0):.1f} s ago). Only one writer per name: "
                f"stop that one, or pick another name (for the bridge: --set output.name=...)"
            )
        # In place, as a resize: readers wait while layout_seq is odd, and generations (so data
        # segment names) and ring sequences carry on, so nobody mistakes an old frame for a new one.
        layout_seq = _int(buf, _LAYOUT_SEQ)
        _put(buf, _LAYOUT_SEQ, layout_seq | 1)
        dead = {bytes(_get(buf, _DATA_NAME)[0]).rstrip(b"\0").decode(errors="replace")}  # type: ignore[call-overload]
        dead |= {f"{name}_g{g}" for g in (layout_seq // 2, (layout_seq + 1) // 2) if g > 0}
        removed = sorted(n for n in dead if n and n.startswith(f"{name}_g") and _remove(n))
        why = state.gone() or f"its writer, process {state.pid}, is gone"
        log.warning("shm %r: %s; taking over its segments (removed %s)", name, why, removed or "none")
        self._seq = _int(buf, _LATEST)
        _put(buf, _LAYOUT, 0, 0, 0, 0, self.slot_count, 0)
        _put(buf, _SLOT_STRIDE, 0)
        _put(buf, _LATEST, self._seq, 0)
        _put(buf, _DATA_NAME, b"")
        self._stamp(buf)
        self._layout_seq = (layout_seq | 1) + 1  # even again: ours, with no frame yet
        _put(buf, _LAYOUT_SEQ, self._layout_seq)
        _put(buf, _MAGIC, MAGIC)

    def _beat_loop(self) -> None:
        while not self._stop_beat.wait(BEAT_S):
            _put(self._buf, _HEARTBEAT, time.time())

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
        _remove(data_name)  # only a dead writer's, left by a crash mid-resize, can be there
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
        atexit.unregister(self.close)
        self._stop_beat.set()
        self._beat.join()
        _put(self._buf, _LAYOUT, *(_get(self._buf, _LAYOUT)[:5]), FLAG_CLOSED)
        del self._buf
        if self._data is not None:
            self._data.close()
            self._data.unlink()
            self._data = None
        self._control.close()
        _unlink(self._control)
        with _OPEN_LOCK:
            _WRITING.discard(self.name)


class ShmReader:
    """Reads the newest frame of a ring written by `ShmWriter`, in any process.

    Never raises while the writer is missing, dead or restarting: `read()` returns None and
    `state` says why. A writer that closed, whose pid is not running, or whose heartbeat is older
    than `STALE_S` is gone: the reader detaches and opens the name again (every `RETRY_S`), so
    it follows a new writer. `close()` detaches (idempotent); the writer owns the segments.
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
        self._check_at = 0.0  # time.monotonic() of the next look at the writer's pid and heartbeat
        self._retry_at = 0.0  # no reopening before this while the name's writer is gone

    def _connect(self) -> memoryview | None:
        """The control segment of a live writer, mapped; None (and `state` says why) if there is
        none. A writer that closed, died or stopped beating is detached from, and the name is
        opened again: a new writer may have taken it."""
        now = time.monotonic()
        if self._control is not None and self._control.buf is not None:
            buf = self._control.buf
            if not self._closed_flag(buf):
                if now < self._check_at:
                    return buf
                self._check_at = now + CHECK_S
                gone = writer_state(buf, self.name).gone()
                if not gone:
                    return buf
                self._gone(gone, now)
                return None
            self._detach()  # the writer closed; a new one may have taken the name
        if now < self._retry_at:
            return None
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
        gone = "its writer has closed it" if self._closed_flag(buf) else writer_state(buf, self.name).gone()
        if gone:
            control.close()
            self._gone(gone, now)
            return None
        self._control = control
        self._check_at = now + CHECK_S
        self.state = "connected"
        return buf

    @staticmethod
    def _closed_flag(buf: memoryview) -> bool:
        flags = _get(buf, _LAYOUT)[5]
        return isinstance(flags, int) and bool(flags & FLAG_CLOSED)

    def _gone(self, why: str, now: float) -> None:
        self._detach()
        self.state = f"shared memory {self.name!r}: {why}; waiting for a new writer"
        self._retry_at = now + RETRY_S

    def _detach(self) -> None:
        for segment in (self._data, self._control):
            if segment is not None:
                segment.close()
        self._data = self._control = None
        self._data_name = b""
        self._last_seq = 0  # the next writer counts afresh

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
