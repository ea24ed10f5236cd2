"""What the engine loop records about each output frame, and the figures status shows from it."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


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


def measure(outs: Sequence[OutputInfo], now: float) -> dict[str, Any]:
    """fps, latency_ms, engine_ms and skip_rate over the recent outputs `outs` (oldest first)."""
    recent = [o for o in outs if now - o.t_emit <= 1.0]
    fps = 0.0
    if len(recent) >= 2:
        fps = (len(recent) - 1) / max(recent[-1].t_emit - recent[0].t_emit, 1e-6)
    fresh = [o for o in outs if o.kind in ("engine", "skipped", "bypass")]
    latency = statistics.median(1000 * (o.t_emit - o.t_capture) for o in fresh) if fresh else 0.0
    ran = [o.engine_ms for o in fresh if o.kind == "engine"]
    processed = [o for o in fresh if o.kind in ("engine", "skipped")]
    skip_rate = sum(o.kind == "skipped" for o in processed) / len(processed) if processed else 0.0
    return {
        "fps": round(fps, 2),
        "latency_ms": round(latency, 2),
        "engine_ms": round(statistics.median(ran), 2) if ran else 0.0,
        "skip_rate": round(skip_rate, 3),
    }
