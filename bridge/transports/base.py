"""The Source/Sink seam. Every medium implements one or both; the runtime drives them."""

from __future__ import annotations

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


def _no_status() -> Mapping[str, Any]:
    return {}


def _no_submit(name: str, args: Sequence[str]) -> str:
    return "this bridge takes no parameter changes here"


@dataclass(frozen=True)
class SinkContext:
    """What a sink that is also a control surface (the preview page) may see and do, as plain
    callables so transports depend on nothing above them."""

    status: Callable[[], Mapping[str, Any]] = _no_status  # status and parameter values, JSON-able
    submit: Callable[[str, Sequence[str]], str] = _no_submit  # name, raw args -> "" or the reason
    params: Sequence[Mapping[str, Any]] = field(default_factory=tuple)  # rows of bridge.params.table()


class MissingExtra(ImportError):
    """An optional library is not installed; the message names the pip command and alternatives."""


def missing_extra(what: str, extra: str, module: str, alternatives: str) -> MissingExtra:
    return MissingExtra(
        f"{what} needs the {module!r} module, which is not installed. Install it with: "
        f'pip install "streamdiffusion-bridge[{extra}]". Alternatives here: {alternatives}'
    )
