"""A deterministic moving test pattern: the source that runs anywhere, with no camera or file."""

from __future__ import annotations

import time

import numpy as np

from bridge.frames import Frame


def test_pattern(seq: int, width: int, height: int) -> np.ndarray:
    """Frame `seq` of the pattern, (height, width, 4) uint8 RGBA.

    Colour gradients drift, a disc orbits the centre and a bar sweeps down, so motion, colour
    and edges all change from frame to frame; the same `seq` always gives the same pixels.
    """
    t = seq / 30.0  # seconds at 30 fps
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / max(width - 1, 1), yy / max(height - 1, 1)
    rgb = np.empty((height, width, 3), np.float32)
    rgb[..., 0] = 0.5 + 0.5 * np.sin(2 * np.pi * (u + 0.1 * t))
    rgb[..., 1] = 0.5 + 0.5 * np.cos(2 * np.pi * (v - 0.07 * t))
    rgb[..., 2] = 0.5 + 0.5 * np.sin(2 * np.pi * (u + v) * 0.5 + t)
    cx, cy = 0.5 + 0.25 * np.cos(t), 0.5 + 0.25 * np.sin(t)
    disc = (u - cx) ** 2 + (v - cy) ** 2 < 0.02
    rgb[disc] = (1.0, 1.0, 1.0)
    bar = np.abs(v - (t * 0.2) % 1.0) < 0.02
    rgb[bar] = (0.0, 0.0, 0.0)
    out = np.empty((height, width, 4), np.uint8)
    out[..., :3] = (rgb * 255.0 + 0.5).astype(np.uint8)
    out[..., 3] = 255
    return out


class Pacer:
    """Wall-clock pacing at `fps` (0 = unpaced): `wait(timeout_s)` sleeps until the next tick,
    or returns False when that tick is further away than the timeout. Ticks that were missed
    are skipped, not bunched up."""

    def __init__(self, fps: float) -> None:
        self.period_s = 1.0 / fps if fps > 0 else 0.0
        self._next = time.perf_counter()

    def wait(self, timeout_s: float) -> bool:
        if self.period_s == 0.0:
            return True
        now = time.perf_counter()
        delay = self._next - now
        if delay > timeout_s:
            time.sleep(max(timeout_s, 0.0))
            return False
        if delay > 0:
            time.sleep(delay)
        self._next = max(self._next + self.period_s, now)
        return True


class SyntheticSource:
    """The moving test pattern at `fps`, `width`x`height`."""

    def __init__(self, *, width: int, height: int, fps: float = 30.0) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"synthetic source size must be positive, got {width}x{height}")
        self.width, self.height = width, height
        self._pacer = Pacer(fps)
        self._seq = 0

    def read(self, timeout_s: float) -> Frame | None:
        if not self._pacer.wait(timeout_s):
            return None
        frame = Frame(test_pattern(self._seq, self.width, self.height), self._seq)
        self._seq += 1
        return frame

    def close(self) -> None:
        pass
