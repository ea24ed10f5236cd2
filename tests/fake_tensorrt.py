"""A recording fake of the `tensorrt` Python API (11.x), for tests on machines without TensorRT.

`make_fake_tensorrt()` returns a fresh module object. Every API call is appended to
`module.calls` as (name, args...). Behaviour copied from NVIDIA/TensorRT at a892d22 (11.1):
python/docstrings/infer/pyCoreDoc.h (the doc pages at docs.nvidia.com/deeplearning/tensorrt/
latest/_static/python-api/infer/Core/*.html are generated from it), python/src/infer/pyCore.cpp,
include/NvInferRuntime.h and python/docstrings/parsers/pyOnnxDoc.h. Where TensorRT's message
is not in those sources, the fake's wording is its own.
- `build_serialized_network` returns an IHostMemory, or None on failure (pyCoreDoc.h
  build_serialized_network; samples/python/detectron2/build_engine.py checks `is None`), after
  logging an error through the builder's ILogger. The progress monitor is called from a thread
  the build starts, as TensorRT calls it from its own threads (the binding releases the GIL
  around the build: pyCore.cpp build_serialized_network, py::gil_scoped_release);
- the IProgressMonitor's `step_complete` returning False cancels the build; `phase_finish` is
  then called before all steps were reported (pyCoreDoc.h IProgressMonitor.phase_finish);
- an exception raised in a Python override of `ILogger.log` or of `phase_start`,
  `step_complete`, `phase_finish` never reaches the caller: the binding catches everything,
  prints "[ERROR] Exception caught in <name>(): <what>" to stderr and carries on, and
  `step_complete` then counts as False (pyCore.cpp PyLogger, PyProgressMonitor);
- `IOptimizationProfile.set_shape` raises RuntimeError("Shape provided for {min,opt,max} is
  inconsistent with other shapes.") (pyCore.cpp opt_profile_set_shape);
  `add_optimization_profile` returns -1 for an invalid profile;
- `set_timing_cache` returns False for a cache from another version/device
  (pyCoreDoc.h set_timing_cache); `create_timing_cache(b"")` makes a new cache, and one from
  bytes that are no timing cache logs TensorRT's serialization error ("Magic tag does not
  match", then "The timing cache will not be used!", as NVIDIA/TensorRT#3566 shows it) and
  returns None (the C++ createTimingCache's nullptr);
- `ITimingCache.combine(input_cache, ignore_mismatch)` appends the input's entries, skipping
  those it has already, and returns True; a cache from another TensorRT version is skipped and
  it returns False, and one from another device too unless `ignore_mismatch` (pyCoreDoc.h
  ITimingCacheDoc::combine, NvInfer.h ITimingCache::combine);
- `deserialize_cuda_engine` returns None when the plan cannot be deserialized;
- `create_execution_context(strategy=ExecutionContextAllocationStrategy.STATIC)` (pyCore.cpp,
  ICudaEngine): STATIC gives the context its own working memory for the largest profile
  (NvInferRuntime.h createExecutionContext), counted in `module.context_bytes`; USER_MANAGED
  gives it none: `set_device_memory(memory, size)` must, 256-byte aligned and at least
  `get_device_memory_size_for_profile_v2(profile)` bytes (pyCoreDoc.h set_device_memory,
  NvInferRuntime.h setDeviceMemoryV2), or `execute_async_v3` fails. It returns None when the
  context cannot be made (the C++ call returns nullptr);
- `set_optimization_profile_async` raises RuntimeError("Error in set optimization profile
  async.") on failure (pyCore.cpp context_set_optimization_profile_async), and changing the
  profile invalidates the input shapes;
- `execute_async_v3` on the default stream (handle 0) logs a warning: "Using default stream in
  enqueueV3() may lead to performance issues due to additional calls to cudaStreamSynchronize()
  by TensorRT to ensure correct synchronization. Please use non-default stream instead." (as
  TensorRT 10 logs it; documented in pyCoreDoc.h execute_async_v3, NvInferRuntime.h enqueueV3);
- `set_input_shape`, `set_tensor_address`, `execute_async_v3` return bool (pyCore.cpp);
  `set_input_shape` refuses a shape whose dimensions disagree with the network's where those
  are not -1, or a dynamic one outside the active profile; a static input needs no profile
  (NvInferRuntime.h setInputShape: "Each dimension must agree with the network dimension
  unless the latter was -1"). `set_tensor_address` refuses a pointer that is not 256-byte
  aligned (NvInferRuntime.h setTensorAddress: "The pointer must have at least 256-byte
  alignment"; "Return false if an error occurred");
- `infer_shapes()` lists the inputs whose dynamic dimensions were not set, empty when all were
  (pyCoreDoc.h infer_shapes); `all_binding_shapes_specified` is True exactly then (pyCoreDoc.h
  IExecutionContext, pyCore.cpp: allInputDimensionsSpecified);
- `NetworkDefinitionCreationFlag.STRONGLY_TYPED` exists but is ignored (11.0: always strongly
  typed); there is no `BuilderFlag.FP16` (removed in 11.0).
A built "engine" runs its ONNX in onnxruntime on the CPU, reading and writing the raw addresses
bound with set_tensor_address, as an engine reads device memory. Its working memory per profile
is the fake's own figure: 4 bytes per element of the profile's largest inputs, plus
`extra_device_memory` (what lowering a weight-streaming budget does: the sizes are stateful,
NvInferRuntime.h getDeviceMemorySizeForProfileV2). Knobs: `fail_build` (an error message the
builder logs), `fail_context` (one the engine logs before `create_execution_context` returns
None), `corrupt_output` ("nan" or "negate"), `extra_device_memory` (bytes), `device_name` (the
GPU the fake builds on, which its timing caches record, as TensorRT's cache header records the
device's properties).
"""

