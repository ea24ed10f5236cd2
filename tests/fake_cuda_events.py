"""A stand-in for `torch.cuda.Event(enable_timing=True)` and `torch.cuda.synchronize()` on a
machine without CUDA, as strict as the real ones where the benchmark's timing depends on them.

The device is a queue with its own clock in milliseconds: a test "runs" device work by calling
`FakeDevice.work(ms)` from inside the timed call. As on CUDA:
- `record(stream=None)` marks the (current) stream at this point of its queued work: the event
  takes the device's clock after everything queued before it ("Record the event in a given
  stream. Uses torch.cuda.current_stream() if no stream is specified.",
  https://pytorch.org/docs/stable/generated/torch.cuda.Event.html);
- an event has completed only once the device has reached it: here, after
  `FakeDevice.synchronize()` (torch.cuda.synchronize) or the event's own `synchronize()`;
  `query()` is True for an event never recorded, as torch's is;
- `start.elapsed_time(end)` is "the time elapsed ... after the event was recorded and before
  the end_event was recorded" (the doc above), in ms, negative when `end` was recorded first,
  and refused unless both were made with enable_timing=True, both recorded and both completed,
  with torch's own messages and exception types (c10/cuda/CUDAEvent.h, `elapsed_time`:
  TORCH_CHECK_VALUE raises ValueError, TORCH_CHECK RuntimeError; torch 2.13).
"""

from __future__ import annotations

from typing import Any


class FakeDevice:
    """The device: its clock, and the events recorded on it that have not completed yet."""

    def __init__(self) -> None:
        self.now_ms = 0.0
        self.pending: list[FakeEvent] = []
        self.synchronizes = 0

    def work(self, ms: float) -> None:
        """Queue `ms` of device work (it runs at once on the device's clock)."""
        self.now_ms += ms

    def event(self) -> FakeEvent:
        """What `CudaEvents.event()` returns on CUDA: a timing event."""
        return FakeEvent(self, enable_timing=True)

    def synchronize(self) -> None:
        """torch.cuda.synchronize(): every event recorded so far has completed."""
        self.synchronizes += 1
        for event in self.pending:
            event.completed = True
        self.pending.clear()


class FakeEvent:
    def __init__(self, device: FakeDevice, *, enable_timing: bool = False) -> None:
        self.device = device
        self.enable_timing = enable_timing
        self.recorded = False
        self.completed = False
        self.stamp_ms = 0.0

    def record(self, stream: Any = None) -> None:
        self.recorded, self.completed = True, False
        self.stamp_ms = self.device.now_ms
        self.device.pending.append(self)

    def query(self) -> bool:
        return not self.recorded or self.completed

    def synchronize(self) -> None:
        if self.recorded:
            self.completed = True

    def elapsed_time(self, end_event: FakeEvent) -> float:
        if not (self.enable_timing and end_event.enable_timing):
            raise ValueError("Both events must be created with argument 'enable_timing=True'.")
        if not (self.recorded and end_event.recorded):
            raise ValueError("Both events must be recorded before calculating elapsed time.")
        if not (self.query() and end_event.query()):
            raise RuntimeError("Both events must be completed before calculating elapsed time.")
        return end_event.stamp_ms - self.stamp_ms
