"""A sink that keeps nothing: for benchmarks and headless runs that only need OSC status."""

from __future__ import annotations

from bridge.frames import Frame


class NullSink:
    """Counts frames and drops them."""

    def __init__(self) -> None:
        self.frames = 0
        self.last_seq = -1

    def write(self, frame: Frame) -> None:
        self.frames += 1
        self.last_seq = frame.seq

    def close(self) -> None:
        pass