from __future__ import annotations

import base64
import ctypes
import json
import math
import sys
import threading
import types
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

PLAN_MAGIC = b"FAKE-TRT-PLAN\n"
TIMING_MAGIC = b"FAKE-TRT-TIMING\n"
ALIGNMENT = 256  # bytes: setTensorAddress and setDeviceMemoryV2 want at least this
DEFAULT_STREAM = 0  # cudaStream_t 0, the legacy default stream (torch's cuda_stream for it)
DEFAULT_STREAM_WARNING = (
    "Using default stream in enqueueV3() may lead to performance issues due to additional calls to "
    "cudaStreamSynchronize() by TensorRT to ensure correct synchronization. Please use non-default "
    "stream instead."
)


class FakeStreams:
    """A stand-in for torch's CUDA streams behind `bridge.engine.accel.streams.Streams`.
    `handle` is what torch's current stream reports (`cuda_stream`: 0 for the default stream,
    another number for a stream of one's own, such as a graph's capture stream); `fork` and
    `join` are recorded in `calls` (pass the fake TensorRT's, to see their order with its calls).
    As torch's `Stream.wait_event`/`wait_stream`, they only order later work: nothing waits here."""

    PRIVATE = 0x5EED  # the private stream's handle

    def __init__(self, handle: int, calls: list[tuple[Any, ...]] | None = None) -> None:
        self.handle = handle
        self.calls: list[tuple[Any, ...]] = calls if calls is not None else []
        self.forked = False  # TorchStreams makes its private stream at the first fork

    def current(self) -> int:
        return self.handle

    def fork(self) -> int:
        self.forked = True
        self.calls.append(("fork", self.handle, self.PRIVATE))  # the private stream waits for current
        return self.PRIVATE

    def join(self) -> None:
        if not self.forked:  # as TorchStreams.join: there is no private stream to wait for yet
            raise RuntimeError("join() before fork(): there is no private stream to wait for")
        self.calls.append(("join", self.handle, self.PRIVATE))  # the current stream waits for private


def _override(obj: Any, name: str, *args: Any, refused: Any = None) -> Any:
    """Call a Python override as the binding does: anything it raises is printed, not raised
    (pyCore.cpp PyLogger::log, PyProgressMonitor), and the call yields `refused` instead."""
    try:
        return getattr(obj, name)(*args)
    except BaseException as exc:  # catch (...) in the binding: KeyboardInterrupt too
        print(f"[ERROR] Exception caught in {name}(): {type(exc).__name__}: {exc}", file=sys.stderr)
        return refused


