"""The shared-memory frame ring across real process boundaries: no torn frames at full speed
with resizes, no segment left behind, readers that survive writer restarts."""

from __future__ import annotations

import multiprocessing as mp
import os
import struct
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest

from bridge.frames import Frame
from bridge.transports.shm import ShmSink, ShmSource
from bridge.transports.shmring import SLOT_HEADER, ShmReader, ShmWriter

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(64, 48, 4), (128, 96, 4), (32, 32, 3), (200, 120, 4)]  # (width, height, channels)
BASE = np.random.default_rng(7).integers(0, 256, 200 * 120 * 4, dtype=np.uint8)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def expected(seq: int) -> np.ndarray:
    """Frame `seq` of the torture run: its size changes every 25 frames, its bytes every frame."""
    w, h, c = SIZES[(seq // 25) % len(SIZES)]
    return (BASE[: w * h * c] + np.uint8(seq % 251)).reshape(h, w, c)


def torture_writer(name: str, ready: mp.synchronize.Event, enough: mp.synchronize.Event) -> None:
    """Writes at full speed until the reader has seen enough (or 60 s): on a loaded machine the
    reader may be scheduled rarely, and a fixed frame count could end before it read any."""
    writer = ShmWriter(name, slot_count=2)  # two slots: the writer reuses each one constantly
    ready.set()
    seq, deadline = 0, time.monotonic() + 60
    while not (seq % 100 == 0 and (enough.is_set() or time.monotonic() > deadline)):
        seq += 1
        px = expected(seq)
        writer.write(px, fmt="rgba" if px.shape[2] == 4 else "rgb", source_seq=seq)
    time.sleep(0.5)
    writer.close()


def test_no_torn_frames_across_processes_with_resizes() -> None:
    name = unique("torn")
    ctx = mp.get_context("spawn")
    ready, enough = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=torture_writer, args=(name, ready, enough))
    proc.start()
    assert ready.wait(30)
    reader = ShmReader(name)
    checked, generations, bad = 0, set(), []
    while proc.is_alive() or checked == 0:
        got = reader.read()
        if got is None:
            continue
        pixels, info = got
        want = expected(info.source_seq)
        if pixels.shape != want.shape or zlib.crc32(pixels.tobytes()) != zlib.crc32(want.tobytes()):
            bad.append(info)
        checked += 1
        generations.add(info.generation)
        if checked >= 1000 and len(generations) >= 8:
            enough.set()
    proc.join(10)
    reader.close()
    assert not bad, f"{len(bad)} torn or mixed frames of {checked}, first {bad[0]}"
    assert checked > 100, f"only {checked} frames read"
    assert len(generations) >= 4, f"resizes not exercised: generations {sorted(generations)}"
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(name)] if sys.platform == "linux" else True


def test_reader_rejects_a_slot_the_writer_is_overwriting() -> None:
    name = unique("seqlock")
    writer = ShmWriter(name, slot_count=2)
    reader = ShmReader(name)
    try:
        writer.write(np.full((4, 4, 4), 1, np.uint8))
        assert reader.read() is not None
        writer.write(np.full((4, 4, 4), 2, np.uint8))  # seq 2 lands in slot 0
        data = writer._data
        assert data is not None and data.buf is not None
        struct.pack_into("<Q", data.buf, 0, 4)  # a writer that has begun seq 4 in that slot
        assert reader.read() is None and reader.torn_retries == reader.retries
        struct.pack_into("<Q", data.buf, 0, 2)  # the write completes (commit matches again)
        got = reader.read()
        assert got is not None and got[1].seq == 2 and int(got[0][0, 0, 0]) == 2
    finally:
        reader.close()
        writer.close()


