"""The Source/Sink seam. Every medium implements one or both; the runtime drives them."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge.frames import Frame


class Source(Protocol):
    """Produces frames. Lifecycle: built by `open_source`; `read` is called from one capture
    thread only; `close` is called exactly once by the runtime, after that thread has stopped,
    and nothing is called after it."""

    def read(self, timeout_s: float) -> Frame | None:
        """The next frame, or None when none arrived within `timeout_s` seconds (the runtime then
        holds its last output). Raising means the source failed; the runtime logs it, reports it
        and keeps calling `read`, so a source that can recover (a camera replugged) should."""
        ...

    def close(self) -> None: ...


class Sink(Protocol):
    """Consumes frames. Lifecycle: built by `open_sink`; `write` is called from the sink's own
    thread only (so a slow sink stalls nothing else); `close` is called exactly once by the
    runtime, after that thread has stopped, in reverse open order."""

    def write(self, frame: Frame) -> None:
        """Deliver one RGBA frame. May block; raising counts as a failed write and is retried
        with the next frame."""
        ...

    def close(self) -> None: ...


def poll_for_frame(poll: Callable[[], Frame | None], timeout_s: float, poll_s: float) -> Frame | None:
    """Call `poll` every `poll_s` seconds until it gives a frame or `timeout_s` has passed:
    `Source.read` for media that can only be asked "anything new?"."""
    deadline = time.perf_counter() + timeout_s
    while True:
        frame = poll()
        if frame is not None or time.perf_counter() >= deadline:
            return frame
        time.sleep(poll_s)


def _no_status() -> Mapping[str, Any]:
    return {}


def _no_submit(name: str, args: Sequence[str]) -> str:
    return "this bridge takes no parameter changes here"


@dataclass(frozen=True)
class SinkContext:
    """What the bridge tells a sink when it opens: the output's size and rate (a virtual camera
    opens at that size, NDI frames carry that rate), and, for a sink that is also a control
    surface (the preview page), plain callables so transports depend on nothing above them."""

    width: int = 512  # the engine's output size
    height: int = 512
    fps: float = 0.0  # the bridge's output rate; 0 = unpaced (as fast as the engine runs)
    status: Callable[[], Mapping[str, Any]] = _no_status  # status and parameter values, JSON-able
    submit: Callable[[str, Sequence[str]], str] = _no_submit  # name, raw args -> "" or the reason
    params: Sequence[Mapping[str, Any]] = field(default_factory=tuple)  # rows of bridge.params.table()


class MissingExtra(ImportError):
    """An optional library is not installed; the message names the pip command and alternatives."""


class TransportUnavailable(RuntimeError):
    """The medium cannot work on this machine as configured (another OS, no driver). Like
    `MissingExtra`, it is final: the runtime does not retry it, and `sdbridge doctor` reports it."""


# What frames can travel over on each OS, for error messages that name a way forward.
_MEDIA_BY_OS = {
    "win32": ("spout", "ndi", "virtualcam", "shm"),
    "darwin": ("syphon", "ndi", "virtualcam", "shm"),
    "linux": ("ndi", "virtualcam (v4l2loopback)", "shm"),
}


def current_platform() -> str:
    """`sys.platform`, behind a function so tests can stand in for another OS."""
    return sys.platform


def os_label(platform: str | None = None) -> str:
    platform = platform or current_platform()
    return {"win32": "Windows", "darwin": "macOS", "linux": "Linux"}.get(platform, platform)


def alternatives(platform: str | None = None, *, besides: str = "") -> str:
    """The media that work on `platform` (default: this machine), other than `besides`, as a
    phrase: "ndi, virtualcam (v4l2loopback) or shm"."""
    media = [
        m for m in _MEDIA_BY_OS.get(platform or current_platform(), ("ndi", "shm")) if m.split()[0] != besides
    ]
    return media[0] if len(media) == 1 else f"{', '.join(media[:-1])} or {media[-1]}"


def only_on(what: str, platform: str, extra: str) -> TransportUnavailable:
    """`what` exists only on `platform` ("win32", "darwin"); raised on any other OS."""
    return TransportUnavailable(
        f"{what} works only on {os_label(platform)} (this machine runs {os_label()}). "
        f'Use {alternatives()} here; on {os_label(platform)}: pip install "streamdiffusion-bridge[{extra}]"'
    )


def missing_extra(what: str, extra: str, module: str, alternatives: str) -> MissingExtra:
    return MissingExtra(
        f"{what} needs the {module!r} module, which is not installed. Install it with: "
        f'pip install "streamdiffusion-bridge[{extra}]". Alternatives here: {alternatives}'
    )


def import_vendor(module: str, *, what: str, extra: str, platform: str | None = None) -> Any:
    """Import an optional vendor module, or raise the error that says how to get it: on the
    wrong OS `TransportUnavailable`, otherwise `MissingExtra` naming the pip command."""
    if platform is not None and current_platform() != platform:
        raise only_on(what, platform, extra)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name != module and not module.startswith(exc.name + "."):
            raise  # the vendor module is there but one of its own dependencies is broken
        raise missing_extra(what, extra, module, alternatives(besides=extra)) from None
