"""Engine builds in a child process (bridge/engine/accel/isolated.py), with real spawned
processes: the plan built there loads here, progress arrives here, a stop terminates the child
within 2 s, and a child that crashes or is killed becomes a recorded failure while this process
(the bridge) carries on. The builder in the child is TensorRT's recording fake
(tests/fake_tensorrt.py) or, for crashes and slow builds, a backend below that behaves so."""

from __future__ import annotations

import errno
import functools
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.engine.accel.backend import BuildCancelled, BuildProgress
from bridge.engine.accel.engine_cache import BuilderSettings, DeviceInfo, EngineCache
from bridge.engine.accel.isolated import BuildProcessDied, ChildProcessBuilds
from bridge.engine.accel.onnx_export import Component, ExportSpec, vae_decoder_spec
from bridge.engine.accel.prepare import prepare_engines
from bridge.engine.accel.tensorrt import TensorRTBackend
from tests.fake_tensorrt import FakeStreams, make_fake_tensorrt

SIZE = 64
GPU = DeviceInfo("NVIDIA H200", (9, 0))


# ---------------------------------------------------------------- what runs in the child
def fake_tensorrt_backend(fail_build: str | None = None) -> TensorRTBackend:
    """The child's backend: TensorRTBackend on a fresh recording fake of TensorRT."""
    fake = make_fake_tensorrt()
    fake.fail_build = fail_build
    return TensorRTBackend(fake, streams=FakeStreams(0))


class MisbehavingBackend:
    """A builder that reports one phase, then (`how`) dies the way a native builder can (a
    signal's name: sent to itself), keeps timing layers slowly ("slow": one step every 0.2 s for
    a minute), finds the disk full ("disk full"), or logs a warning and returns a plan ("logs")."""

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
        if self.how == "logs":
            logging.getLogger("bridge.engine.accel.tensorrt").warning("the stored timing cache does not fit")
            return b"PLAN" * 1000, b"TIMING"
        if self.how == "disk full":
            raise OSError(errno.ENOSPC, "No space left on device")
        if self.how == "slow":
            for step in range(1, 300):
                time.sleep(0.2)
                progress.step_complete("Timing layers", step)
            raise AssertionError("the slow build was never stopped")
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files on the test machine
        os.kill(os.getpid(), getattr(signal, self.how))
        time.sleep(30)
        raise AssertionError(f"{self.how} did not end the process")


def misbehaving_backend(how: str) -> MisbehavingBackend:
    return MisbehavingBackend(how)


# ---------------------------------------------------------------- helpers
def _isolated(factory: Any) -> tuple[ChildProcessBuilds, Any]:
    here = make_fake_tensorrt()  # the parent's TensorRT: loads only
    return ChildProcessBuilds(TensorRTBackend(here, streams=FakeStreams(0xC0FFEE)), factory), here


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
    logged = [r.getMessage() for r in caplog.records if r.name == "bridge.engine.accel.backend"]
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
        ("SIGTERM", "was killed by SIGTERM", True),  # from outside: a stop sent to the process group
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
    asked: list[float] = []  # when the stop was asked for

    def stop_once_building() -> None:
        while not progress.phases:  # the child is up and timing layers
            time.sleep(0.05)
        asked.append(time.monotonic())
        cancel.set()

    threading.Thread(target=stop_once_building, daemon=True).start()
    with pytest.raises(BuildCancelled, match="the vae_decoder engine build was stopped"):
        _build(backend, onnx_path, spec, progress)
    assert time.monotonic() - asked[0] < 2.0  # the child terminated and reaped: generous, ~0.1 s here
    assert progress.cancelled and backend.pid is not None
    with pytest.raises(ProcessLookupError):  # reaped: not even a zombie is left
        os.kill(backend.pid, 0)
    assert not list(tmp_path.glob("k/onnx/*.plan.part"))

    # Through prepare_engines, a stop propagates and records nothing: the next start builds again.
    cancel.clear()
    threading.Timer(1.0, cancel.set).start()
    with pytest.raises(BuildCancelled):
        _prepare(tiny_pipe, tmp_path / "cache", backend, cancel=cancel)
    assert EngineCache(tmp_path / "cache").recorded_failures() == []


