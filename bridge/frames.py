"""The frame that crosses threads, and the pixel conversions every transport needs (numpy only)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np


class PixelFormat(enum.Enum):
    """8-bit pixel layouts the transports move. Inside the bridge frames are RGBA or RGB."""

    RGBA = "rgba"
    BGRA = "bgra"
    RGB = "rgb"
    BGR = "bgr"

    @property
    def channels(self) -> int:
        return 4 if self in (PixelFormat.RGBA, PixelFormat.BGRA) else 3

    @classmethod
    def parse(cls, value: str | PixelFormat) -> PixelFormat:
        if isinstance(value, PixelFormat):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            valid = ", ".join(f.value for f in cls)
            raise ValueError(f"pixel format must be one of {valid}, got {value!r}") from None


@dataclass(frozen=True)
class Frame:
    """One picture: `pixels` is (H, W, 3|4) uint8 RGB(A); `seq` counts frames of its source;
    `t_capture` is `time.perf_counter()` when the source produced it (seconds)."""

    pixels: np.ndarray
    seq: int
    t_capture: float = field(default_factory=time.perf_counter)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def check_pixels(pixels: np.ndarray) -> np.ndarray:
    """Validate an (H, W, 3|4) uint8 array; raise a ValueError naming what is wrong."""
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"pixels must be (H, W, 3|4) uint8, got {pixels.shape} {pixels.dtype}")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"pixels must be at least 1x1, got {pixels.shape}")
    return pixels


def to_format(pixels: np.ndarray, fmt: PixelFormat, *, flip: bool = False) -> np.ndarray:
    """Convert RGB(A) `pixels` to `fmt` (alpha 255 where added), optionally flipped top-bottom
    (OpenGL textures count rows from the bottom). Returns a C-contiguous array."""
    check_pixels(pixels)
    src = pixels[::-1] if flip else pixels
    if fmt in (PixelFormat.RGB, PixelFormat.BGR):
        rgb = src[..., :3]
        out = rgb[..., ::-1] if fmt is PixelFormat.BGR else rgb
        return np.ascontiguousarray(out)
    if src.shape[2] == 4:
        out = src[..., [2, 1, 0, 3]] if fmt is PixelFormat.BGRA else src
        return np.ascontiguousarray(out)
    out = np.empty((*src.shape[:2], 4), np.uint8)
    out[..., :3] = src[..., ::-1] if fmt is PixelFormat.BGRA else src
    out[..., 3] = 255
    return out


def from_format(pixels: np.ndarray, fmt: PixelFormat, *, flip: bool = False) -> np.ndarray:
    """Convert `pixels` in `fmt` to RGBA (the bridge's inside layout)."""
    check_pixels(pixels)
    if pixels.shape[2] != fmt.channels:
        raise ValueError(f"{fmt.value} pixels need {fmt.channels} channels, got shape {pixels.shape}")
    src = pixels[::-1] if flip else pixels
    if fmt is PixelFormat.RGBA:
        return np.ascontiguousarray(src)
    if fmt is PixelFormat.BGRA:
        return np.ascontiguousarray(src[..., [2, 1, 0, 3]])
    out = np.empty((*src.shape[:2], 4), np.uint8)
    out[..., :3] = src[..., ::-1] if fmt is PixelFormat.BGR else src
    out[..., 3] = 255
    return out


def fit(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale and centre-crop RGB(A) `pixels` to exactly (height, width), keeping the aspect ratio
    (cover, as a VJ expects: no letterbox bars fed to the model). Nearest-neighbour: it is cheap
    and the model's VAE blurs away the difference at these sizes."""
    check_pixels(pixels)
    h, w = pixels.shape[:2]
    if (w, h) == (width, height):
        return pixels
    scale = max(width / w, height / h)
    # source coordinates of the output pixel centres, cropped symmetrically
    xs = ((np.arange(width) + 0.5 - width / 2) / scale + w / 2).astype(np.int64).clip(0, w - 1)
    ys = ((np.arange(height) + 0.5 - height / 2) / scale + h / 2).astype(np.int64).clip(0, h - 1)
    return np.ascontiguousarray(pixels[ys[:, None], xs[None, :]])
