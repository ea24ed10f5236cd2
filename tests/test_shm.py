"""The shared-memory frame ring across real process boundaries: no torn frames at full speed
with resizes, no segment left behind, readers that survive writer restarts."""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing as mp
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.frames import Frame
from bridge.transports.base import TransportUnavailable
from bridge.transports.shm import ShmSink, ShmSource
from bridge.transports.shmring import SLOT_HEADER, STALE_S, ShmReader, ShmWriter

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
    deadline = time.monotonic() + 30
    while not ready.wait(0.1):
        assert proc.is_alive() and time.monotonic() < deadline, f"the writer did not start: {proc.exitcode}"
    reader = ShmReader(name)
    checked, generations, bad = 0, set(), []
    deadline = time.monotonic() + 120  # the writer gives up after 60 s of writing
    while proc.is_alive() and time.monotonic() < deadline:
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
    if proc.is_alive():
        proc.kill()
        proc.join(10)
    assert proc.exitcode == 0, f"the writer process failed or hung: exit code {proc.exitcode}"
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
        with pytest.raises(FileExistsError, match=f"shared memory '{name}' is being written by this process"):
            ShmWriter(name)
    finally:
        writer.close()
        writer.close()  # idempotent


def test_a_ring_left_by_a_dead_writer_that_had_this_processs_pid_is_taken_over() -> None:
    """A restarted container can hand a new writer the pid its crashed predecessor had: that pid
    is alive (it is ours), but no writer of this process holds the name, so the ring is dead."""
    import atexit

    from bridge.transports import shmring

    name = unique("samepid")
    old = ShmWriter(name)
    old._stop_beat.set()  # it "crashes": no more beats, no close
    old._beat.join()
    atexit.unregister(old.close)
    with shmring._OPEN_LOCK:
        shmring._WRITING.discard(name)
    new = ShmWriter(name)
    reader = ShmReader(name)
    try:
        new.write(np.full((4, 4, 4), 3, np.uint8), source_seq=1)
        got = reader.read()
        assert got is not None and int(got[0][0, 0, 0]) == 3, reader.state
    finally:
        reader.close()
        new.close()
        old._control.close()


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


# --- a writer that crashes, one that takes over, one that is refused (two real processes) ---

WRITER_CHILD = """
import signal, sys, time
import numpy as np
from bridge.transports.shmring import ShmWriter
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
writer = ShmWriter(sys.argv[1])
mark, burst, seq = int(sys.argv[2]), int(sys.argv[3]), 0
try:
    for _ in range(burst):  # a burst first: the ring sequence runs well ahead
        seq += 1
        writer.write(np.full((8, 8, 4), mark, np.uint8), source_seq=seq)
    while True:
        seq += 1
        writer.write(np.full((8, 8, 4), mark, np.uint8), source_seq=seq)
        if seq == burst + 1:
            print("ready", flush=True)
        time.sleep(0.01)
finally:
    writer.close()
"""


def start_writer(name: str, mark: int, *, burst: int = 0, own_session: bool = False) -> subprocess.Popen[str]:
    """A writer in its own process, filling every frame with `mark`, 100 a second after a first
    `burst` at full speed; returns once it is writing. `own_session` puts it and its resource
    tracker in a process group of their own, so one killpg takes both down (nothing is left to
    clean up after it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_CHILD, name, str(mark), str(burst)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=own_session,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        proc.kill()
        proc.wait(10)
        pytest.fail(f"the writer process did not start: exit code {proc.returncode}, said {line!r}")
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    """End a writer process the way a clean shutdown does (SIGTERM: it closes its ring)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
    proc.wait(10)


def left_behind(name: str) -> list[str]:
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(name)) if sys.platform == "linux" else []