def test_a_temporary_failure_the_child_reports_stays_temporary(tiny_pipe: Any, tmp_path: Path) -> None:
    """A full disk while the child writes a plan of gigabytes is worth a retry: the kind of the
    child's exception must survive the trip back."""
    backend, _ = _isolated(functools.partial(misbehaving_backend, "disk full"))
    reason = _prepare(tiny_pipe, tmp_path, backend).fallbacks[Component.VAE_DECODER]
    assert "OSError: [Errno 28] No space left on device" in reason
    ((_folder, noted, retried),) = EngineCache(tmp_path).recorded_failures()
    assert retried and "retried at the next start, attempt 1 of 3" in noted


def test_the_child_s_log_and_plan_arrive_here(
    tiny_pipe: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    onnx_path, spec = _onnx(tiny_pipe, tmp_path)
    backend, _ = _isolated(functools.partial(misbehaving_backend, "logs"))
    with caplog.at_level(logging.INFO):
        plan, timing = _build(backend, onnx_path, spec, BuildProgress("tensorrt vae_decoder", bars=False))
    assert plan == b"PLAN" * 1000 and timing == b"TIMING"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [(r.name, r.getMessage()) for r in warned] == [
        ("bridge.engine.accel.tensorrt", "[build process] the stored timing cache does not fit")
    ]
    assert not list(onnx_path.parent.glob("*.plan.part"))  # the hand-over file is gone


_PARENT = """
import functools, logging, sys, threading, time
from pathlib import Path
from bridge.engine.accel.engine_cache import BuilderSettings
from bridge.engine.accel.backend import BuildProgress
from tests.test_accel_isolated import _isolated, misbehaving_backend, fake_tensorrt_backend
from bridge.engine.accel.onnx_export import Component, ExportSpec
import pickle

with open(sys.argv[1], "a") as marker:  # the top level of a script with no main guard
    marker.write("ran\\n")
onnx_path, spec = pickle.loads(Path(sys.argv[2]).read_bytes())
backend, _ = _isolated(functools.partial(misbehaving_backend, sys.argv[3]))
progress = BuildProgress("t", bars=False)
if sys.argv[3] == "slow":
    def say_pid():
        while backend.pid is None or not progress.phases:
            time.sleep(0.05)
        print(backend.pid, flush=True)
    threading.Thread(target=say_pid, daemon=True).start()
plan, timing = backend.build(onnx_path, spec, settings=BuilderSettings(), timing_cache=b"", progress=progress)
print("built", len(plan), flush=True)
"""


def _parent_script(tiny_pipe: Any, tmp_path: Path, how: str) -> subprocess.Popen[str]:
    import pickle

    onnx_path, spec = _onnx(tiny_pipe, tmp_path)
    (tmp_path / "args.pickle").write_bytes(pickle.dumps((onnx_path, spec)))
    (tmp_path / "parent.py").write_text(_PARENT)
    root = Path(__file__).parent.parent
    return subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "parent.py"),
            str(tmp_path / "marker"),
            str(tmp_path / "args.pickle"),
            how,
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_script_without_a_main_guard_runs_once(tiny_pipe: Any, tmp_path: Path) -> None:
    """spawn would import the user's script again in the build's child; it must not."""
    parent = _parent_script(tiny_pipe, tmp_path, "logs")
    out, _ = parent.communicate(timeout=120)
    assert parent.returncode == 0 and "built 4000" in out
    assert (tmp_path / "marker").read_text() == "ran\n"


def test_the_build_ends_when_the_bridge_dies(tiny_pipe: Any, tmp_path: Path) -> None:
    """A bridge killed mid-build (SIGKILL: no clean-up runs) must not leave its build running,
    holding the GPU and racing the next start's build of the same engine."""
    parent = _parent_script(tiny_pipe, tmp_path, "slow")
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            if _is_zombie(child):  # ended; init reaps it (its parent is gone)
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("the build's child outlived the bridge by 10 s")
    finally:
        parent.kill()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return False
