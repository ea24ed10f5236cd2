"""`acceleration: tensorrt`: engines built from the fp16 ONNX, cached, validated, run on static buffers.

A `Backend` builds a serialized engine from an ONNX file (`build`) and loads one (`load`) into a
`Runner`, which is bound once per layout to static tensors (`bind`) and then run once per frame
(`run`). Two backends implement it:
- `TensorRTBackend`, the TensorRT Python API (10.1 to 11.x): a strongly typed network parsed from
  the ONNX, one static optimization profile per reachable row count, the persisted timing cache
  (each build's merged into the shared file with `ITimingCache.combine`), progress through
  `trt.IProgressMonitor` (returning False from `step_complete` cancels the build), and at run time
  one execution context per profile, all on one block of working memory the runner owns
  (`USER_MANAGED` contexts with `set_device_memory`, both from 10.1), the static buffers bound
  with `set_input_shape` and `set_tensor_address` (256-byte aligned, as TensorRT requires) and
  checked with `infer_shapes`, and `execute_async_v3` on torch's current stream, so a captured
  frame graph can hold the call (where that is the legacy default stream, on which TensorRT adds
  device synchronisations, on a private stream forked from it and joined back: accel/streams.py);
- `OnnxRuntimeBackend`, onnxruntime on the CPU with I/O bound by address the same way, and the
  profile bounds enforced as TensorRT enforces them, so the whole path runs without a GPU.

`prepare_engines` ties export, cache, build, load and validation together. Every failure of a
component, whatever raised it, becomes a reason: logged as a warning, returned to the caller for
status and `doctor`, and the component stays on the exact torch path. Only a stop request
(`BuildCancelled`) propagates. Failures are remembered in the cache (not retried), except
temporary ones (`is_transient`: out of memory, a full disk, a build process killed by SIGKILL),
which the next starts retry, `TRANSIENT_ATTEMPTS` in a row. The runtime builds with TensorRT in
a child process (`accel/isolated.py`). The TensorRT engines themselves were never run in this workplace:
no lent machine has TensorRT. Their code follows the documented API, and the tests drive it
through a recording fake of that API.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from bridge.engine.accel.engine_cache import (
    BuilderSettings,
    DeviceInfo,
    EngineCache,
    EngineKey,
    weights_digest,
)
from bridge.engine.accel.onnx_export import (
    BATCH,
    Component,
    ExportModule,
    ExportSpec,
    component_dtype,
    export_onnx,
    sample_inputs,
)
from bridge.engine.accel.streams import Streams, TorchStreams, enqueue

log = logging.getLogger(__name__)

TENSORRT_EXTRA = 'pip install "streamdiffusion-bridge[tensorrt]"'
MIN_TENSORRT = (10, 1)  # USER_MANAGED working memory: set_device_memory, *_size_for_profile_v2
MIN_COSINE = 0.999
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


def import_tensorrt() -> Any:
    """The `tensorrt` module (10.1 or later), or an ImportError naming the extra to install."""
    wanted = f"NVIDIA TensorRT {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} to 11.x"
    try:
        import tensorrt
    except ImportError as exc:
        raise ImportError(
            f"acceleration 'tensorrt' needs {wanted}: {TENSORRT_EXTRA} "
            f"(Linux or Windows with an NVIDIA GPU); or use acceleration 'compile' ({exc})"
        ) from exc
    version = str(tensorrt.__version__)
    if tuple(int(part) for part in version.split(".")[:2]) < MIN_TENSORRT:
        raise ImportError(
            f"acceleration 'tensorrt' needs {wanted}, found TensorRT {version} (it has no "
            f"set_device_memory): {TENSORRT_EXTRA} --upgrade; or use acceleration 'compile'"
        )
    return tensorrt


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


def _progress_monitor(trt: Any, progress: BuildProgress) -> Any:
    """A `trt.IProgressMonitor` forwarding to `progress`, each callback `shielded`."""

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            shielded(progress, lambda: progress.phase_start(phase_name, parent_phase, num_steps), None)

        def step_complete(self, phase_name: str, step: int) -> bool:
            go = shielded(progress, lambda: progress.step_complete(phase_name, step), True)
            return bool(go) and not progress.cancel.is_set()

        def phase_finish(self, phase_name: str) -> None:
            shielded(progress, lambda: progress.phase_finish(phase_name), None)

    return Monitor()


# ---------------------------------------------------------------------------------- seam
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


def _check_binding(
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


def _profile_index(spec: ExportSpec, rows: int) -> int:
    if rows not in spec.rows:
        raise LoadFailed(
            f"{spec.component.value}: no optimization profile for {rows} rows; the engine has {list(spec.rows)}"
        )
    return spec.rows.index(rows)


# ---------------------------------------------------------------------------------- TensorRT
def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
    }
    if dtype not in table:
        raise LoadFailed(f"engine tensor type {dtype} is not float32, float16 or bfloat16")
    return table[dtype]


def _recording_logger(trt: Any, title: str) -> Any:
    """A `trt.ILogger` that forwards to logging and keeps the errors, for the fallback's reason."""

    class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT (%s): %s", title, msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT (%s): %s", title, msg)
            else:
                log.debug("TensorRT (%s): %s", title, msg)

    return Logger()


