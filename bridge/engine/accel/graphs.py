"""`acceleration: cuda_graph`: the whole frame captured as one CUDA graph per layout.

A frame of the stream batch is about 600 kernel launches; on a fast GPU launching them costs
more than running them (ACCELERATION.md). Captured once, the frame replays as one launch.

What `StreamEngine` guarantees, and capture relies on:
- every tensor the frame reads or writes across frames is a buffer allocated once per layout,
  and live setters write into it in place (guidance and delta are 0-dim device tensors);
- everything that needs the host happens outside the graph: the input's host-to-device copy,
  the similarity score (the skip decision comes first; a skip replays nothing), the CPU-generator
  noise (drawn before replay into static buffers), and the device-to-host copy of the output;
- a layout is fixed by (input kind, step count, guided or not): each is captured at warm-up,
  both sides of guidance 1.0 included, so a guidance fader never stalls the show. A step-count
  change clears the graphs; the next warm-up captures the new count.

`FrameGraphs` holds the captured frames; `CudaGraphBackend` captures with torch.cuda. Where CUDA
is absent `cuda_graph_unavailable` says why, and the config refuses `cuda_graph` with that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

WARMUP_RUNS = 3  # eager runs on a side stream before capture: cuBLAS/cuDNN set-up, lazy inits


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphBackend(Protocol):
    """Captures `body` (after warm-up runs) into something that replays it. `reset_pool` starts
    a new memory pool for the next captures, once every graph of the old one has been dropped."""

    def capture(self, body: Callable[[], None]) -> Graph: ...

    def reset_pool(self) -> None: ...


def cuda_graph_unavailable(device: str | torch.device | None = None) -> str | None:
    """Why `cuda_graph` cannot run here (on `device`, or on this machine); None when it can."""
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return (
            "acceleration 'cuda_graph' needs an NVIDIA GPU and a CUDA build of torch; "
            + (
                f"this torch {torch.__version__} is built for CUDA {built} but sees no GPU"
                if built
                else f"this torch {torch.__version__} is a CPU-only build"
            )
            + ". Use acceleration 'none' (or 'compile') here"
        )
    if device is not None and torch.device(device).type != "cuda":
        return f"acceleration 'cuda_graph' runs on a CUDA device, and the engine is on {device}"
    return None


class CudaGraphBackend:
    """torch.cuda graphs; one memory pool for all of an engine's graphs (they never run at once,
    and every value that outlives a replay lives in the engine's static buffers)."""

    def __init__(self, device: torch.device) -> None:
        reason = cuda_graph_unavailable(device)
        if reason is not None:
            raise RuntimeError(reason)
        self.device = torch.device(device)
        self.pool = torch.cuda.graph_pool_handle()
        # A stream of the engine's own device (cuda:N), not of the thread's current device:
        # torch's default capture stream is made on whichever device is current. The warm-up
        # runs on it too, so that what a stream sets up once (cuBLAS's workspace is made per
        # handle and stream) comes from the ordinary allocator, not from the graphs' pool.
        self._capture = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

    def reset_pool(self) -> None:
        """A pool whose graphs were all destroyed cannot take new captures: torch keeps it while
        any of its blocks is still allocated, and then refuses to share it (an internal assert,
        `use_count > 0`). After a step-count change the graphs are dropped; capture anew."""
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, body: Callable[[], None]) -> Graph:
        with torch.cuda.device(self.device):
            main = torch.cuda.current_stream(self.device)
            self._capture.wait_stream(main)
            try:
                with torch.cuda.stream(self._capture):
                    for _ in range(WARMUP_RUNS):
                        body()
            finally:  # also when a warm-up run raises: the engine restores its buffers on main next
                main.wait_stream(self._capture)
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: the prompt encoder's thread may use the GPU while this one captures.
                with torch.cuda.graph(
                    graph, pool=self.pool, stream=self._capture, capture_error_mode="thread_local"
                ):
                    body()
            except BaseException:
                # torch leaves its capture stream current when ending the capture fails: put
                # the engine's stream back, or every later (eager) frame would run on it.
                torch.cuda.set_stream(main)
                main.synchronize()
                raise
            main.synchronize()
        return _OnDevice(graph, self.device)


class _OnDevice:
    """A captured graph replayed with its own device current (the engine may run on cuda:N)."""

    def __init__(self, graph: Any, device: torch.device) -> None:
        self.graph, self.device = graph, device

    def replay(self) -> None:
        with torch.cuda.device(self.device):
            self.graph.replay()


class FrameGraphs:
    """The captured frames of one engine, by layout key."""

    def __init__(self, backend: GraphBackend) -> None:
        self.backend = backend
        self._graphs: dict[Hashable, Graph] = {}
        self.captures = 0  # how many captures ran (a guidance crossing after warm-up adds none)
        self.replays = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def keys(self) -> list[Hashable]:
        return list(self._graphs)

    def capture(self, key: Hashable, body: Callable[[], None]) -> None:
        log.info("capturing the frame graph for %s", key)
        self._graphs[key] = self.backend.capture(body)
        self.captures += 1

    def replay(self, key: Hashable) -> None:
        self._graphs[key].replay()
        self.replays += 1

    def clear(self) -> None:
        """Drop every graph (a step-count change makes new buffers) and start a new pool for
        the captures to come."""
        self._graphs.clear()
        self.backend.reset_pool()
