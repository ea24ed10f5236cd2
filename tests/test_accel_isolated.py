"""Engine builds in a child process (bridge/engine/accel/isolated.py), with real spawned
processes: the plan built there loads here, progress arrives here, a stop terminates the child
within 2 s, and a child that crashes or is killed becomes a recorded failure while this process
(the bridge) carries on. The builder in the child is TensorRT's recording fake
(tests/fake_tensorrt.py) or, for crashes and slow builds, a backend below that behaves so."""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.engine.accel.engine_cache import BuilderSettings, DeviceInfo, EngineCache
from bridge.engine.accel.isolated import BuildProcessDied, ChildProcessBuilds
from bridge.engine.accel.onnx_export import Component, ExportSpec, vae_decoder_spec
from bridge.engine.accel.tensorrt import (
    BuildCancelled,
    BuildProgress,
    TensorRTBackend,
    prepare_engines,
)
from tests.fake_tensorrt import make_fake_tensorrt

SIZE = 64
GPU = DeviceInfo("NVIDIA H200", (9, 0))


# ---------------------------------------------------------------- what runs in the child
def fake_tensorrt_backend(fail_build: str | None = None) -> TensorRTBackend:
    """The child's backend: TensorRTBackend on a fresh recording fake of TensorRT."""
    fake = make_fake_tensorrt()
    fake.fail_build = fail_build
    return TensorRTBackend(fake, stream=lambda: 0)


class MisbehavingBackend:
    """A builder that reports one phase, then dies the way a native builder can (`how`: a
    signal to itself) or keeps timing layers slowly ("slow": one step every 0.2 s for a minute)."""

    name = "tensorrt"
    version = "11.1.0"

    def __init__(self, how: str) -> None:
        self.how = how

    def build(
        self,
        onnx_path: Path,
        spec: ExportSpec,
        *,
        settings: BuilderSettings,
        timing_cache: bytes,
        progress: BuildProgress,
    ) -> tuple[bytes, bytes]:
        progress.phase_start("Timing layers", None, 300)
        progress.step_complete("Timing layers", 0)
        if self.how == "slow":
            for step in range(1, 300):
                time.sleep(0.2)
                progress.step_complete("Timing layers", step)
            raise AssertionError("the slow build was never stopped")
        os.kill(os.getpid(), getattr(signal, self.how))
        time.sleep(30)
        raise AssertionError(f"{self.how} did not end the process")


def misbehaving_backend(how: str) -> MisbehavingBackend:
    return MisbehavingBackend(how)


# ---------------------------------------------------------------- helpers
def _isolated(factory: Any) -> tuple[ChildProcessBuilds, Any]:
    here = make_fake_tensorrt()  # the parent's TensorRT: loads only
    return ChildProcessBuilds(TensorRTBackend(here, stream=lambda: 0xC0FFEE), factory), here


def _prepare(pipe: Any, root: Path, backend: Any, **kwargs: Any) -> Any:
    spec = vae_decoder_spec(pipe.vae, width=SIZE, height=SIZE, rows=(1, 2))
    return prepare_engines(
        pipe, [spec], model="tiny", cache_root=root, backend=backend, device=GPU, bars=False, **kwargs
    )


def _onnx(pipe: Any, tmp_path: Path) -> tuple[Path, ExportSpec]:
    from bridge.engine.accel.onnx_export import export_onnx

    spec = vae_decoder_spec(pipe.vae, width=SIZE, height=SIZE, rows=(1,))
    return export_onnx(pipe, spec, tmp_path / "k" / "onnx" / "model.onnx"), spec


def _build(backend: ChildProcessBuilds, onnx_path: Path, spec: ExportSpec, progress: BuildProgress) -> Any:
    return backend.build(onnx_path, spec, settings=BuilderSettings(), timing_cache=b"", progress=progress)


