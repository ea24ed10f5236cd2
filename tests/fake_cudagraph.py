"""A stand-in for torch.cuda graphs on a machine without CUDA: records the aten calls of one run
of the body and replays exactly those calls, on exactly the tensors they touched.

It behaves as a captured CUDA graph does where that matters to the engine:
- replay re-runs the recorded kernels on the recorded memory. A tensor the engine rebinds after
  capture (a new buffer, a new Python float baked into a kernel, another branch taken) is never
  seen by a replay, just as a real graph keeps the old addresses and constants;
- the body runs eagerly first (CudaGraphBackend warms up on a side stream), then once recorded;
- what cannot be captured raises, as capture does on CUDA: reading a value to the host
  (`.item()`, `.tolist()`, a tensor in an `if`) and random numbers (the engine must draw its
  CPU-generator noise before the replay).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten


class CaptureError(RuntimeError):
    """What CUDA refuses during a capture (cudaErrorStreamCaptureUnsupported and its kind)."""


def _is_random(func: Any, kwargs: dict[str, Any]) -> bool:
    name = func._schema.name.split("::")[-1]
    return kwargs.get("generator") is not None or name.rstrip("_") in {
        "randn",
        "rand",
        "randint",
        "randperm",
        "normal",
        "uniform",
        "bernoulli",
        "multinomial",
        "exponential",
        "random",
    }


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any], Any]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            raise CaptureError("a value was read to the host during capture (.item() or a tensor in an `if`)")
        if _is_random(func, kwargs):
            raise CaptureError(f"random numbers drawn during capture ({func}): draw them before the replay")
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class RecordedGraph:
    def __init__(self, calls: list[tuple[Any, tuple[Any, ...], dict[str, Any], Any]]) -> None:
        self.calls = calls
        self.replays = 0

    def replay(self) -> None:
        for func, args, kwargs, out in self.calls:
            result = func(*args, **kwargs)
            for new, kept in zip(tree_leaves(result), tree_leaves(out), strict=True):
                # A fresh result is written where the capture's result lives (the graph's own
                # memory); an in-place, out= or view result already is there.
                if isinstance(kept, torch.Tensor) and not _same_memory(new, kept):
                    kept.copy_(new)
        self.replays += 1


class PoolMember:
    """What the engine holds of a captured graph. Dropping it is destroying the graph: its pool
    loses a user, as `CUDAGraph`'s destructor releases the pool."""

    def __init__(self, graph: RecordedGraph) -> None:
        self.graph = graph

    def replay(self) -> None:
        self.graph.replay()


class StandInGraphs:
    """The `GraphBackend` of tests: `capture` runs the body once eagerly, then records a run.

    Its memory pools behave as the CUDA caching allocator's private pools: a pool whose graphs
    were all destroyed is not shared again (torch keeps it while any block of it is still
    allocated, a cuBLAS workspace made during a capture say, and then fails its internal assert
    `use_count > 0` in `create_or_incref_pool`), so captures after that need `reset_pool`."""

    def __init__(self) -> None:
        self.graphs: list[RecordedGraph] = []  # every capture, in order, alive or destroyed
        self.pool = 0
        self.live: dict[int, int] = {}  # graphs alive per pool that has had any

    def reset_pool(self) -> None:
        self.pool += 1

    def _release(self, pool: int) -> None:
        self.live[pool] -= 1

    def capture(self, body: Callable[[], None]) -> PoolMember:
        if self.live.get(self.pool) == 0:
            raise RuntimeError(
                "INTERNAL ASSERT FAILED at CUDACachingAllocator.cpp: it->second->use_count > 0 "
                "(a capture into a pool whose graphs were all destroyed)"
            )
        body()
        recorder = _Recorder()
        with recorder:
            body()
        graph = RecordedGraph(recorder.calls)
        self.graphs.append(graph)
        self.live[self.pool] = self.live.get(self.pool, 0) + 1
        member = PoolMember(graph)
        weakref.finalize(member, self._release, self.pool)
        return member
