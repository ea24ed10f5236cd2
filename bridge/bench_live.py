"""Live-bridge measurements behind `sdbridge bench`, taken side by side in one run:

- shm round trip: one `ShmWriter.write` plus one `ShmReader.read` of an RGBA frame, against a
  plain numpy copy of the same frame (target: within 3x of the copy);
- OSC to applied: a real UDP message to a running in-process bridge, until the first output
  frame that carries it (target: at most one frame in between, the one already in flight);
- bridge overhead: capture-to-written latency of the real runtime (synthetic source, shm sink)
  minus the engine call, at 512x512 (target: <= 1 ms).
"""

from __future__ import annotations

import itertools
import socket
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bridge.config import SinkConfig, load_config
from bridge.control.osc import encode
from bridge.frames import Frame
from bridge.runtime import Bridge, EngineDriver, OutputInfo, in_background, initial_values
from bridge.transports.base import Sink
from bridge.transports.registry import availability, open_sink
from bridge.transports.shm import ShmSink
from bridge.transports.shmring import ShmReader, ShmWriter
from bridge.transports.synthetic import test_pattern

TARGETS = {"shm_vs_copy_max": 3.0, "osc_frames_in_between_max": 1, "bridge_overhead_ms_max": 1.0}


def _median_ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 4)


def shm_round_trip(sizes: tuple[int, ...] = (512, 1024), repeats: int = 200) -> list[dict[str, Any]]:
    """Write+read through the ring vs np.copyto of the same frame, alternating the two."""
    rows = []
    for size in sizes:
        frame = np.random.default_rng(size).integers(0, 256, (size, size, 4), dtype=np.uint8)
        copy_dst = np.empty_like(frame)
        read_dst = np.empty_like(frame)
        name = f"sdbench_{uuid.uuid4().hex[:8]}"
        writer, reader = ShmWriter(name), ShmReader(name)
        try:
            ring, plain = [], []
            for i in range(repeats + 5):
                t0 = time.perf_counter()
                writer.write(frame, source_seq=i)
                got = reader.read(read_dst)
                t1 = time.perf_counter()
                np.copyto(copy_dst, frame)
                t2 = time.perf_counter()
                if got is None:
                    raise RuntimeError("the shm reader missed a frame it had just been given")
                if i >= 5:  # warm-up: page faults of fresh segments
                    ring.append(t1 - t0)
                    plain.append(t2 - t1)
        finally:
            reader.close()
            writer.close()
        ring_ms, copy_ms = _median_ms(ring), _median_ms(plain)
        rows.append(
            {
                "size": [size, size],
                "shm_round_trip_ms": ring_ms,
                "numpy_copy_ms": copy_ms,
                "ratio_vs_copy": round(ring_ms / copy_ms, 2),
            }
        )
    return rows


class _TimedSink:
    """An shm sink that notes when each frame was written (perf_counter), by input seq."""

    def __init__(self, inner: ShmSink) -> None:
        self.inner = inner
        self.written: dict[int, float] = {}

    def write(self, frame: Frame) -> None:
        self.inner.write(frame)
        self.written.setdefault(frame.seq, time.perf_counter())

    def close(self) -> None:
        self.inner.close()


def _run_bridge(
    overrides: list[str],
    factory: Callable[[Any], EngineDriver],
    body: Callable[[Bridge, list[OutputInfo]], Any],
    sinks: Sequence[tuple[str, Callable[[], Sink]]] = (),
) -> Any:
    config = load_config(None, ["output.kind=null", "extra_outputs=[]", *overrides])
    bridge = Bridge(config, engine_factory=factory, sinks=sinks)
    with in_background(bridge) as infos:
        return body(bridge, infos)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def osc_to_applied(factory: Callable[[Any], EngineDriver], size: int, messages: int = 15) -> dict[str, Any]:
    port = _free_udp_port()
    overrides = [f"engine.width={size}", f"engine.height={size}", "runtime.fps=0", "input.fps=0"]
    overrides += [f"osc.port={port}", "osc.status_targets=[]"]

    def body(bridge: Bridge, infos: list[OutputInfo]) -> dict[str, Any]:
        latencies, between, frame_s = [], [], []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for k in range(messages):
                time.sleep(0.05)
                before = len(infos)
                version_before = infos[-1].param_version if infos else 0
                t_send = time.perf_counter()
                client.sendto(encode("/sd/seed", [1000 + k]), ("127.0.0.1", port))
                deadline = t_send + 30
                while not any(i.param_version > version_before for i in infos[before:]):
                    if time.perf_counter() > deadline:
                        raise RuntimeError("an OSC message was never applied")
                    time.sleep(0.0005)
                outs = infos[before:]
                carrying = next(i for i in outs if i.param_version > version_before)
                latencies.append(carrying.t_emit - t_send)
                # outputs emitted after the send that did not carry it: the frame in flight
                between.append(sum(1 for i in outs if i.t_emit > t_send and i.seq < carrying.seq))
        emits = [i.t_emit for i in infos if i.kind == "engine"]
        frame_s = [b - a for a, b in itertools.pairwise(emits)]
        return {
            "size": [size, size],
            "osc_to_applied_ms": _median_ms(latencies),
            "frame_ms": _median_ms(frame_s),
            "frames_in_between_max": max(between),
            "messages": messages,
        }

    result: dict[str, Any] = _run_bridge(overrides, factory, body)
    return result


