"""Engine builds in a child process, so that a crash or an out-of-memory kill in the builder
never takes the bridge down with it.

TensorRT's builder runs for minutes in native code. There it can segfault, abort, or grow until
the kernel's out-of-memory killer ends the process; in-process, any of these would end the
bridge as well, before `prepare_engines` could record the failure, so the next start would build
(and die) again. `ChildProcessBuilds` wraps a `Backend`: its `build` runs the wrapped backend's
build in a spawned child, and `load` (fast, needed here for the frames) stays in this process.

- The child is made by `factory`, a picklable callable (a top-level function, or a
  `functools.partial` of one) that returns the backend to build with; the parent's backend
  object itself, which holds CUDA stream handles and the imported module, is not sent.
- Progress: the child forwards each `IProgressMonitor` callback over a pipe; the parent hands it
  to its own `BuildProgress` (the bars and log lines appear here, as before).
- A stop request (`progress.cancel`) terminates the child (SIGTERM, then SIGKILL after
  `TERMINATE_GRACE_S`) and raises `BuildCancelled`: nothing is recorded.
- A child that dies without a result raises `BuildFailed` naming how it ended (the signal, or
  the exit code), which `prepare_engines` records like any other failed build.
- The plan travels through a file beside the cache's (`<folder>/engine.plan.part`), not the pipe:
  a full-size UNet's plan is gigabytes.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.engine.accel.engine_cache import BuilderSettings
from bridge.engine.accel.onnx_export import ExportSpec
from bridge.engine.accel.tensorrt import Backend, BuildCancelled, BuildFailed, BuildProgress, Runner

log = logging.getLogger(__name__)


class BuildProcessDied(BuildFailed):
    """The build's child process ended without a result. `transient` when it was killed by
    SIGKILL, which is how the kernel's out-of-memory killer ends a process: worth a retry."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


POLL_S = 0.1  # how often the parent looks at the pipe, the child and the stop request
TERMINATE_GRACE_S = 1.0  # SIGTERM, then this long before SIGKILL (a stop ends within 2 s)


def _ended(exitcode: int | None) -> str:
    """How a child process ended, in words."""
    if exitcode is None:
        return "did not end"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = " (the kernel's out-of-memory killer ends processes this way)" if name == "SIGKILL" else ""
        return f"was killed by {name}{why}"
    return f"exited with code {exitcode}"


