"""How one benchmark call is timed: the wall clock always, the device's own clock on CUDA.

A timed call, in this order: both events are recorded once (torch makes a CUDA event at its
first record: that cost stays outside the window); the wall clock starts; a start event is recorded on the current
stream; the call runs; an end event is recorded on the same stream; the host waits for the
device (`torch.cuda.synchronize()`, after which both events have completed); the wall clock
stops; only then is `start.elapsed_time(end)` read, in milliseconds. torch refuses
`elapsed_time` before both events have completed ("Both events must be completed before
calculating elapsed time.", c10/cuda/CUDAEvent.h), and its own example synchronises first:
https://pytorch.org/docs/stable/generated/torch.cuda.Event.html and the "Asynchronous
execution" section of https://pytorch.org/docs/stable/notes/cuda.html.

The events come from an `EventClock`, the seam a test replaces with a stand-in that keeps the
same rules; on CUDA it is `CudaEvents`, and the code around it is the same. Without CUDA there
is no clock and no device time: the figure is None, never a stand-in number.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class DeviceEvent(Protocol):
    """What the timing uses of a `torch.cuda.Event(enable_timing=True)`."""

    def record(self, stream: Any = None) -> None:
        """Mark the stream (the current one when None) at this point of its queued work."""

    def elapsed_time(self, end_event: Any) -> float:
        """Milliseconds on the device from this event to `end_event`; both must have completed."""


class EventClock(Protocol):
    """Where a timed call's two events come from, and how the host waits for them.

    `event()` returns a fresh timing event for each mark; `synchronize()` waits for all the
    device's queued work, so that every event recorded before it has completed. Both are called
    from the benchmark's one thread, a pair of events and one `synchronize()` per timed call."""

    def event(self) -> DeviceEvent: ...

    def synchronize(self) -> None: ...


class CudaEvents:
    """The CUDA clock: `torch.cuda.Event(enable_timing=True)` marks, `torch.cuda.synchronize()`."""

    def event(self) -> DeviceEvent:
        return torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]

    def synchronize(self) -> None:
        torch.cuda.synchronize()


def event_clock(device: str) -> EventClock | None:
    """The device's event clock: CUDA events on a CUDA device, none elsewhere."""
    return CudaEvents() if device.startswith("cuda") else None


def device_timing(device: str, clock: EventClock | None) -> str:
    """What the report's `*_device_ms` figures are on `device`, or why they are null."""
    if clock is None:
        return (
            f"not taken: device {device!r} has no CUDA events, so every *_device_ms figure is null "
            "(the wall-clock *_ms figures are the measurement)"
        )
    return (
        "*_device_ms: per timed call, a torch.cuda.Event(enable_timing=True) pair recorded on the "
        "current stream (start just before the call, end just after it), read with elapsed_time "
        "after torch.cuda.synchronize(); the median of the repeats. It is the device's time from "
        "the first mark to the second, idle gaps included: host work before the first launch or "
        "after the last (PIL, numpy, Python) and the wait for the host are outside it, gaps while "
        "the host launches kernels inside it"
    )


@dataclass(frozen=True)
class Timed:
    """One timed call: wall seconds, device milliseconds (None without a clock), its output."""

    seconds: float
    device_ms: float | None
    output: Any


def time_call(call: Callable[[Any], Any], arg: Any, *, clock: EventClock | None) -> Timed:
    """Time `call(arg)` as the module docstring says. Without a clock (no CUDA) the call is done
    when it returns: the wall clock alone, and no device time."""
    if clock is None:
        start = time.perf_counter()
        out = call(arg)
        return Timed(time.perf_counter() - start, None, out)
    begin, end = clock.event(), clock.event()
    for event in (begin, end):
        event.record()  # torch makes the CUDA event at its first record: not inside the timed window
    start = time.perf_counter()
    begin.record()
    out = call(arg)
    end.record()
    clock.synchronize()  # the device is done, and both events have completed: elapsed_time may be read
    seconds = time.perf_counter() - start
    return Timed(seconds, begin.elapsed_time(end), out)