def make_fake_tensorrt(version: str = "11.1.0") -> Any:
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    m.calls = []
    m.fail_build = None
    m.fail_context = None
    m.corrupt_output = None
    m.extra_device_memory = 0
    m.device_name = "NVIDIA H200"
    m.context_bytes = 0  # working memory TensorRT allocated itself (STATIC contexts)
    m.timing_hits = []  # per build: how many layer timings came from the timing cache

    def record(*call: Any) -> None:
        m.calls.append(call)

    class DataType(IntEnum):
        FLOAT = 0
        HALF = 1
        INT32 = 3
        BF16 = 7
        INT64 = 8

    class TensorIOMode(IntEnum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class MemoryPoolType(IntEnum):
        WORKSPACE = 0

    class ExecutionContextAllocationStrategy(IntEnum):  # NvInferRuntime.h, the same values
        STATIC = 0
        ON_PROFILE_CHANGE = 1
        USER_MANAGED = 2

    class NetworkDefinitionCreationFlag(IntEnum):
        STRONGLY_TYPED = 0  # deprecated in 11.0, ignored

    class BuilderFlag(IntEnum):  # 11.x: FP16/INT8/weak typing gone
        DEBUG = 0
        REFIT = 2
        TF32 = 6

    class ILogger:
        class Severity(IntEnum):
            INTERNAL_ERROR = 0
            ERROR = 1
            WARNING = 2
            INFO = 3
            VERBOSE = 4

        def __init__(self) -> None:
            pass

        def log(self, severity: Any, msg: str) -> None:
            raise NotImplementedError("ILogger.log must be overridden")

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    class ITensor:
        def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType) -> None:
            self.name, self.shape, self.dtype = name, shape, dtype

    class NetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []
            self.num_layers = 0
            self.onnx_path: str | None = None
            self.onnx_bytes = b""

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_input(self, i: int) -> ITensor:
            return self.inputs[i]

        def get_output(self, i: int) -> ITensor:
            return self.outputs[i]

    class ParserError:
        # str() as pyOnnx.cpp parserErrorStr: "(func): CODE: desc", node info in front unless
        # the model itself could not be read.
        def __init__(self, code: str, func: str, desc: str, node: int = -1) -> None:
            self._code, self._func, self._desc, self._node = code, func, desc, node

        def desc(self) -> str:
            return self._desc

        def __str__(self) -> str:
            info = f"({self._func}): {self._code}: {self._desc}"
            if self._code == "MODEL_DESERIALIZE_FAILED":
                return info
            return f"In node {self._node} with name:  and operator:  {info}"

    class OnnxParser:
        def __init__(self, network: NetworkDefinition, logger: ILogger) -> None:
            self.network, self.logger = network, logger
            self.errors: list[ParserError] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> ParserError:
            return self.errors[i]

        def parse_from_file(self, model: str) -> bool:
            record("parse_from_file", model)
            import onnx
            from onnx.external_data_helper import ExternalDataInfo, uses_external_data

            try:
                proto = onnx.load(model, load_external_data=False)
            except Exception:
                self.errors.append(
                    ParserError(
                        "MODEL_DESERIALIZE_FAILED",
                        "parseFromFile",
                        f"Failed to parse ONNX model from file: {model}",
                    )
                )
                return False
            for t in proto.graph.initializer:
                if (
                    uses_external_data(t)
                    and not (Path(model).parent / ExternalDataInfo(t).location).is_file()
                ):
                    self.errors.append(
                        ParserError(
                            "INVALID_VALUE",
                            "importInitializer",
                            f"Failed to open file: {ExternalDataInfo(t).location}",
                        )
                    )
                    return False
            types_ = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF}

            def tensor(v: Any) -> ITensor:
                dims = tuple(
                    d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim
                )
                return ITensor(v.name, dims, types_[v.type.tensor_type.elem_type])

            self.network.inputs = [tensor(v) for v in proto.graph.input]
            self.network.outputs = [tensor(v) for v in proto.graph.output]
            self.network.num_layers = len(proto.graph.node)
            self.network.onnx_path = model
            # The plan is self-contained, as a real one: it carries the weights, not a path.
            self.network.onnx_bytes = onnx.load(model).SerializeToString()
            return True

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
            record("set_shape", input, tuple(min), tuple(opt), tuple(max))
            lo, mid, hi = tuple(min), tuple(opt), tuple(max)
            # pyCore.cpp opt_profile_set_shape: setDimensions per selector, min then opt then max,
            # each checked against the ones before it.
            if any(d < 0 for d in lo):
                raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
            if len(mid) != len(lo) or any(a > b for a, b in zip(lo, mid, strict=True)):
                raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
            if len(hi) != len(mid) or any(b > c for b, c in zip(mid, hi, strict=True)):
                raise RuntimeError("Shape provided for max is inconsistent with other shapes.")
            self.shapes[input] = (lo, mid, hi)

        def __bool__(self) -> bool:
            return bool(self.shapes)

    class ITimingCache:
        def __init__(self, keys: set[str], version: str, device: str) -> None:
            self.keys, self.version, self.device = keys, version, device

        def serialize(self) -> bytes:
            body = {"version": self.version, "device": self.device, "keys": sorted(self.keys)}
            return TIMING_MAGIC + json.dumps(body).encode()

        def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
            record("combine", input_cache.version, input_cache.device, ignore_mismatch)
            if input_cache.version != self.version:
                return False  # "must be generated by a TensorRT build of exact same version"
            if input_cache.device != self.device and not ignore_mismatch:
                return False
            self.keys |= input_cache.keys  # "Conflicting entries will be skipped"
            return True

    class BuilderConfig:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger
            self.builder_optimization_level = 3
            self.progress_monitor: Any = None
            self.profiles: list[IOptimizationProfile] = []
            self.pools: dict[Any, int] = {}
            self.timing_cache: ITimingCache | None = None

        @property
        def num_optimization_profiles(self) -> int:
            return len(self.profiles)

        def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
            record("set_memory_pool_limit", pool, pool_size)
            self.pools[pool] = pool_size

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            record("add_optimization_profile", dict(profile.shapes))
            if not profile:
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None:
            record("create_timing_cache", len(serialized_timing_cache))
            data = bytes(serialized_timing_cache)
            if not data:
                return ITimingCache(set(), version, m.device_name)
            if not data.startswith(TIMING_MAGIC):
                for msg in (
                    "Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match",
                    "The timing cache will not be used!",
                ):
                    _override(self.logger, "log", ILogger.Severity.ERROR, msg)
                return None
            body = json.loads(data[len(TIMING_MAGIC) :])
            return ITimingCache(set(body["keys"]), body["version"], body["device"])

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            record("set_timing_cache", cache.version, ignore_mismatch)
            if (cache.version, cache.device) != (version, m.device_name) and not ignore_mismatch:
                return False
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self.timing_cache

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> NetworkDefinition:
            record("create_network", flags)
            return NetworkDefinition(flags)

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig(self.logger)

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: NetworkDefinition, config: BuilderConfig) -> bytes | None:
            record("build_serialized_network", config.num_optimization_profiles)
            # TensorRT builds on threads of its own and calls the monitor and the logger from
            # them, never from the caller's; what the fake itself gets wrong is raised here.
            result: list[bytes | None] = []
            failure: list[BaseException] = []

            def work() -> None:
                try:
                    result.append(self._build(network, config))
                except BaseException as exc:
                    failure.append(exc)

            worker = threading.Thread(target=work, name="fake-tensorrt-builder")
            worker.start()
            worker.join()
            if failure:
                raise failure[0]
            return result[0]

        def _build(self, network: NetworkDefinition, config: BuilderConfig) -> bytes | None:
            logger = self.logger
            error = self._check(network, config)
            if error is not None:
                _override(logger, "log", ILogger.Severity.ERROR, error)
                return None
            monitor = config.progress_monitor
            layers = [f"layer{i}" for i in range(min(network.num_layers, 4))]
            cache = config.timing_cache
            hits = 0

            def call(name: str, *args: Any) -> Any:
                return True if monitor is None else _override(monitor, name, *args, refused=False)

            call("phase_start", "Building engine", None, len(config.profiles))
            for p in range(len(config.profiles)):
                call("phase_start", "Timing layers", "Building engine", len(layers))
                for step, layer in enumerate(layers):
                    key = f"{layer}@{sorted(config.profiles[p].shapes.items())}"
                    if cache is not None:
                        hits += key in cache.keys
                        cache.keys.add(key)
                    if not call("step_complete", "Timing layers", step):
                        call("phase_finish", "Timing layers")
                        call("phase_finish", "Building engine")
                        _override(
                            logger, "log", ILogger.Severity.ERROR, "Engine build was cancelled by the user"
                        )
                        return None
                call("phase_finish", "Timing layers")
                call("step_complete", "Building engine", p)
            call("phase_finish", "Building engine")
            m.timing_hits.append(hits)
            if m.fail_build is not None:
                _override(logger, "log", ILogger.Severity.ERROR, m.fail_build)
                return None
            plan = {
                "version": version,
                "onnx": base64.b64encode(network.onnx_bytes).decode(),
                "io": [[t.name, list(t.shape), int(t.dtype), 1] for t in network.inputs]
                + [[t.name, list(t.shape), int(t.dtype), 2] for t in network.outputs],
                "profiles": [
                    {k: [list(s) for s in v] for k, v in prof.shapes.items()} for prof in config.profiles
                ],
            }
            return PLAN_MAGIC + json.dumps(plan).encode()

        @staticmethod
        def _check(network: NetworkDefinition, config: BuilderConfig) -> str | None:
            if network.onnx_path is None:
                return "Network must have at least one output"
            for t in network.inputs:
                for i, prof in enumerate(config.profiles):
                    if -1 in t.shape and t.name not in prof.shapes:
                        return f"{t.name}: dynamic input is missing dimensions in profile {i}."
                    for shape in prof.shapes.get(t.name, ()):
                        if len(shape) != len(t.shape) or any(
                            d != -1 and d != s for d, s in zip(t.shape, shape, strict=False)
                        ):
                            return f"{t.name}: profile {i} shape {shape} does not match {t.shape}"
            if not config.profiles and any(-1 in t.shape for t in network.inputs):
                return "Network has dynamic or shape inputs, but no optimization profile has been defined."
            return None

    class ICudaEngine:
        def __init__(self, plan: dict[str, Any], logger: ILogger) -> None:
            self.plan, self.logger = plan, logger
            self.io = {
                name: (tuple(shape), DataType(dt), TensorIOMode(mode)) for name, shape, dt, mode in plan["io"]
            }
            self.names = [row[0] for row in plan["io"]]

        @property
        def num_io_tensors(self) -> int:
            return len(self.names)

        @property
        def num_optimization_profiles(self) -> int:
            return len(self.plan["profiles"])

        def get_tensor_name(self, index: int) -> str:
            return self.names[index]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return self.io[name][2] if name in self.io else TensorIOMode.NONE

        def get_tensor_dtype(self, name: str) -> DataType:
            return self.io[name][1]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.io[name][0]

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            return [tuple(s) for s in self.plan["profiles"][profile_index][name]]

        def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
            record("get_device_memory_size_for_profile_v2", profile_index)
            return self._memory_size(profile_index)

        @property
        def device_memory_size_v2(self) -> int:
            return max((self._memory_size(i) for i in range(self.num_optimization_profiles)), default=0)

        def _memory_size(self, profile_index: int) -> int:
            largest = [shapes[2] for shapes in self.plan["profiles"][profile_index].values()]
            return 4 * sum(math.prod(shape) for shape in largest) + m.extra_device_memory

        def create_execution_context(
            self, strategy: ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy.STATIC
        ) -> IExecutionContext | None:
            record("create_execution_context", ExecutionContextAllocationStrategy(strategy))
            if m.fail_context is not None:
                _override(self.logger, "log", ILogger.Severity.ERROR, m.fail_context)
                return None
            if strategy != ExecutionContextAllocationStrategy.USER_MANAGED:
                m.context_bytes += self.device_memory_size_v2  # its own, for the largest profile
            return IExecutionContext(self, ExecutionContextAllocationStrategy(strategy))

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine, strategy: ExecutionContextAllocationStrategy) -> None:
            self.engine, self.strategy = engine, strategy
            self.active_optimization_profile = 0
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}
            self.device_memory: tuple[int, int] | None = None  # (address, bytes), USER_MANAGED
            self._session: Any = None

        def set_device_memory(self, memory: int, size: int) -> None:
            record("set_device_memory", memory, size)
            if memory % ALIGNMENT:
                _override(
                    self.engine.logger,
                    "log",
                    ILogger.Severity.ERROR,
                    f"setDeviceMemoryV2: {memory:#x} is not {ALIGNMENT}-byte aligned",
                )
                return
            self.device_memory = (memory, size)

        def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
            record("set_optimization_profile_async", profile_index, stream_handle)
            if not 0 <= profile_index < self.engine.num_optimization_profiles:
                raise RuntimeError("Error in set optimization profile async.")
            self.active_optimization_profile = profile_index
            self.shapes.clear()  # changing the profile invalidates the dynamic bindings
            return True

        def set_input_shape(self, name: str, shape: Any) -> bool:
            record("set_input_shape", name, tuple(shape))
            shape = tuple(shape)
            if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
                return False
            network = self.engine.get_tensor_shape(name)
            if len(shape) != len(network) or any(
                d != -1 and d != s for d, s in zip(network, shape, strict=True)
            ):
                self._error(f"setInputShape: {name} {shape} does not match the network's {network}")
                return False
            bounds = self.engine.plan["profiles"][self.active_optimization_profile].get(name)
            if bounds is None and -1 in network:
                return False
            if bounds is not None:
                lo, _, hi = bounds
                if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                    self._error(f"setInputShape: {name} {shape} is outside profile [{lo}, {hi}]")
                    return False
            self.shapes[name] = shape
            return True

        def set_tensor_address(self, name: str, memory: int) -> bool:
            record("set_tensor_address", name, memory)
            if name not in self.engine.io or memory % ALIGNMENT:
                return False
            self.addresses[name] = memory
            return True

        def _inputs(self) -> list[str]:
            engine = self.engine
            return [n for n in engine.names if engine.get_tensor_mode(n) == TensorIOMode.INPUT]

        def _shape(self, name: str) -> tuple[int, ...] | None:
            network = self.engine.get_tensor_shape(name)
            return self.shapes.get(name) if -1 in network else network

        def infer_shapes(self) -> list[str]:
            record("infer_shapes")
            return [n for n in self._inputs() if self._shape(n) is None]

        @property
        def all_binding_shapes_specified(self) -> bool:
            record("all_binding_shapes_specified")
            return all(self._shape(n) is not None for n in self._inputs())

        def _error(self, msg: str) -> None:
            _override(self.engine.logger, "log", ILogger.Severity.ERROR, msg)

        def execute_async_v3(self, stream_handle: int) -> bool:
            record("execute_async_v3", stream_handle)
            engine = self.engine
            inputs = self._inputs()
            if any(self._shape(n) is None for n in inputs) or any(
                n not in self.addresses for n in engine.names
            ):
                self._error("enqueueV3: not all input shapes or addresses are set")
                return False
            if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED:
                need = engine._memory_size(self.active_optimization_profile)
                if self.device_memory is None or self.device_memory[1] < need:
                    self._error(f"enqueueV3: device memory {self.device_memory} is smaller than {need} bytes")
                    return False
            if stream_handle == DEFAULT_STREAM:
                _override(engine.logger, "log", ILogger.Severity.WARNING, DEFAULT_STREAM_WARNING)
            import onnxruntime

            if self._session is None:
                self._session = onnxruntime.InferenceSession(
                    base64.b64decode(engine.plan["onnx"]), providers=["CPUExecutionProvider"]
                )
            feeds = {n: self._view(n, self._shape(n) or ()) for n in inputs}
            results = self._session.run(None, feeds)
            outputs = [n for n in engine.names if engine.get_tensor_mode(n) == TensorIOMode.OUTPUT]
            for name, value in zip(outputs, results, strict=True):
                if m.corrupt_output == "nan":
                    value = np.full_like(value, np.nan)
                elif m.corrupt_output == "negate":
                    value = -value
                np.copyto(self._view(name, value.shape), value)
            return True

        def _view(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
            dtype = {DataType.FLOAT: np.float32, DataType.HALF: np.float16}[
                self.engine.get_tensor_dtype(name)
            ]
            count = int(np.prod(shape))
            buffer = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(self.addresses[name])
            return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
            record("deserialize_cuda_engine", len(serialized_engine))
            data = bytes(serialized_engine)
            try:
                if not data.startswith(PLAN_MAGIC):
                    raise ValueError("magic tag does not match")
                plan = json.loads(data[len(PLAN_MAGIC) :])
                if plan["version"] != version:
                    raise ValueError(f"the plan was built by TensorRT {plan['version']}, this is {version}")
            except ValueError as exc:
                _override(
                    self.logger, "log", ILogger.Severity.ERROR, f"IRuntime::deserializeCudaEngine: {exc}"
                )
                return None
            return ICudaEngine(plan, self.logger)

    for name, value in list(locals().items()):
        if isinstance(value, type):
            setattr(m, name, value)
    m.Logger = ILogger
    return m
