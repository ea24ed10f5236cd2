"""Inputs from files and cameras: a still image (Pillow), a looped video file and a camera
(OpenCV headless, the `video` extra). OBS's Virtual Camera is a camera input too."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bridge.frames import Frame, PixelFormat, from_format
from bridge.transports.base import missing_extra
from bridge.transports.synthetic import Pacer

log = logging.getLogger(__name__)


def cv2_module(what: str) -> Any:
    """OpenCV, or the error that names the `video` extra."""
    try:
        import cv2
    except ImportError:
        raise missing_extra(
            what, "video", "cv2 (opencv-python-headless)", "input.kind=image for a still, synthetic, or shm"
        ) from None
    return cv2


def _existing(path: str, what: str) -> Path:
    if not path:
        raise ValueError(f"{what} needs a file: set input.path")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(p)!r} (input.path)")
    return p


class ImageSource:
    """One still image, delivered as a new frame `fps` times a second."""

    def __init__(self, *, path: str, fps: float = 30.0) -> None:
        from PIL import Image, UnidentifiedImageError

        p = _existing(path, "the image input")
        try:
            with Image.open(p) as img:
                self.pixels = np.asarray(img.convert("RGBA")).copy()
        except UnidentifiedImageError:
            raise ValueError(f"the image input {str(p)!r} is not an image Pillow can read") from None
        self._pacer = Pacer(fps)
        self._seq = 0

    def read(self, timeout_s: float) -> Frame | None:
        if not self._pacer.wait(timeout_s):
            return None
        self._seq += 1
        return Frame(self.pixels, self._seq)

    def close(self) -> None:
        pass


class VideoSource:
    """A video file decoded with OpenCV at its own frame rate (or `fps`), looped at the end."""

    def __init__(self, *, path: str, fps: float = 0.0, loop: bool = True) -> None:
        cv2 = cv2_module("the video input")
        self.path = _existing(path, "the video input")
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            raise ValueError(f"OpenCV cannot decode {str(self.path)!r}; try an H.264 .mp4")
        native = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps or (native if 0 < native < 1000 else 30.0)
        self.loop = loop
        self._pacer = Pacer(self.fps)
        self._seq = 0
        self._rewind = cv2.CAP_PROP_POS_FRAMES

    def read(self, timeout_s: float) -> Frame | None:
        if not self._pacer.wait(timeout_s):
            return None
        ok, bgr = self._cap.read()
        if not ok and self.loop:
            self._cap.set(self._rewind, 0)
            ok, bgr = self._cap.read()
        if not ok:
            return None  # the end, without loop: the bridge holds its last output
        self._seq += 1
        return Frame(from_format(bgr, PixelFormat.BGR), self._seq)

    def close(self) -> None:
        self._cap.release()


def _camera_hint() -> str:
    if sys.platform == "win32":
        return "check Settings > Privacy > Camera, and that OBS's Virtual Camera is started if you use it"
    if sys.platform == "darwin":
        return "allow camera access for this terminal in System Settings > Privacy & Security > Camera"
    return "list devices with `ls /dev/video*`; your user needs to be in the `video` group"


class CameraSource:
    """An OpenCV capture device by index. If it stops delivering (unplugged), `read` returns
    None, and the device is reopened about once a second until it comes back."""

    def __init__(self, *, device: int = 0, reopen_s: float = 1.0) -> None:
        self._cv2 = cv2_module("the camera input")
        self.device = device
        self.reopen_s = reopen_s
        self._cap = self._cv2.VideoCapture(device)
        if not self._cap.isOpened():
            self._cap.release()
            raise OSError(f"camera {device} (input.device) could not be opened: {_camera_hint()}")
        self._seq = 0
        self._failed_at = 0.0

    def read(self, timeout_s: float) -> Frame | None:
        if self._cap is None:
            if time.perf_counter() - self._failed_at < self.reopen_s:
                time.sleep(min(timeout_s, self.reopen_s))
                return None
            self._cap = self._cv2.VideoCapture(self.device)
            if not self._cap.isOpened():
                self._cap.release()
                self._cap, self._failed_at = None, time.perf_counter()
                return None
            log.warning("camera %s is back", self.device)
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            log.warning("camera %s stopped delivering; reopening it every %.0f s", self.device, self.reopen_s)
            self._cap.release()
            self._cap, self._failed_at = None, time.perf_counter()
            return None
        self._seq += 1
        return Frame(from_format(bgr, PixelFormat.BGR), self._seq)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