def _errors(logger: Any) -> str:
    return "; ".join(logger.errors[-3:])[:400] or "TensorRT logged no error"


class TensorRTBackend:
    """The TensorRT Python API. `trt` is the imported module (the tests pass a fake); `streams`
    the CUDA streams its runners enqueue on (default: torch's on the current device; see
    accel/streams.py)."""

    name = "tensorrt"

    def __init__(self, trt: Any | None = None, *, streams: Streams | None = None) -> None:
        self.trt = trt if trt is not None else import_tensorrt()
        self.version = str(self.trt.__version__)
        self.streams: Streams = streams if streams is not None else TorchStreams()

    def build(
        self,
        onnx_path: Path,
        spec: ExportSpec,
        *,
        settings: BuilderSettings,
        timing_cache: bytes,
        progress: BuildProgress,
    ) -> tuple[bytes, bytes]:
        trt, title = self.trt, spec.component.value
        logger = _recording_logger(trt, title)
        builder = trt.Builder(logger)
        # 1. A strongly typed network: the ONNX's fp16/fp32 types are the engine's. TensorRT 11
        # removed BuilderFlag.FP16 and weak typing; in 11 this flag is accepted and ignored.
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        # parse_from_file, not parse(bytes): it finds the external weights beside the model.
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BuildFailed(f"TensorRT could not parse {str(onnx_path)!r}: {errors[:400]}")
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        if names != [t.name for t in spec.inputs]:
            raise BuildFailed(f"the ONNX inputs are {names}, expected {[t.name for t in spec.inputs]}")
        # 2. The config: one static profile per reachable row count (best tactics, shared weights).
        config = builder.create_builder_config()
        config.builder_optimization_level = settings.optimization_level
        if settings.workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        for rows in spec.rows:
            profile = builder.create_optimization_profile()
            for tspec in spec.inputs:
                if BATCH in tspec.shape:
                    shape = tspec.concrete(rows)
                    profile.set_shape(tspec.name, shape, shape, shape)
            if config.add_optimization_profile(profile) < 0:
                raise BuildFailed(f"TensorRT refused the optimization profile for {rows} rows")
        # 3. The timing cache from earlier builds; one from another TensorRT or GPU is dropped.
        cache = config.create_timing_cache(timing_cache)
        if not config.set_timing_cache(cache, False):
            log.warning(
                "%s: the stored timing cache does not fit this TensorRT/GPU; starting a new one", title
            )
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
        monitor = _progress_monitor(trt, progress)
        config.progress_monitor = monitor
        # 4. Build (minutes on a full-size UNet). None means failed or cancelled.
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            if progress.cancelled or progress.cancel.is_set():
                raise BuildCancelled(f"the {title} engine build was stopped")
            raise BuildFailed(f"TensorRT could not build the {title} engine: {_errors(logger)}")
        timing = config.get_timing_cache()
        timing_bytes = bytes(memoryview(timing.serialize())) if timing is not None else b""
        return bytes(memoryview(plan)), timing_bytes

    def merge_timing_caches(self, ours: bytes, theirs: bytes) -> bytes:
        """`theirs` combined into `ours` with `ITimingCache.combine` (entries in both keep ours).
        A cache from another TensorRT or GPU does not combine (combine returns False): ours alone."""
        trt = self.trt
        logger = _recording_logger(trt, "timing cache")
        builder = trt.Builder(logger)
        config = builder.create_builder_config()
        merged, other = config.create_timing_cache(ours), config.create_timing_cache(theirs)
        if other is None or not merged.combine(other, False):
            log.warning(
                "the timing cache on disk does not fit this TensorRT/GPU (%s); keeping this build's alone",
                _errors(logger),
            )
            return ours
        return bytes(memoryview(merged.serialize()))

    def load(self, plan: bytes, spec: ExportSpec) -> TensorRTRunner:
        trt, title = self.trt, spec.component.value
        logger = _recording_logger(trt, title)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise LoadFailed(f"TensorRT could not load the {title} engine: {_errors(logger)}")
        io = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        expected = {t.name for t in (*spec.inputs, *spec.outputs)}
        if io != expected:
            raise LoadFailed(f"the {title} engine has tensors {sorted(io)}, expected {sorted(expected)}")
        if engine.num_optimization_profiles != len(spec.rows):
            raise LoadFailed(
                f"the {title} engine has {engine.num_optimization_profiles} profiles, expected {len(spec.rows)}"
            )
        return TensorRTRunner(trt, engine, spec, logger, self.streams)


