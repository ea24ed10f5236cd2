"""Virtual camera sink over pyvirtualcam: the OBS Virtual Camera on Windows and macOS (also
Unity Capture on Windows) and v4l2loopback on Linux, for OBS, Zoom, browsers and anything else
that takes a webcam.

pyvirtualcam is GPL-2.0, so it is an optional extra (`virtualcam`) imported only here, only
when this sink is opened. Its backends take RGB or BGR (the OBS backend rejects RGBA); the
camera's size is fixed when it opens, so frames of another size are fitted to it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bridge.frames import Frame, PixelFormat, fit, to_format
from bridge.transports import base
from bridge.transports.base import TransportUnavailable, import_vendor, os_label

log = logging.getLogger(__name__)

DEFAULT_FPS = 30.0

INSTALL_HINTS = {
    "win32": "install OBS Studio 26 or newer (its Virtual Camera is the device; start and stop it once "
    "in OBS), or Unity Capture for a camera OBS itself can capture",
    "darwin": "install OBS Studio 26.1 or newer, click Start Virtual Camera once in OBS (macOS then "
    "registers the camera extension), then Stop it so the bridge can use it",
    "linux": "install and load v4l2loopback: sudo apt install v4l2loopback-dkms && sudo modprobe "
    'v4l2loopback devices=1 exclusive_caps=1 card_label="sdbridge"; then set output.device=/dev/videoN '
    "if there are several",
}


# The backends pyvirtualcam registers on each OS (pyvirtualcam/camera.py:107-121); a name not
# registered here makes `Camera` raise KeyError before it tries anything.
BACKENDS = {"win32": ("obs", "unitycapture"), "darwin": ("obs",), "linux": ("v4l2loopback",)}


def install_hint(platform: str | None = None) -> str:
    return INSTALL_HINTS.get(
        platform or base.current_platform(), "pyvirtualcam supports Windows, macOS and Linux"
    )


def driver_problem(platform: str | None = None) -> str:
    """ "" when a virtual camera driver looks present, else why not and how to install one.
    Only Linux can tell without opening the camera (the v4l2loopback kernel module); on Windows
    and macOS the driver is checked when the camera opens."""
    if (platform or base.current_platform()) != "linux":
        return ""
    if Path("/sys/module/v4l2loopback").exists():
        return ""
    return f"the v4l2loopback kernel module is not loaded. To get a virtual camera: {install_hint('linux')}"


def backend_problem(backend: str, platform: str | None = None) -> str:
    """ "" when output.backend `backend` exists on `platform` (default: this machine), else why
    not, what does, and how to install a driver. Checked when the config loads."""
    platform = platform or base.current_platform()
    valid = BACKENDS.get(platform, ())
    if not backend or backend in valid:
        return ""
    shown = backend if len(backend) <= 40 else backend[:40] + "..."
    others = ", ".join(
        f"{name} ({os_label(os)})" for os, names in BACKENDS.items() if os != platform for name in names
    )
    return (
        f"{shown!r} is not a virtual camera backend on {os_label(platform)}: use "
        f'{" or ".join(valid) or "none (pyvirtualcam has no backend here)"}, or "" for any that works '
        f"(elsewhere: {others}). To get a virtual camera: {install_hint(platform)}"
    )


def pyvirtualcam() -> Any:
    return import_vendor("pyvirtualcam", what="The virtual camera", extra="virtualcam")


class VirtualCamSink:
    """Sends frames to a virtual camera of `width`x`height` at `fps`, pacing to that rate:
    each write waits for the camera's next frame slot, and frames that arrive meanwhile are
    dropped by the runtime's latest-wins hand-over."""

    def __init__(
        self,
        *,
        width: int,
        height: int,
        fps: float = DEFAULT_FPS,
        device: str = "",
        backend: str = "",
        fmt: str = "rgb",
    ) -> None:
        pvc = pyvirtualcam()
        self.format = PixelFormat.parse(fmt)
        if self.format not in (PixelFormat.RGB, PixelFormat.BGR):
            raise ValueError(
                f"output.format for virtualcam must be rgb or bgr, got {self.format.value!r} "
                "(virtual cameras take no alpha; the OBS backend rejects RGBA)"
            )
        if width <= 0 or height <= 0:
            raise ValueError(f"the virtual camera needs a positive size, got {width}x{height}")
        self.fps = fps or DEFAULT_FPS
        problem = backend_problem(backend)
        if problem:  # pyvirtualcam would raise KeyError, which no retry can cure
            raise TransportUnavailable(f"output.backend {problem}")
        vendor_fmt = pvc.PixelFormat.RGB if self.format is PixelFormat.RGB else pvc.PixelFormat.BGR
        try:
            self._cam: Any = pvc.Camera(
                width,
                height,
                self.fps,
                fmt=vendor_fmt,
                device=device or None,
                backend=backend or None,
                print_fps=False,
            )
        except KeyError as exc:  # a backend this pyvirtualcam does not register: final
            raise TransportUnavailable(
                f"output.backend {backend!r}: pyvirtualcam has no such backend here ({exc!r}). "
                f"To get a virtual camera: {install_hint()}"
            ) from None
        except RuntimeError as exc:
            where = f" {device!r}" if device else ""
            raise TransportUnavailable(
                f"no virtual camera{where} could be opened ({exc}). To get one: {install_hint()}"
            ) from None
        self.size = (width, height)
        log.info(
            "virtual camera %s (%s backend) at %dx%d, %.4g fps",
            self._cam.device,
            self._cam.backend,
            width,
            height,
            self.fps,
        )

    @property
    def device(self) -> str:
        return str(self._cam.device)

    def write(self, frame: Frame) -> None:
        if self._cam is None:
            raise RuntimeError("the virtual camera is closed")
        pixels = frame.pixels
        width, height = self.size
        if pixels.shape[:2] != (height, width):
            pixels = fit(pixels, width, height)
        self._cam.send(to_format(pixels, self.format))
        self._cam.sleep_until_next_frame()

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            cam.close()
