"""How an accelerated engine's frames compare with the eager (`none`) engine's on the same inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PEAK = 255.0  # uint8 frames


@dataclass(frozen=True)
class Agreement:
    """`identical`: every frame equal bit for bit. `psnr_db`: over the RGB channels of all
    frames together (alpha is 255 in both); math.inf when identical."""

    identical: bool
    psnr_db: float
    frames: int


def psnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio of `other` against `reference`, uint8 arrays of one shape, in dB
    (math.inf when they are equal)."""
    if reference.shape != other.shape:
        raise ValueError(f"frames to compare must have one shape, got {reference.shape} and {other.shape}")
    diff = reference.astype(np.float64) - other.astype(np.float64)
    mse = float(np.mean(diff * diff))
    return math.inf if mse == 0.0 else 10.0 * math.log10(PEAK * PEAK / mse)


def agreement(reference: Sequence[np.ndarray], frames: Sequence[np.ndarray]) -> Agreement:
    """Compare two engines' outputs, frame k with frame k: (H, W, 4) uint8 each, alpha ignored."""
    if len(reference) != len(frames) or not reference:
        raise ValueError(
            f"need the same non-zero number of frames from both engines, got {len(reference)} and {len(frames)}"
        )
    ref = np.stack([np.asarray(f)[..., :3] for f in reference])
    got = np.stack([np.asarray(f)[..., :3] for f in frames])
    return Agreement(identical=bool(np.array_equal(ref, got)), psnr_db=psnr_db(ref, got), frames=len(frames))
