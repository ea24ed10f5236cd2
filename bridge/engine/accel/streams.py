"""The CUDA stream a TensorRT engine is enqueued on: torch's current stream, unless that is the
legacy default stream.

TensorRT documents that enqueueing on the default stream "may lead to performance issues due to
additional cudaDeviceSynchronize() calls by TensorRT to ensure correct synchronizations. Please
use non-default stream instead" (NvInferRuntime.h enqueueV3; pyCoreDoc.h execute_async_v3), and
logs "Using default stream in enqueueV3() ..." when it is given one. Outside a captured graph,
torch's current stream usually is that stream (handle 0). The two other handles CUDA reserves,
`cudaStreamLegacy` (1, the same stream by another name) and `cudaStreamPerThread` (2, which a
build with per-thread default streams hands out), are treated alike: a fork costs two event
records, a default stream handed to TensorRT costs device syncs. So `enqueue` forks: a private
stream of the engine's device waits for torch's stream (an event), takes the call, and torch's
stream waits for it afterwards (another event). Work around the call keeps its order, and no
host sync is added. Any other stream (the capture stream while a frame graph is captured, a user's stream)
takes the call directly, as a captured graph must hold it.

torch's CUDA calls stay behind `Streams`, so the runner is tested without CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import torch

DEFAULT_STREAM = 0  # the handle torch reports for the legacy default (null) stream
DEFAULT_STREAMS = frozenset({DEFAULT_STREAM, 1, 2})
"""The null stream, cudaStreamLegacy and cudaStreamPerThread (CUDA's driver_types.h)."""

T = TypeVar("T")


class Streams(Protocol):
    """The streams of one device a runner enqueues on. Called from the engine's thread only;
    nothing to close (the private stream lives as long as this object)."""

    def current(self) -> int:
        """The handle of torch's current stream."""
        ...

    def fork(self) -> int:
        """Make the private stream (made at the first call, then the same one) wait for the work
        enqueued so far on the current stream; return the private stream's handle."""
        ...

    def join(self) -> None:
        """Make the current stream wait for the work enqueued so far on the private stream."""
        ...


def enqueue(streams: Streams, call: Callable[[int], T]) -> T:
    """`call(handle)` on torch's current stream, or, where that is a default stream, on the
    private stream between a fork and a join (the join also when `call` raises)."""
    current = streams.current()
    if current not in DEFAULT_STREAMS:
        return call(current)
    private = streams.fork()
    try:
        return call(private)
    finally:
        streams.join()


class TorchStreams:
    """`Streams` from torch on `device` (None: the thread's current device). The fork and the
    join are an event recorded on one stream and waited for by the other: no host sync. The
    stream and its two events are made at the first fork, so making a backend needs no CUDA."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self._private: tuple[torch.cuda.Stream, torch.cuda.Event, torch.cuda.Event] | None = None

    def current(self) -> int:
        return int(torch.cuda.current_stream(self.device).cuda_stream)

    def fork(self) -> int:
        current = torch.cuda.current_stream(self.device)
        if self._private is None:
            stream = torch.cuda.Stream(current.device)  # type: ignore[no-untyped-call]
            forked = torch.cuda.Event()  # type: ignore[no-untyped-call]
            joined = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._private = (stream, forked, joined)
        private, forked, _ = self._private
        forked.record(current)
        private.wait_event(forked)
        return int(private.cuda_stream)

    def join(self) -> None:
        if self._private is None:
            raise RuntimeError("TorchStreams.join() before fork(): there is no private stream to wait for")
        private, _, joined = self._private
        joined.record(private)
        torch.cuda.current_stream(self.device).wait_event(joined)
