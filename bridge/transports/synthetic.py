"""A deterministic moving test pattern: the source that runs anywhere, with no camera or file."""

from __future__ import annotations

import numpy as np


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
