"""`TensorRTBackend`: the `Backend` (accel/backend.py) on the TensorRT Python API, 10.1 to 11.x.

Build: a strongly typed network parsed from the fp16 ONNX, one static optimization profile per
reachable row count, the persisted timing cache (each build's merged into the shared file with
`ITimingCache.combine`), progress through `trt.IProgressMonitor` (returning False from
`step_complete` cancels the build). The runtime builds in a child process (accel/isolated.py).

Run: one execution context per profile, all on one block of working memory the runner owns
(`USER_MANAGED` contexts with `set_device_memory`, both from 10.1), the static buffers bound with
`set_input_shape` and `set_tensor_address` (256-byte aligned, as TensorRT requires) and checked
with `infer_shapes`, and `execute_async_v3` on torch's current stream, so a captured frame graph
can hold the call (where that is the legacy default stream, on which TensorRT adds device
synchronisations, on a private stream forked from it and joined back: accel/streams.py).

The TensorRT engines themselves were never run in this workplace: no lent machine has TensorRT.
Their code follows the documented API, and the tests drive it through a recording fake of that
API (tests/fake_tensorrt.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bridge.engine.accel.backend import (
    TENSOR_ALIGNMENT,
    BuildCancelled,
    BuildFailed,
    BuildProgress,
    LoadFailed,
    aligned_empty,
    check_binding,
    profile_index,
    shielded,
)
from bridge.engine.accel.engine_cache import BuilderSettings
from bridge.engine.accel.onnx_export import BATCH, ExportSpec
from bridge.engine.accel.streams import Streams, TorchStreams, enqueue

log = logging.getLogger(__name__)

TENSORRT_EXTRA = 'pip install "streamdiffusion-bridge[tensorrt]"'
MIN_TENSORRT = (10, 1)  # USER_MANAGED working memory: set_device_memory, *_size_for_profile_v2


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
        # create_timing_cache gives None for bytes that are no timing cache (a damaged file).
        cache = config.create_timing_cache(timing_cache)
        if cache is None or not config.set_timing_cache(cache, False):
            log.warning(
                "%s: the stored timing cache is damaged or does not fit this TensorRT/GPU; starting a new one",
                title,
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
        A cache from another TensorRT or GPU does not combine (combine returns False), and a
        damaged one does not load: ours alone. Run in the bridge's process after the build's
        child has ended, on the engine's device (prepare_engines runs there): a builder made
        only to combine two caches, at start-up, before the show."""
        trt = self.trt
        logger = _recording_logger(trt, "timing cache")
        builder = trt.Builder(logger)
        config = builder.create_builder_config()
        merged, other = config.create_timing_cache(ours), config.create_timing_cache(theirs)
        # None: bytes that are no timing cache (a damaged file); False: another TensorRT or GPU.
        if merged is None or other is None or not merged.combine(other, False):
            log.warning(
                "the timing cache on disk is damaged or does not fit this TensorRT/GPU (%s); "
                "keeping this build's alone",
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
        index = profile_index(self.spec, rows)
        check_binding(self.spec, rows, inputs, outputs, alignment=TENSOR_ALIGNMENT)
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