# ---------------------------------------------------------------- tests
def test_the_plan_built_in_the_child_loads_and_runs_here(
    tiny_pipe: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend, here = _isolated(fake_tensorrt_backend)
    with caplog.at_level(logging.INFO):
        report = _prepare(tiny_pipe, tmp_path, backend)
    assert report.ok, report.fallbacks
    ready = report.ready[Component.VAE_DECODER]
    assert ready.built and ready.plan_path.is_file()
    assert all(c >= 0.999 for c in ready.cosine.values())
    names = [c[0] for c in here.calls]
    # Built over there: this process's TensorRT only deserialized and ran the plan.
    assert "build_serialized_network" not in names and "parse_from_file" not in names
    assert "deserialize_cuda_engine" in names and "execute_async_v3" in names
    # The child's progress reached this process's BuildProgress (its log lines), in order.
    logged = [r.getMessage() for r in caplog.records if r.name == "bridge.engine.accel.tensorrt"]
    phases = [
        m.removeprefix("tensorrt vae_decoder: ") for m in logged if m.startswith("tensorrt vae_decoder:")
    ]
    # The fake's build: one phase over both profiles, the layers timed once per profile.
    assert phases == ["Building engine (2 steps)", "Timing layers (4 steps)", "Timing layers (4 steps)"]
    assert "building the vae_decoder engine in child process" in caplog.text
    assert not list(tmp_path.glob("*/engine.plan.part"))  # the hand-over file is gone
    assert list(tmp_path.glob("timing-tensorrt-11.1.0-*.cache"))  # the child's timing cache, kept


def test_a_failed_build_in_the_child_says_why(tiny_pipe: Any, tmp_path: Path) -> None:
    factory = functools.partial(
        fake_tensorrt_backend, fail_build="Error Code 4: API Usage Error (unsupported op)"
    )
    backend, _ = _isolated(factory)
    reason = _prepare(tiny_pipe, tmp_path, backend).fallbacks[Component.VAE_DECODER]
    assert "BuildFailed: TensorRT could not build the vae_decoder engine" in reason
    assert "Error Code 4: API Usage Error (unsupported op)" in reason
    assert "BuildFailed: BuildFailed" not in reason  # the child's exception is not wrapped twice


@pytest.mark.parametrize(
    ("how", "said", "transient"),
    [
        ("SIGSEGV", "was killed by SIGSEGV", False),
        ("SIGABRT", "was killed by SIGABRT", False),
        ("SIGKILL", "was killed by SIGKILL (the kernel's out-of-memory killer", True),
    ],
)
def test_a_crashing_builder_leaves_this_process_running(
    tiny_pipe: Any, tmp_path: Path, how: str, said: str, transient: bool
) -> None:
    onnx_path, spec = _onnx(tiny_pipe, tmp_path)
    backend, _ = _isolated(functools.partial(misbehaving_backend, how))
    progress = BuildProgress("tensorrt vae_decoder", bars=False)
    with pytest.raises(BuildProcessDied) as died:
        _build(backend, onnx_path, spec, progress)
    assert said in str(died.value) and "the bridge carried on" in str(died.value)
    assert died.value.transient is transient
    assert progress.phases == [("Timing layers", 300)]  # what it reported before it died came through

    # Through prepare_engines: the torch path, the reason, and a record (retried only when temporary).
    report = _prepare(tiny_pipe, tmp_path / "cache", backend)
    assert said in report.fallbacks[Component.VAE_DECODER]
    ((_folder, noted, retried),) = EngineCache(tmp_path / "cache").recorded_failures()
    assert said in noted and ("retried at the next start" in noted) is transient and retried is transient


def test_a_stop_terminates_the_child_within_2_s(tiny_pipe: Any, tmp_path: Path) -> None:
    onnx_path, spec = _onnx(tiny_pipe, tmp_path)
    backend, _ = _isolated(functools.partial(misbehaving_backend, "slow"))
    cancel = threading.Event()
    progress = BuildProgress("tensorrt vae_decoder", cancel=cancel, bars=False)
    children: list[int] = []
    asked: list[float] = []  # when the stop was asked for

    def stop_once_building() -> None:
        while not progress.phases:  # the child is up and timing layers
            time.sleep(0.05)
        import multiprocessing

        children.extend(p.pid for p in multiprocessing.active_children() if p.pid is not None)
        asked.append(time.monotonic())
        cancel.set()

    threading.Thread(target=stop_once_building, daemon=True).start()
    with pytest.raises(BuildCancelled, match="the vae_decoder engine build was stopped"):
        _build(backend, onnx_path, spec, progress)
    assert time.monotonic() - asked[0] < 2.0  # the child terminated and reaped: generous, ~0.1 s here
    assert progress.cancelled
    assert len(children) == 1
    with pytest.raises(ProcessLookupError):  # reaped: not even a zombie is left
        os.kill(children[0], 0)

    # Through prepare_engines, a stop propagates and records nothing: the next start builds again.
    cancel.clear()
    threading.Timer(1.0, cancel.set).start()
    with pytest.raises(BuildCancelled):
        _prepare(tiny_pipe, tmp_path / "cache", backend, cancel=cancel)
    assert EngineCache(tmp_path / "cache").recorded_failures() == []
