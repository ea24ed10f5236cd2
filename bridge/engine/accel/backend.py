"""The seam every engine backend implements, and what all of them share.

A `Backend` builds a serialized engine from an ONNX file (`build`) and loads one (`load`) into a
`Runner`, which is bound once per layout to static tensors (`bind`) and then run once per frame
(`run`). `TensorRTBackend` (accel/tensorrt.py) is the real one; `OnnxRuntimeBackend`
(accel/onnxruntime_backend.py) runs the same path on the CPU. `prepare_engines`
(accel/prepare.py) ties export, cache, build, load and validation together.

Builds report through `BuildProgress` (bars and log lines; a set `cancel` refuses the next step)
and fail with the errors below; `is_transient` says which failures the next start retries.
"""

from __future__ import annotations

import errno
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from bridge.engine.accel.engine_cache import BuilderSettings
from bridge.engine.accel.onnx_export import ExportSpec

log = logging.getLogger(__name__)

TENSOR_ALIGNMENT = 256  # bytes: setTensorAddress refuses a less aligned pointer (NvInferRuntime.h)


class BuildFailed(RuntimeError):
    """The engine could not be built (recorded in the negative cache). `transient` says whether
    it is worth a retry when the raiser knows (see `is_transient`); None: judge by the message."""

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        self.transient = transient


class BuildCancelled(RuntimeError):
    """A stop request ended the build; nothing is recorded, the next start builds again."""


class LoadFailed(RuntimeError):
    """A serialized engine could not be loaded or bound."""


class ValidationFailed(RuntimeError):
    """The engine's output differs from torch's on fixed inputs."""


def is_transient(exc: BaseException) -> bool:
    """Failures worth a retry at the next start: out of memory (host or GPU), a full disk, a
    build process killed by SIGKILL (the out-of-memory killer). An exception may say so itself
    with a `transient` attribute."""
    flag = getattr(exc, "transient", None)
    if flag is not None:
        return bool(flag)
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    words = re.sub(r"[\s_-]", "", str(exc).lower())  # "out of memory", TensorRT's "OutOfMemory"
    return "outofmemory" in words


# ---------------------------------------------------------------------------------- progress
class BuildProgress:
    """Progress of a build's phases as tqdm bars (on a terminal) and log lines, and its cancellation.

    TensorRT calls these from several threads (IProgressMonitor must be thread-safe), so a lock
    guards the bars. `step_complete` returns False once `cancel` is set: TensorRT then ends the
    build, and `build_serialized_network` returns None.
    """

    def __init__(self, title: str, *, cancel: threading.Event | None = None, bars: bool = True) -> None:
        self.title = title
        self.cancel = cancel if cancel is not None else threading.Event()
        self.cancelled = False  # whether a step was refused
        self.display_failed = False  # a callback's display raised (logged once, see `shielded`)
        self.phases: list[tuple[str, int]] = []  # (phase, steps) in start order, for tests and logs
        self._bars: dict[str, Any] = {}
        self._use_bars = bars
        self._lock = threading.Lock()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            self.phases.append((phase_name, num_steps))
            log.info("%s: %s (%d steps)", self.title, phase_name, num_steps)
            if self._use_bars:
                from tqdm import tqdm

                depth = 0 if parent_phase is None else 1 + len(self._bars)
                self._bars[phase_name] = tqdm(
                    total=num_steps, desc=f"{self.title}: {phase_name}", position=depth, leave=depth == 0
                )

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.n = step + 1
                bar.refresh()
            if self.cancel.is_set():
                self.cancelled = True
                return False
            return True

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()


def shielded(progress: BuildProgress, call: Callable[[], Any], default: Any) -> Any:
    """One progress callback. A KeyboardInterrupt inside it cancels the build. Any other error
    of the progress display (a terminal gone, say) is logged once per build and ignored: it must
    neither cancel a build of many minutes nor be recorded as that build's failure."""
    try:
        return call()
    except KeyboardInterrupt:
        progress.cancel.set()
        progress.cancelled = True
        return False
    except Exception as exc:
        if not progress.display_failed:
            progress.display_failed = True
            log.warning(
                "%s: the build's progress display failed (%s: %s); the build goes on",
                progress.title,
                type(exc).__name__,
                exc,
            )
        return default


class Runner(Protocol):
    """A loaded engine. `bind(rows, inputs, outputs)` once per layout, from the engine's thread,
    with static tensors in `spec.inputs` / `spec.outputs` order that stay alive and in place;
    then `run(rows)` once per frame. No allocation, no sync, no rebinding in `run`."""

    def bind(self, rows: int, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> None: ...

    def run(self, rows: int) -> None: ...


class Backend(Protocol):
    """Builds and loads serialized engines. `build` returns (engine bytes, new timing cache bytes).
    `merge_timing_caches(ours, theirs)` returns one timing cache with the entries of both (ours
    where they conflict), or ours where theirs does not fit: the cache file is shared by every
    build, and another build may have written it since this one read it."""

    name: str
    version: str

    def merge_timing_caches(self, ours: bytes, theirs: bytes) -> bytes: ...

    def build(
        self,
        onnx_path: Path,
        spec: ExportSpec,
        *,
        settings: BuilderSettings,
        timing_cache: bytes,
        progress: BuildProgress,
    ) -> tuple[bytes, bytes]: ...

    def load(self, plan: bytes, spec: ExportSpec) -> Runner: ...


def aligned_empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """An uninitialised contiguous tensor whose data starts on a TENSOR_ALIGNMENT boundary.

    torch's CUDA allocator hands out 512-byte aligned blocks, so on a GPU this is a plain
    allocation at offset 0; its CPU allocator aligns to 64 bytes only."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.empty(nbytes + TENSOR_ALIGNMENT, dtype=torch.uint8, device=device)
    offset = -raw.data_ptr() % TENSOR_ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).view(tuple(shape))


def check_binding(
    spec: ExportSpec,
    rows: int,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    *,
    alignment: int = 1,
) -> None:
    """Static buffers must match the spec exactly, each starting on an `alignment`-byte
    boundary: TensorRT reads raw addresses."""
    for kind, specs, tensors in (("input", spec.inputs, inputs), ("output", spec.outputs, outputs)):
        if len(tensors) != len(specs):
            raise LoadFailed(
                f"{spec.component.value}: {len(tensors)} {kind}s bound, expected {[s.name for s in specs]}"
            )
        for tspec, tensor in zip(specs, tensors, strict=True):
            if tuple(tensor.shape) != tspec.concrete(rows) or not tensor.is_contiguous():
                raise LoadFailed(
                    f"{spec.component.value}: {kind} {tspec.name!r} is {tuple(tensor.shape)} "
                    f"(contiguous={tensor.is_contiguous()}), expected contiguous {tspec.concrete(rows)}"
                )
            if tensor.data_ptr() % alignment:
                raise LoadFailed(
                    f"{spec.component.value}: {kind} {tspec.name!r} starts at {tensor.data_ptr():#x}, "
                    f"{tensor.data_ptr() % alignment} bytes past a {alignment}-byte boundary; TensorRT "
                    f"needs {alignment}-byte aligned buffers: allocate it on its own (a view at an "
                    f"offset into another tensor is not aligned)"
                )


def profile_index(spec: ExportSpec, rows: int) -> int:
    """The optimization profile that serves `rows`; LoadFailed where none does."""
    if rows not in spec.rows:
        raise LoadFailed(
            f"{spec.component.value}: no optimization profile for {rows} rows; the engine has {list(spec.rows)}"
        )
    return spec.rows.index(rows)
