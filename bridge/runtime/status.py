"""What the engine loop records about each output frame, and the status figures made from it.

Each figure comes from the frames that can tell it: fps from every output, latency and engine
time from engine frames only (bypass, frozen and held frames would report the cost of no work),
the skip rate from the frames the engine saw. A figure whose frames have stopped coming keeps its
last value, and `latency_age_s` says how old it is.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FPS_WINDOW_S = 2.0  # fps counts the outputs of the last 2 s ...
FPS_HORIZON_S = 20.0  # ... and at least the last two within 20 s, so 0.05 fps still reads right
ENGINE_FRAMES = 60  # latency and engine time: median of this many recent engine frames
SEEN_FRAMES = 60  # skip rate: over this many recent frames the engine saw


@dataclass(frozen=True)
class OutputInfo:
    """What the engine loop knows about each output frame (for `on_output` observers)."""

    seq: int  # output counter, 1, 2, 3, ...
    input_seq: int  # seq of the input frame it was made from (held/frozen: the original's)
    kind: str  # engine | skipped | bypass | frozen | held
    t_capture: float  # perf_counter of the input it came from (held/frozen: the original input)
    t_start: float  # perf_counter when the engine loop started on it
    t_emit: float  # perf_counter when it was handed to the sinks
    engine_ms: float  # engine call time, 0 when the engine did not run
    param_version: int  # the newest parameter submission applied before this frame


def output_fps(emits: Sequence[float], now: float) -> float:
    """Frames per second from the emit times `emits` (perf_counter s, oldest first) at `now`.

    The rate over the outputs of the last FPS_WINDOW_S, or over the last two when fewer came
    (below 1 fps a 1 s window holds one frame and read 0). Once the output has been silent
    for longer than 1.5 of its own intervals, the rate is at most one frame per silence, so a
    stopped output falls towards 0 instead of repeating its old rate; 0 past FPS_HORIZON_S."""
    times = [t for t in emits if now - t <= FPS_HORIZON_S]
    if len(times) < 2:
        return 0.0
    window = [t for t in times if now - t <= FPS_WINDOW_S]
    if len(window) < 2:
        window = times[-2:]
    interval = (window[-1] - window[0]) / (len(window) - 1)
    rate = 1.0 / max(interval, 1e-6)
    silence = now - window[-1]
    if silence > 1.5 * interval:
        rate = min(rate, 1.0 / silence)
    return rate


class OutputRecord:
    """The recent outputs, kept per figure so that one kind of frame cannot push another out
    (a minute of bypass leaves the engine frames behind latency untouched). Written by the
    engine loop, read by whoever asks for status; the deques are only appended to and copied."""

    def __init__(self) -> None:
        self.emits: deque[float] = deque(maxlen=240)  # every output's t_emit
        self.engine: deque[OutputInfo] = deque(maxlen=ENGINE_FRAMES)  # kind "engine"
        self.seen: deque[bool] = deque(maxlen=SEEN_FRAMES)  # frames the engine saw: skipped?

    def add(self, info: OutputInfo) -> None:
        self.emits.append(info.t_emit)
        if info.kind == "engine":
            self.engine.append(info)
        if info.kind in ("engine", "skipped"):
            self.seen.append(info.kind == "skipped")

    def figures(self, now: float) -> dict[str, Any]:
        """fps, latency_ms, latency_age_s, engine_ms and skip_rate, as Status fields."""
        engine = list(self.engine)
        seen = list(self.seen)
        figures: dict[str, Any] = {
            "fps": round(output_fps(list(self.emits), now), 3),
            "skip_rate": round(sum(seen) / len(seen), 3) if seen else 0.0,
        }
        if engine:
            figures["latency_ms"] = round(
                statistics.median(1000 * (o.t_emit - o.t_capture) for o in engine), 2
            )
            figures["engine_ms"] = round(statistics.median(o.engine_ms for o in engine), 2)
            figures["latency_age_s"] = round(now - engine[-1].t_emit, 2)
        return figures


def dropped_at(slots: Sequence[tuple[str, int]]) -> str:
    """The mailboxes that dropped frames, as "input 12, preview 3" (the ones with none left out)."""
    return ", ".join(f"{label} {count}" for label, count in slots if count)