def test_a_resize_while_the_reader_reads_the_header_is_not_mixed_into_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The interleaving the cross-process test once hit: the reader has the old (larger) width and
    height when the writer swaps in a smaller layout, then reads the new stride and segment."""
    from bridge.transports import shmring

    name = unique("mixed")
    writer = ShmWriter(name, slot_count=2)
    reader = ShmReader(name)
    real_get, resized = shmring._get, []

    def get_then_resize(buf: memoryview, field: tuple[int, str], base: int = 0) -> tuple[object, ...]:
        got = real_get(buf, field, base)
        if field is shmring._LAYOUT and not resized:
            resized.append(True)
            writer.write(np.full((8, 8, 3), 5, np.uint8), fmt="rgb", source_seq=2)
        return got

    try:
        writer.write(np.full((120, 200, 4), 1, np.uint8), source_seq=1)
        monkeypatch.setattr(shmring, "_get", get_then_resize)
        got = reader.read()
        assert resized and got is not None
        assert got[0].shape == (8, 8, 3) and got[1].source_seq == 2 and int(got[0].max()) == 5
    finally:
        monkeypatch.undo()
        reader.close()
        writer.close()


def test_reader_states_and_writer_restart() -> None:
    name = unique("restart")
    reader = ShmReader(name)
    assert reader.read() is None and "no shared memory named" in reader.state
    writer = ShmWriter(name)
    assert reader.read() is None and reader.state == "connected, no frame yet"
    writer.write(np.zeros((8, 8, 4), np.uint8), source_seq=5)
    got = reader.read()
    assert got is not None and got[1].source_seq == 5 and got[1].format == "rgba"
    assert reader.read() is None  # nothing newer
    writer.close()
    assert reader.read() is None
    writer = ShmWriter(name)  # a restarted bridge
    writer.write(np.full((6, 10, 3), 9, np.uint8), fmt="rgb", source_seq=1)
    writer.write(np.full((6, 10, 3), 9, np.uint8), fmt="rgb", source_seq=2)
    got = reader.read()
    assert got is not None and got[0].shape == (6, 10, 3) and got[1].source_seq == 2
    reader.close()
    writer.close()


def test_a_second_writer_on_the_same_name_is_refused() -> None:
    name = unique("dup")
    writer = ShmWriter(name)
    try:
        with pytest.raises(FileExistsError, match=f"shared memory '{name}' already exists"):
            ShmWriter(name)
    finally:
        writer.close()
        writer.close()  # idempotent


def read_in_child(name: str, count: int, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    reader = ShmReader(name)
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + 20
    while len(got) < count and time.monotonic() < deadline:
        frame = reader.read()
        if frame is not None:
            got.append((frame[1].source_seq, int(frame[0].sum())))
    reader.close()
    queue.put(got)


def test_reader_process_exit_leaves_the_writers_segment() -> None:
    """Python < 3.13 registers attached segments with the resource tracker, which would unlink
    the writer's segment when the reader exits; the reader opts out."""
    name = unique("tracker")
    sink = ShmSink(name=name)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=read_in_child, args=(name, 3, queue))
    proc.start()
    seq = 0
    while proc.is_alive() and seq < 100000:
        seq += 1
        sink.write(Frame(np.full((16, 16, 4), seq % 256, np.uint8), seq))
        time.sleep(0.005)
    got = queue.get(timeout=10)
    proc.join(10)
    assert len(got) == 3 and all(total == 16 * 16 * 4 * (s % 256) for s, total in got)
    sink.write(Frame(np.zeros((16, 16, 4), np.uint8), seq + 1))  # still there for us
    reader = ShmReader(name)
    assert reader.read() is not None
    reader.close()
    sink.close()


def test_shm_source_converts_formats() -> None:
    name = unique("src")
    writer = ShmWriter(name)
    source = ShmSource(name=name)
    try:
        assert source.read(0.01) is None
        bgr = np.zeros((4, 4, 3), np.uint8)
        bgr[..., 0] = 200  # blue
        writer.write(bgr, fmt="bgr", source_seq=3)
        frame = source.read(1.0)
        assert frame is not None and frame.seq == 3
        assert frame.pixels.shape == (4, 4, 4) and tuple(frame.pixels[0, 0]) == (0, 0, 200, 255)
    finally:
        source.close()
        writer.close()


def test_shm_sink_writes_the_configured_format() -> None:
    name = unique("fmt")
    sink = ShmSink(name=name, fmt="bgra")
    reader = ShmReader(name)
    try:
        px = np.zeros((2, 2, 4), np.uint8)
        px[..., 0], px[..., 3] = 255, 255  # red
        sink.write(Frame(px, 1))
        got = reader.read()
        assert got is not None and got[1].format == "bgra" and tuple(got[0][0, 0]) == (0, 0, 255, 255)
        assert SLOT_HEADER == 64
    finally:
        reader.close()
        sink.close()


def test_touchdesigner_copy_matches_the_protocol_module() -> None:
    ours = (ROOT / "bridge" / "transports" / "shmring.py").read_text(encoding="utf-8")
    theirs = (ROOT / "touchdesigner" / "sdbridge_shm.py").read_text(encoding="utf-8")
    assert theirs == ours, (
        "touchdesigner/sdbridge_shm.py drifted: cp bridge/transports/shmring.py touchdesigner/sdbridge_shm.py"
    )


def test_standalone_reader_needs_only_numpy() -> None:
    import subprocess

    code = (
        "import sys; sys.path.insert(0, 'touchdesigner'); import sdbridge_shm; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('bridge', 'torch', 'pythonosc', 'yaml')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