def bridge_overhead(factory: Callable[[Any], EngineDriver], size: int, frames: int = 12) -> dict[str, Any]:
    """End-to-end latency (capture to written into shm) minus the engine call. The source runs
    slower than the engine so frames rarely wait for a busy engine; when one does, the wait
    counts from when the engine loop was free (the previous output's hand-over)."""
    probe = factory(None)
    probe.prepare(initial_values(load_config(None)))
    blank = np.zeros((size, size, 4), np.uint8)
    for _ in range(2):
        probe.engine(blank, output_type="uint8")
    t0 = time.perf_counter()
    probe.engine(blank, output_type="uint8")
    engine_s = time.perf_counter() - t0
    del probe
    fps = 1.0 / (1.6 * engine_s)
    name = f"sdbench_{uuid.uuid4().hex[:8]}"
    overrides = [f"engine.width={size}", f"engine.height={size}", "runtime.fps=0", f"input.fps={fps:.4f}"]
    overrides += ["osc.enabled=false"]
    sink = _TimedSink(ShmSink(name=name))

    def body(bridge: Bridge, infos: list[OutputInfo]) -> dict[str, Any]:
        def measured() -> list[tuple[OutputInfo, OutputInfo]]:
            """(previous output, output) for engine frames already written, past the first two."""
            pairs = itertools.pairwise(list(infos))
            return [(p, i) for p, i in pairs if i.kind == "engine" and i.input_seq in sink.written][2:]

        deadline = time.perf_counter() + 600
        while len(done := measured()) < frames:
            if time.perf_counter() > deadline:
                raise RuntimeError("the bridge overhead run produced too few frames")
            time.sleep(0.01)
        latency = [sink.written[i.input_seq] - i.t_capture for _, i in done]
        # A frame that arrived while the engine was still busy with the one before waited for
        # the engine, not for the bridge: count from when the loop was free to take it.
        overhead = [
            sink.written[i.input_seq] - max(i.t_capture, prev.t_emit) - i.engine_ms / 1000 for prev, i in done
        ]
        done_infos = [i for _, i in done]
        return {
            "size": [size, size],
            "latency_ms": _median_ms(latency),
            "engine_ms": round(statistics.median(i.engine_ms for i in done_infos), 3),
            "overhead_ms": _median_ms(overhead),
            "frames": len(done),
            "source_fps": round(fps, 3),
        }

    result: dict[str, Any] = _run_bridge(overrides, factory, body, [("bench-shm", lambda: sink)])
    return result


# Sinks whose write cost means something here: a virtual camera's write waits for the camera's
# next frame slot, so its time is the pacing, not the cost.
MEASURED_SINKS = ("shm", "ndi", "spout", "syphon", "preview", "null")


def sink_write_costs(sizes: tuple[int, ...] = (512, 1024), repeats: int = 60) -> list[dict[str, Any]]:
    """Per-sink `write` time for every sink that can open here, vs np.copyto of the same frame,
    alternating the two. Frames change every write (four test patterns), as they do live. The
    preview sink encodes every frame (its frame-rate cap is lifted)."""
    rows = []
    for kind in MEASURED_SINKS:
        reason = availability(kind)
        if reason:
            rows.append({"kind": kind, "available": False, "reason": reason})
            continue
        for size in sizes:
            frames = [test_pattern(seq, size, size) for seq in range(4)]
            copy_dst = np.empty_like(frames[0])
            fps = 1e6 if kind == "preview" else 0.0  # lift the preview's cap; NDI keeps its default rate
            cfg = SinkConfig(kind=kind, name=f"sdbench_{uuid.uuid4().hex[:8]}", port=0, fps=fps)
            sink = open_sink(cfg)
            try:
                written, plain = [], []
                for i in range(repeats + 5):
                    frame = Frame(frames[i % 4], i)
                    t0 = time.perf_counter()
                    sink.write(frame)
                    t1 = time.perf_counter()
                    np.copyto(copy_dst, frame.pixels)
                    t2 = time.perf_counter()
                    if i >= 5:  # warm-up: first allocations, an NDI sender's start
                        written.append(t1 - t0)
                        plain.append(t2 - t1)
            finally:
                sink.close()
            write_ms, copy_ms = _median_ms(written), _median_ms(plain)
            rows.append(
                {
                    "kind": kind,
                    "available": True,
                    "size": [size, size],
                    "write_ms": write_ms,
                    "numpy_copy_ms": copy_ms,
                    "ratio_vs_copy": round(write_ms / copy_ms, 2),
                }
            )
    return rows


def run_live_bench(
    factory_for: Callable[[int], Callable[[Any], EngineDriver]],
    progress: Callable[[str], None],
    *,
    osc_size: int,
    sizes: tuple[int, ...] = (512, 1024),
) -> dict[str, Any]:
    """All three live-bridge measurements; `factory_for(size)` builds engine drivers. The shm
    round trip and the sink writes are measured at each of `sizes`, the overhead at the first."""
    overhead_size = sizes[0]
    at = " and ".join(str(px) for px in sizes)
    progress(f"measuring the shm round trip at {at} px")
    shm = shm_round_trip(sizes)
    progress(f"measuring each sink's write at {at} px")
    sinks = sink_write_costs(sizes)
    progress(f"measuring OSC to applied at {osc_size} px")
    osc = osc_to_applied(factory_for(osc_size), osc_size)
    progress(f"measuring the bridge overhead at {overhead_size} px")
    overhead = bridge_overhead(factory_for(overhead_size), overhead_size)
    return {"shm": shm, "sinks": sinks, "osc": osc, "overhead": overhead, "targets": TARGETS}


__all__ = ["run_live_bench"]