def load_touchdesigner_reader() -> Any:
    """touchdesigner/sdbridge_shm.py as TouchDesigner imports it: a module of its own."""
    # A name of its own: replacing sys.modules["sdbridge_shm"] would swap the module under other
    # tests that imported it (the TouchDesigner builder's generated code imports it by that name).
    name = "sdbridge_shm_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "touchdesigner" / "sdbridge_shm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def mark_of(reader: Any) -> int | None:
    """The mark of the next frame `reader` returns (an in-bridge ShmSource or TD's ShmReader)."""
    if isinstance(reader, ShmSource):
        frame = reader.read(0.05)
        return None if frame is None else int(frame.pixels[0, 0, 0])
    got = reader.read()
    if got is None:
        time.sleep(0.002)
        return None
    return int(got[0][0, 0, 0])


def wait_for_mark(reader: Any, mark: int, within_s: float) -> float | None:
    """Seconds until `reader` returns a frame of `mark`, or None if none came within `within_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        if mark_of(reader) == mark:
            return time.monotonic() - t0
    return None


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL is POSIX; the unlink goes through /dev/shm")
@pytest.mark.parametrize("reader_kind", ["bridge input", "touchdesigner"])
@pytest.mark.parametrize("new_ring", ["taken over", "made afresh"])
def test_reader_recovers_when_a_new_writer_replaces_one_killed_with_sigkill(
    reader_kind: str, new_ring: str
) -> None:
    """The show case: the writer dies with -9, a new one starts on the same name, and the reader
    (the bridge's shm input, or TouchDesigner's copy of the reader) follows it within 2 s. The new
    writer either takes over the segment the dead one left, or (its name unlinked meanwhile, as
    a version-1 writer's resource tracker or a hand did) makes a new one the reader must reopen."""
    name = unique("crash")
    reader: Any = (
        ShmSource(name=name) if reader_kind == "bridge input" else load_touchdesigner_reader().ShmReader(name)
    )
    ring = reader.reader if isinstance(reader, ShmSource) else reader
    first = start_writer(name, 1, burst=5000)
    second = None
    try:
        assert wait_for_mark(reader, 1, 10) is not None, "no frame from the first writer"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        deadline = time.monotonic() + 5
        while "waiting for a new writer" not in ring.state and time.monotonic() < deadline:
            mark_of(reader)
        # the pid told it, before the heartbeat went stale
        assert f"process {first.pid}, is not running" in ring.state, ring.state
        if isinstance(reader, ShmSource):
            assert reader.waiting == ring.state  # what the bridge's status shows for its input
        if new_ring == "made afresh":
            os.unlink(f"/dev/shm/{name}")
        second = start_writer(name, 2)
        took = wait_for_mark(reader, 2, 2.0)
        assert took is not None, f"the reader did not follow the new writer within 2 s (state: {ring.state})"
    finally:
        reader.close()
        stop(first)
        if second is not None:
            stop(second)
    assert left_behind(name) == [], "the new writer did not take over and then release the old segments"


@pytest.mark.skipif(sys.platform != "linux", reason="checks /dev/shm, Linux's view of the segments")
def test_a_writer_process_that_exits_without_close_leaves_nothing_behind() -> None:
    """Only a crash leaves the ring behind (for the next writer to take over); an exit with an
    exception or sys.exit() closes it, though the control segment is kept from the resource
    tracker."""
    name = unique("exit")
    code = (
        "import sys, numpy as np; from bridge.transports.shmring import ShmWriter; "
        f"w = ShmWriter({name!r}); w.write(np.zeros((4, 4, 4), np.uint8)); sys.exit(3)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=60).returncode == 3
    assert left_behind(name) == []


@pytest.mark.skipif(sys.platform != "linux", reason="checks /dev/shm, Linux's view of the segments")
def test_a_writer_takes_over_the_segments_of_a_dead_writer(caplog: pytest.LogCaptureFixture) -> None:
    """A writer killed with its resource tracker leaves its segments in /dev/shm; the next writer
    on that name takes them over (with a log line) instead of failing or waiting for a hand."""
    name = unique("dead")
    dead = start_writer(name, 1, burst=500, own_session=True)
    reader = ShmReader(name)
    got, deadline = None, time.monotonic() + 10
    while got is None and time.monotonic() < deadline:
        got = reader.read()
    assert got is not None, reader.state
    os.killpg(dead.pid, signal.SIGKILL)  # the writer and its resource tracker
    dead.wait(10)
    left = left_behind(name)
    assert left == [name, f"{name}_g1"], f"the crash did not leave the segments behind: {left}"
    with caplog.at_level(logging.WARNING, logger="bridge.transports.shmring"):
        writer = ShmWriter(name)
    try:
        # the ring sequence carries on: a reader that missed the crash still takes the new frames
        assert writer.write(np.full((8, 8, 4), 6, np.uint8)) > got[1].seq
        assert any(
            f"process {dead.pid}" in r.getMessage() and "taking over" in r.getMessage()
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
        assert f"{name}_g1" not in os.listdir("/dev/shm"), "the dead writer's data segment was not removed"
        writer.write(np.full((8, 8, 4), 7, np.uint8), source_seq=1)
        deadline = time.monotonic() + 2
        got = reader.read()
        while got is None and time.monotonic() < deadline:
            time.sleep(0.01)
            got = reader.read()
        assert got is not None and int(got[0][0, 0, 0]) == 7, reader.state
    finally:
        reader.close()
        writer.close()
    assert left_behind(name) == []


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP is POSIX")
def test_a_second_live_writer_is_refused_at_once_even_a_stopped_one() -> None:
    name = unique("live")
    other = start_writer(name, 1)
    try:
        for _ in range(2):  # running, then stopped (Ctrl+Z): its pid is alive either way
            t0 = time.monotonic()
            with pytest.raises(FileExistsError, match=f"process {other.pid}, which is running"):
                ShmWriter(name)
            # at once, not after the heartbeat goes stale (2 s: generous on a loaded machine)
            assert time.monotonic() - t0 < 2.0
            other.send_signal(signal.SIGSTOP)
            time.sleep(STALE_S + 0.5)  # its heartbeat goes stale; the pid still says it lives
        other.send_signal(signal.SIGCONT)
    finally:
        stop(other)
    assert left_behind(name) == []


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP is POSIX")
def test_a_reader_treats_a_stale_heartbeat_as_gone_and_comes_back() -> None:
    name = unique("stale")
    other = start_writer(name, 1)
    reader = ShmReader(name)
    try:
        assert wait_for_mark(reader, 1, 10) is not None
        other.send_signal(signal.SIGSTOP)  # alive, but neither writes nor beats
        deadline = time.monotonic() + 5
        while "no heartbeat" not in reader.state and time.monotonic() < deadline:
            reader.read()
            time.sleep(0.01)
        assert "no heartbeat" in reader.state, reader.state
        other.send_signal(signal.SIGCONT)
        assert wait_for_mark(reader, 1, 2.0) is not None, reader.state
    finally:
        reader.close()
        stop(other)
    assert left_behind(name) == []


def test_an_shm_output_on_a_name_a_live_writer_holds_is_a_final_error() -> None:
    """The sink's open error must be final, so the bridge stops at start with the message
    instead of retrying the open forever in the background."""
    from bridge.config import load_config
    from bridge.runtime import Bridge

    name = unique("taken")
    writer = ShmWriter(name)  # a live writer: this process
    with pytest.raises(TransportUnavailable, match=f"shared memory '{name}' is being written"):
        ShmSink(name=name)

    def no_engine(_cfg: Any) -> Any:
        raise AssertionError("the engine loaded although an output could not open")

    config = load_config(
        None, ["output.kind=shm", f"output.name={name}", "extra_outputs=[]", "osc.enabled=false"]
    )
    bridge = Bridge(config, engine_factory=no_engine)
    try:
        t0 = time.monotonic()
        with pytest.raises(TransportUnavailable, match="is being written"):
            bridge.run(threading.Event())
        assert time.monotonic() - t0 < 5
    finally:
        writer.close()
