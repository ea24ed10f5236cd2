"""A recording fake of the `tensorrt` Python API (11.x), for tests on machines without TensorRT.

`make_fake_tensorrt()` returns a fresh module object. Every API call is appended to
`module.calls` as (name, args...). Behaviour copied from NVIDIA/TensorRT at a892d22 (11.1):
python/docstrings/infer/pyCoreDoc.h (the doc pages at docs.nvidia.com/deeplearning/tensorrt/
latest/_static/python-api/infer/Core/*.html are generated from it), python/src/infer/pyCore.cpp
and python/docstrings/parsers/pyOnnxDoc.h:
- `build_serialized_network` returns an IHostMemory, or None on failure (pyCoreDoc.h
  build_serialized_network; samples/python/detectron2/build_engine.py checks `is None`), after
  logging an error through the builder's ILogger;
- the IProgressMonitor's `step_complete` returning False cancels the build; `phase_finish` is
  then called before all steps were reported (pyCoreDoc.h IProgressMonitor.phase_finish); an
  exception raised inside `step_complete` counts as False (pyCore.cpp PyProgressMonitor);
- `IOptimizationProfile.set_shape` raises ValueError on inconsistent min/opt/max
  (pyCoreDoc.h set_shape); `add_optimization_profile` returns -1 for an invalid profile;
- `set_timing_cache` returns False for a cache from another version/device
  (pyCoreDoc.h set_timing_cache); `create_timing_cache(b"")` makes a new cache;
- `deserialize_cuda_engine` returns None when the plan cannot be deserialized;
- `set_optimization_profile_async` raises RuntimeError("Error in set optimization profile
  async.") on failure (pyCore.cpp:336), and changing the profile invalidates the input shapes;
- `set_input_shape`, `set_tensor_address`, `execute_async_v3` return bool (pyCore.cpp:113-160);
  a shape outside the active profile is refused;
- `NetworkDefinitionCreationFlag.STRONGLY_TYPED` exists but is ignored (11.0: always strongly
  typed); there is no `BuilderFlag.FP16` (removed in 11.0).
A built "engine" runs its ONNX in onnxruntime on the CPU, reading and writing the raw addresses
bound with set_tensor_address, as an engine reads device memory. Knobs: `fail_build` (an error
message the builder logs), `corrupt_output` ("nan" or "negate").
"""

from __future__ import annotations

import base64
import ctypes
import json
import types
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

PLAN_MAGIC = b"FAKE-TRT-PLAN\n"
TIMING_MAGIC = b"FAKE-TRT-TIMING\n"


def make_fake_tensorrt(version: str = "11.1.0") -> Any:
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    m.calls = []
    m.fail_build = None
    m.corrupt_output = None
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
            if not len(lo) == len(mid) == len(hi) or not all(
                0 <= a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)
            ):
                raise ValueError(f"inconsistent shapes for {input}: {lo} {mid} {hi}")
            self.shapes[input] = (lo, mid, hi)

        def __bool__(self) -> bool:
            return bool(self.shapes)

    class ITimingCache:
        def __init__(self, keys: set[str], version: str) -> None:
            self.keys, self.version = keys, version

        def serialize(self) -> bytes:
            return TIMING_MAGIC + json.dumps({"version": self.version, "keys": sorted(self.keys)}).encode()

    class BuilderConfig:
        def __init__(self) -> None:
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

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
            record("create_timing_cache", len(serialized_timing_cache))
            data = bytes(serialized_timing_cache)
            if not data:
                return ITimingCache(set(), version)
            if not data.startswith(TIMING_MAGIC):
                return ITimingCache(set(), "invalid")
            body = json.loads(data[len(TIMING_MAGIC) :])
            return ITimingCache(set(body["keys"]), body["version"])

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            record("set_timing_cache", cache.version, ignore_mismatch)
            if cache.version != version and not ignore_mismatch:
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
            return BuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: NetworkDefinition, config: BuilderConfig) -> bytes | None:
            record("build_serialized_network", config.num_optimization_profiles)
            error = self._check(network, config)
            if error is not None:
                self.logger.log(ILogger.Severity.ERROR, error)
                return None
            monitor = config.progress_monitor
            layers = [f"layer{i}" for i in range(min(network.num_layers, 4))]
            cache = config.timing_cache
            hits = 0
            if monitor is not None:
                monitor.phase_start("Building engine", None, len(config.profiles))
            for p in range(len(config.profiles)):
                if monitor is not None:
                    monitor.phase_start("Timing layers", "Building engine", len(layers))
                for step, layer in enumerate(layers):
                    key = f"{layer}@{sorted(config.profiles[p].shapes.items())}"
                    if cache is not None:
                        hits += key in cache.keys
                        cache.keys.add(key)
                    try:
                        go = monitor.step_complete("Timing layers", step) if monitor is not None else True
                    except Exception:  # pyCore.cpp: an exception in step_complete cancels
                        go = False
                    if not go:
                        monitor.phase_finish("Timing layers")
                        monitor.phase_finish("Building engine")
                        self.logger.log(ILogger.Severity.ERROR, "Engine build was cancelled by the user")
                        return None
                if monitor is not None:
                    monitor.phase_finish("Timing layers")
                    monitor.step_complete("Building engine", p)
            if monitor is not None:
                monitor.phase_finish("Building engine")
            m.timing_hits.append(hits)
            if m.fail_build is not None:
                self.logger.log(ILogger.Severity.ERROR, m.fail_build)
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

        def create_execution_context(self) -> IExecutionContext:
            record("create_execution_context")
            return IExecutionContext(self)

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.active_optimization_profile = 0
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}
            self._session: Any = None

        def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
            record("set_optimization_profile_async", profile_index, stream_handle)
            if not 0 <= profile_index < self.engine.num_optimization_profiles:
                raise RuntimeError("Error in set optimization profile async.")
            self.active_optimization_profile = profile_index
            self.shapes.clear()  # changing the profile invalidates the dynamic bindings
            return True

        def set_input_shape(self, name: str, shape: Any) -> bool:
            record("set_input_shape", name, tuple(shape))
            bounds = self.engine.plan["profiles"][self.active_optimization_profile].get(name)
            if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT or bounds is None:
                return False
            lo, _, hi = bounds
            if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                self.engine.logger.log(
                    ILogger.Severity.ERROR,
                    f"setInputShape: {name} {tuple(shape)} is outside profile [{lo}, {hi}]",
                )
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name: str, memory: int) -> bool:
            record("set_tensor_address", name, memory)
            if name not in self.engine.io:
                return False
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            record("execute_async_v3", stream_handle)
            engine = self.engine
            inputs = [n for n in engine.names if engine.get_tensor_mode(n) == TensorIOMode.INPUT]
            if any(n not in self.shapes for n in inputs) or any(
                n not in self.addresses for n in engine.names
            ):
                engine.logger.log(
                    ILogger.Severity.ERROR, "enqueueV3: not all input shapes or addresses are set"
                )
                return False
            import onnxruntime

            if self._session is None:
                self._session = onnxruntime.InferenceSession(
                    base64.b64decode(engine.plan["onnx"]), providers=["CPUExecutionProvider"]
                )
            feeds = {n: self._view(n, self.shapes[n]) for n in inputs}
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
                self.logger.log(ILogger.Severity.ERROR, f"IRuntime::deserializeCudaEngine: {exc}")
                return None
            return ICudaEngine(plan, self.logger)

    for name, value in list(locals().items()):
        if isinstance(value, type):
            setattr(m, name, value)
    m.Logger = ILogger
    return m
