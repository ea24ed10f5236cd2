"""`OnnxRuntimeBackend`: onnxruntime on the CPU, run the way TensorRT is, so the whole
`tensorrt` path (export, cache, profiles, binding, validation, fallback) runs without a GPU."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from bridge.engine.accel.backend import (
    BuildCancelled,
    BuildProgress,
    LoadFailed,
    check_binding,
    profile_index,
)
from bridge.engine.accel.engine_cache import BuilderSettings
from bridge.engine.accel.onnx_export import ExportSpec

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

        profile_index(self.spec, rows)  # TensorRT refuses a shape outside every profile
        check_binding(self.spec, rows, inputs, outputs)
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