class TensorRTRunner:
    """One execution context per profile, each bound once to its layout's static buffers.

    The contexts share one block of working memory, which the runner owns: they never run at
    the same time (one frame at a time, on one stream), and TensorRT's default (STATIC) would give
    each its own block sized for the largest profile, N profiles costing N blocks. The block is
    allocated at the first `bind`, on the bound tensors' device, for the largest profile, so its
    address stays put while graphs are captured. Should a later bind find a profile needing more
    (the sizes are stateful: a weight-streaming budget changes them), it grows: a new block, every
    context moved onto it, the old one kept alive for the graphs captured on it."""

    def __init__(self, trt: Any, engine: Any, spec: ExportSpec, logger: Any, streams: Streams) -> None:
        self.trt, self.engine, self.spec = trt, engine, spec
        self._logger = logger  # must outlive the engine (TensorRT's rule)
        self._streams = streams
        self._contexts: dict[int, Any] = {}
        self._bound: dict[int, tuple[Tensor, ...]] = {}  # keeps the buffers alive while bound
        self._memory: Tensor | None = None  # (bytes,) uint8, the contexts' shared working memory
        self._outgrown: list[Tensor] = []  # earlier blocks, still addressed by captured graphs

    def bind(self, rows: int, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> None:
        title = self.spec.component.value
        index = _profile_index(self.spec, rows)
        _check_binding(self.spec, rows, inputs, outputs, alignment=TENSOR_ALIGNMENT)
        # 1. The working memory, on the device of the tensors (the engine's), grown if too small.
        devices = sorted({str(t.device) for t in (*inputs, *outputs)})
        if len(devices) != 1:
            raise LoadFailed(f"{title}: the bound tensors are on {devices}; an engine runs on one device")
        memory = self._working_memory(torch.device(devices[0]))
        # 2. The profile's context, created once, on that memory.
        context = self._contexts.get(rows)
        if context is None:
            context = self.engine.create_execution_context(
                self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
            )
            if context is None:
                raise LoadFailed(f"TensorRT could not create a {title} context: {_errors(self._logger)}")
            context.set_device_memory(memory.data_ptr(), memory.numel())
            enqueue(self._streams, lambda stream: context.set_optimization_profile_async(index, stream))
        # 3. Shapes and addresses of the static buffers.
        for tspec, tensor in zip(self.spec.inputs, inputs, strict=True):
            self._check_dtype(tspec.name, tensor)
            if not context.set_input_shape(tspec.name, tspec.concrete(rows)):
                raise LoadFailed(f"{title}: TensorRT refused shape {tspec.concrete(rows)} for {tspec.name!r}")
        for tspec, tensor in zip((*self.spec.inputs, *self.spec.outputs), (*inputs, *outputs), strict=True):
            self._check_dtype(tspec.name, tensor)
            if not context.set_tensor_address(tspec.name, tensor.data_ptr()):
                raise LoadFailed(f"{title}: TensorRT refused the address of {tspec.name!r}")
        # 4. Nothing left unspecified: what enqueue would refuse at the first frame, said here.
        try:
            missing = list(context.infer_shapes())
        except RuntimeError as exc:  # a shape TensorRT cannot infer, e.g. a negative dimension
            raise LoadFailed(f"{title}: TensorRT could not infer the shapes at {rows} rows: {exc}") from exc
        if missing or not context.all_binding_shapes_specified:
            raise LoadFailed(
                f"{title}: after binding {rows} rows TensorRT still lacks the shapes of "
                f"{missing or 'some inputs (all_binding_shapes_specified is False)'}"
            )
        self._contexts[rows] = context
        self._bound[rows] = (*inputs, *outputs)

    def _working_memory(self, device: torch.device) -> Tensor:
        """The shared block, at least as large as every profile needs, on `device`."""
        need = max(
            int(self.engine.get_device_memory_size_for_profile_v2(i))
            for i in range(self.engine.num_optimization_profiles)
        )
        memory = self._memory
        if memory is not None and memory.device != device:
            raise LoadFailed(
                f"{self.spec.component.value}: the tensors are on {device}, the engine's working "
                f"memory on {memory.device}; bind every row count on one device"
            )
        if memory is not None and memory.numel() >= need:
            return memory
        if memory is not None:
            log.info(
                "%s: the engine needs %d bytes of working memory, not %d",
                self.spec.component.value,
                need,
                memory.numel(),
            )
            self._outgrown.append(memory)
        memory = self._memory = aligned_empty((need,), dtype=torch.uint8, device=device)
        for context in self._contexts.values():
            context.set_device_memory(memory.data_ptr(), memory.numel())
        return memory

    def _check_dtype(self, name: str, tensor: Tensor) -> None:
        want = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
        if tensor.dtype != want:
            raise LoadFailed(
                f"{self.spec.component.value}: {name!r} is {tensor.dtype}, the engine wants {want}"
            )

    def run(self, rows: int) -> None:
        context = self._contexts.get(rows)
        if context is None:
            raise LoadFailed(f"{self.spec.component.value}: run({rows}) before bind({rows}, ...)")
        if not enqueue(self._streams, context.execute_async_v3):
            raise RuntimeError(
                f"TensorRT failed to run the {self.spec.component.value} engine: {_errors(self._logger)}"
            )


# ---------------------------------------------------------------------------------- onnxruntime
_ORT_MAGIC = b"SDBRIDGE-ORT-PLAN/1\n"


class OnnxRuntimeBackend:
    """onnxruntime on the CPU, run the way TensorRT is: I/O bound by address, static profiles.

    Its "plan" is a header naming the profiles, then the ONNX model (models under 2 GB)."""

    name = "onnxruntime"

    def __init__(self) -> None:
        import onnxruntime

        self.version = str(onnxruntime.__version__)

    def build(
        self,
        onnx_path: Path,
        spec: ExportSpec,
        *,
        settings: BuilderSettings,
        timing_cache: bytes,
        progress: BuildProgress,
    ) -> tuple[bytes, bytes]:
        import onnx

        progress.phase_start("checking the ONNX model", None, len(spec.rows))
        try:
            model = onnx.load(str(onnx_path))
            onnx.checker.check_model(model)
            for step in range(len(spec.rows)):
                if not progress.step_complete("checking the ONNX model", step):
                    raise BuildCancelled(f"the {spec.component.value} build was stopped")
        finally:
            progress.phase_finish("checking the ONNX model")
        header = json.dumps({"rows": list(spec.rows)}).encode() + b"\n"
        return _ORT_MAGIC + header + model.SerializeToString(), timing_cache

    def merge_timing_caches(self, ours: bytes, theirs: bytes) -> bytes:
        """onnxruntime times nothing: its build hands back the timing cache it was given, so
        what is on disk now is at least as complete."""
        return theirs or ours

    def load(self, plan: bytes, spec: ExportSpec) -> OnnxRuntimeRunner:
        import onnxruntime

        if not plan.startswith(_ORT_MAGIC):
            raise LoadFailed(f"the {spec.component.value} plan is not an onnxruntime plan")
        header, _, model = plan[len(_ORT_MAGIC) :].partition(b"\n")
        rows = tuple(json.loads(header)["rows"])
        if rows != spec.rows:
            raise LoadFailed(
                f"the {spec.component.value} plan has profiles {list(rows)}, expected {list(spec.rows)}"
            )
        session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
        return OnnxRuntimeRunner(session, spec)


class OnnxRuntimeRunner:
    """An I/O binding per profile, each on the static buffers' addresses."""

    def __init__(self, session: Any, spec: ExportSpec) -> None:
        self.session, self.spec = session, spec
        self._bindings: dict[int, Any] = {}
        self._bound: dict[int, tuple[Tensor, ...]] = {}

    def bind(self, rows: int, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> None:
        import numpy as np

        _profile_index(self.spec, rows)  # TensorRT refuses a shape outside every profile
        _check_binding(self.spec, rows, inputs, outputs)
        binding = self.session.io_binding()
        for tspec, tensor in zip((*self.spec.inputs, *self.spec.outputs), (*inputs, *outputs), strict=True):
            if tensor.device.type != "cpu":
                raise LoadFailed(
                    f"the onnxruntime backend runs on the CPU; {tspec.name!r} is on {tensor.device}"
                )
            dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
            bind = binding.bind_input if tspec in self.spec.inputs else binding.bind_output
            bind(tspec.name, "cpu", 0, dtype, tuple(tensor.shape), tensor.data_ptr())
        self._bindings[rows] = binding
        self._bound[rows] = (*inputs, *outputs)

    def run(self, rows: int) -> None:
        binding = self._bindings.get(rows)
        if binding is None:
            raise LoadFailed(f"{self.spec.component.value}: run({rows}) before bind({rows}, ...)")
        self.session.run_with_iobinding(binding)


# ---------------------------------------------------------------------------------- the path
@dataclass
class Prepared:
    """A component ready to run: bind its static buffers, then run it per frame."""

    spec: ExportSpec
    runner: Runner
    plan_path: Path
    built: bool  # built now (False: loaded from the cache)
    cosine: dict[int, float]  # validation per row count


@dataclass
class EngineReport:
    """What `prepare_engines` achieved: ready components, and a reason per fallen-back one."""

    ready: dict[Component, Prepared] = field(default_factory=dict)
    fallbacks: dict[Component, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.fallbacks


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


def _record(cache: EngineCache, key: EngineKey, exc: BaseException) -> None:
    cache.record_failure(key, f"{type(exc).__name__}: {exc}"[:600], transient=is_transient(exc))


def validate(
    runner: Runner, reference: ExportModule, spec: ExportSpec, *, device: torch.device, dtype: torch.dtype
) -> dict[int, float]:
    """Run the engine and torch on fixed inputs at every profile; cosine >= MIN_COSINE, all finite."""
    scores: dict[int, float] = {}
    for rows in spec.rows:
        samples = sample_inputs(spec, rows, dtype=dtype, device=device, seed=1234 + rows)
        # Buffers of their own, aligned as TensorRT wants them whatever the allocator gives.
        inputs = [aligned_empty(t.shape, dtype=t.dtype, device=t.device).copy_(t) for t in samples]
        with torch.no_grad():
            want = reference(*inputs)
        got = aligned_empty(want.shape, dtype=want.dtype, device=want.device)
        runner.bind(rows, inputs, [got])
        runner.run(rows)
        got_cpu, want_cpu = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
        if not torch.isfinite(got_cpu).all():
            raise ValidationFailed(f"{spec.component.value} engine gave NaN or Inf at {rows} rows")
        cos = float(torch.nn.functional.cosine_similarity(got_cpu.flatten(), want_cpu.flatten(), dim=0))
        if not cos >= MIN_COSINE:
            raise ValidationFailed(
                f"{spec.component.value} engine differs from torch at {rows} rows: cosine {cos:.5f} < {MIN_COSINE}"
            )
        scores[rows] = cos
    return scores


def prepare_engines(
    pipe: Any,
    specs: Sequence[ExportSpec],
    *,
    model: str,
    cache_root: Path,
    backend: Backend,
    device: DeviceInfo,
    settings: BuilderSettings | None = None,
    cancel: threading.Event | None = None,
    lock_timeout_s: float = 3600.0,
    bars: bool = True,
) -> EngineReport:
    """Build or load an engine per spec. A component that fails keeps the exact torch path; its
    reason is logged and returned. A stop request (`cancel` set) raises BuildCancelled. `model`
    is recorded beside each engine for people; the weights themselves key it."""
    settings = settings if settings is not None else BuilderSettings()
    report = EngineReport()
    cache = EngineCache(cache_root)
    digests: dict[int, str] = {}
    for spec in specs:
        module = pipe.unet if spec.component is Component.UNET else pipe.vae
        try:
            if id(module) not in digests:
                digests[id(module)] = weights_digest(module)
            key = EngineKey(model, digests[id(module)], spec, backend.name, backend.version, device, settings)
            report.ready[spec.component] = _prepare_one(
                pipe, key, cache, backend, cancel=cancel, lock_timeout_s=lock_timeout_s, bars=bars
            )
        except BuildCancelled:
            raise
        except Exception as exc:  # any failure of an optional backend keeps the show on the exact path
            if cancel is not None and cancel.is_set():  # a stop while waiting for the lock, say
                raise BuildCancelled(f"stopped while preparing the {spec.component.value} engine") from exc
            reason = f"{spec.component.value}: {type(exc).__name__}: {exc}"[:600]
            log.warning("%s engine unavailable, running it on the exact torch path: %s", backend.name, reason)
            report.fallbacks[spec.component] = reason
    return report


def _prepare_one(
    pipe: Any,
    key: EngineKey,
    cache: EngineCache,
    backend: Backend,
    *,
    cancel: threading.Event | None,
    lock_timeout_s: float,
    bars: bool,
) -> Prepared:
    spec, title = key.spec, key.spec.component.value
    with cache.lock(key, timeout_s=lock_timeout_s, cancel=cancel):
        earlier = cache.failure(key)
        if earlier is not None:
            raise BuildFailed(
                f"an earlier build failed ({earlier}); delete {str(cache.failure_path(key))!r} to try again"
            )
        plan = cache.read_plan(key)
        built = plan is None
        if plan is None:
            log.info("building the %s %s engine (not in %s)", backend.name, title, cache.folder(key))
            progress = BuildProgress(f"{backend.name} {title}", cancel=cancel, bars=bars)
            try:
                onnx_path = export_onnx(pipe, spec, cache.onnx_path(key), opset=key.settings.opset)
                plan, timing = backend.build(
                    onnx_path,
                    spec,
                    settings=key.settings,
                    timing_cache=cache.read_timing_cache(key),
                    progress=progress,
                )
            except BuildCancelled:
                raise
            except Exception as exc:
                if cancel is not None and cancel.is_set():  # stopped: the next start builds again
                    raise BuildCancelled(f"the {title} engine build was stopped ({exc})") from exc
                _record(cache, key, exc)
                raise
            cache.write_plan(key, plan)
            cache.write_timing_cache(
                key, timing, merge=backend.merge_timing_caches, timeout_s=lock_timeout_s, cancel=cancel
            )
            for leftover in cache.onnx_path(key).parent.iterdir():
                leftover.unlink()  # the ONNX (GBs for a real UNet) is rebuilt if ever needed
        else:
            log.info("loading the %s %s engine from %s", backend.name, title, cache.plan_path(key))
        try:
            runner = backend.load(plan, spec)
            reference = ExportModule(pipe, spec).eval()
            module = pipe.unet if spec.component is Component.UNET else pipe.vae
            device = next(module.parameters()).device
            cosine = validate(runner, reference, spec, device=device, dtype=component_dtype(pipe, spec))
        except Exception as exc:
            # A plan that loads wrong is as bad as a failed build: never retried until deleted
            # (out of memory while loading or validating is retried, TRANSIENT_ATTEMPTS in all).
            _record(cache, key, exc)
            raise
        cache.clear_failure(key)  # earlier temporary failures are forgotten
    return Prepared(spec, runner, cache.plan_path(key), built, cosine)