class _ForwardingProgress(BuildProgress):
    """The child's `BuildProgress`: every callback goes over the pipe (TensorRT calls these from
    its own threads, so sends are serialised). The parent never asks the child to cancel: it
    terminates it."""

    def __init__(self, title: str, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__(title, bars=False)
        self._send = send
        self._sending = threading.Lock()

    def _forward(self, message: tuple[Any, ...]) -> None:
        with self._sending:
            self._send(message)

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        self._forward(("phase_start", phase_name, parent_phase, num_steps))

    def step_complete(self, phase_name: str, step: int) -> bool:
        self._forward(("step_complete", phase_name, step))
        return True

    def phase_finish(self, phase_name: str) -> None:
        self._forward(("phase_finish", phase_name))


def _child_main(
    conn: Any,
    factory: Callable[[], Backend],
    onnx_path: Path,
    spec: ExportSpec,
    settings: BuilderSettings,
    timing_cache: bytes,
    plan_path: Path,
    device_index: int | None,
) -> None:
    """The child: build, write the plan to `plan_path`, send ("done", timing) or ("failed", text)."""
    # Ctrl+C reaches the whole process group; the parent decides, and terminates this child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if device_index is not None:
            import torch

            torch.cuda.set_device(device_index)  # the builder times its tactics on the engine's GPU
        backend = factory()
        progress = _ForwardingProgress(spec.component.value, conn.send)
        plan, timing = backend.build(
            onnx_path, spec, settings=settings, timing_cache=timing_cache, progress=progress
        )
        plan_path.write_bytes(plan)
        conn.send(("done", timing))
    except BaseException as exc:  # every failure goes back as text; the parent raises BuildFailed
        kind = "" if isinstance(exc, BuildFailed) else f"{type(exc).__name__}: "
        conn.send(("failed", f"{kind}{exc}"[:600]))
    finally:
        conn.close()


class ChildProcessBuilds:
    """A `Backend` whose builds run in a spawned child process (see the module docstring)."""

    def __init__(self, backend: Backend, factory: Callable[[], Backend], *, device_index: int | None = None):
        self.backend = backend
        self.factory = factory
        self.device_index = device_index
        self.name = backend.name
        self.version = backend.version

    def load(self, plan: bytes, spec: ExportSpec) -> Runner:
        return self.backend.load(plan, spec)

    def build(
        self,
        onnx_path: Path,
        spec: ExportSpec,
        *,
        settings: BuilderSettings,
        timing_cache: bytes,
        progress: BuildProgress,
    ) -> tuple[bytes, bytes]:
        title = spec.component.value
        plan_path = Path(onnx_path).parent.parent / "engine.plan.part"
        plan_path.unlink(missing_ok=True)
        context = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA
        parent_conn, child_conn = context.Pipe(duplex=False)
        child = context.Process(
            target=_child_main,
            args=(
                child_conn,
                self.factory,
                onnx_path,
                spec,
                settings,
                timing_cache,
                plan_path,
                self.device_index,
            ),
            name=f"sdbridge-build-{title}",
            daemon=True,  # ended by multiprocessing when the bridge exits mid-build
        )
        started = time.monotonic()
        child.start()
        child_conn.close()  # the child holds the only writing end: EOF once it is gone
        log.info("building the %s engine in child process %d", title, child.pid)
        try:
            outcome = self._follow(child, parent_conn, progress, title)
        finally:
            parent_conn.close()
            if child.is_alive():
                _stop(child)
        if outcome[0] != "done":
            plan_path.unlink(missing_ok=True)
            if outcome[0] == "died":
                raise BuildProcessDied(outcome[1], transient=child.exitcode == -signal.SIGKILL)
            raise BuildFailed(outcome[1])
        plan = plan_path.read_bytes()
        plan_path.unlink(missing_ok=True)
        log.info("the %s engine was built in %.0f s", title, time.monotonic() - started)
        return plan, outcome[1]

    def _follow(self, child: Any, conn: Any, progress: BuildProgress, title: str) -> tuple[str, Any]:
        """Relay the child's progress until it sends its result: ("done", timing cache),
        ("failed", why) or, when it ended without one, ("died", how)."""
        while True:
            if progress.cancel.is_set():
                _stop(child)
                progress.cancelled = True
                raise BuildCancelled(f"the {title} engine build was stopped")
            if not conn.poll(POLL_S):
                if not child.is_alive() and not conn.poll(0):
                    break
                continue
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind, *args = message
            if kind in ("done", "failed"):
                child.join(5.0)
                return kind, args[0]
            if kind == "phase_start":
                progress.phase_start(*args)
            elif kind == "step_complete":
                progress.step_complete(*args)
            elif kind == "phase_finish":
                progress.phase_finish(*args)
        child.join(5.0)
        return (
            "died",
            f"the {title} engine's build process {_ended(child.exitcode)} before it finished "
            f"(a crash or an out-of-memory kill in the builder); the bridge carried on",
        )


def _stop(child: Any) -> None:
    """SIGTERM, then SIGKILL: a stopped build ends within TERMINATE_GRACE_S plus a little."""
    child.terminate()
    child.join(TERMINATE_GRACE_S)
    if child.is_alive():
        child.kill()
        child.join(TERMINATE_GRACE_S)


def tensorrt_backend() -> Backend:
    """The child's backend for real builds: TensorRT itself (imported in the child)."""
    from bridge.engine.accel.tensorrt import TensorRTBackend

    return TensorRTBackend()


__all__ = ["BuildProcessDied", "ChildProcessBuilds", "tensorrt_backend"]
