"""Engine builds in a child process, so that a crash or an out-of-memory kill in the builder
never takes the bridge down with it.

TensorRT's builder runs for minutes in native code. There it can segfault, abort, or grow until
the kernel's out-of-memory killer ends the process; in-process, any of these would end the
bridge as well, before `prepare_engines` could record the failure, so the next start would build
(and die) again. `ChildProcessBuilds` wraps a `Backend`: its `build` runs the wrapped backend's
build in a spawned child, and `load` (fast, needed here for the frames) and
`merge_timing_caches` (short, after the child is gone) stay in this process.

- The child is made by `factory`, a picklable callable (a top-level function, or a
  `functools.partial` of one) that returns the backend to build with; the parent's backend
  object itself, which holds CUDA stream handles and the imported module, is not sent.
- Progress: the child forwards each `IProgressMonitor` callback over a pipe; the parent hands it
  to its own `BuildProgress` (the bars and log lines appear here, as before).
- A stop request (`progress.cancel`) terminates the child (SIGTERM, then SIGKILL after
  `TERMINATE_GRACE_S`) and raises `BuildCancelled`: nothing is recorded.
- A child that dies without a result raises `BuildProcessDied` naming how it ended (the signal,
  or the exit code), which `prepare_engines` records like any other failed build: a crash in
  native code (SIGSEGV, SIGABRT, ...) for good, an end from outside (SIGKILL from the
  out-of-memory killer, SIGTERM or SIGINT to the process group, an exit before it could report)
  as temporary. A failure the child reports keeps its kind (`is_transient`).
- The child watches its parent: if the bridge dies, the build ends too, rather than holding the
  GPU for minutes and racing the next start's build.
- The child's log records come over the pipe into this process's logging.
- The plan travels through a file of its own beside the ONNX (`engine.*.plan.part`), not the
  pipe: a full-size UNet's plan is gigabytes.
- spawn would import the parent's `__main__` again in the child; a user's script without a
  main guard would then run a second time there. The child needs nothing from it, so it is
  started without it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bridge.engine.accel.backend import (
    Backend,
    BuildCancelled,
    BuildFailed,
    BuildProgress,
    Runner,
    is_transient,
    shielded,
)
from bridge.engine.accel.engine_cache import BuilderSettings
from bridge.engine.accel.onnx_export import ExportSpec

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often the parent looks at the pipe, the child and the stop request
TERMINATE_GRACE_S = 0.5  # SIGTERM, then this long before SIGKILL (a stop ends within 2 s)
# The progress callbacks the child relays, with what each returns when the display fails.
_RELAYED: dict[str, Any] = {"phase_start": None, "step_complete": True, "phase_finish": None}
# Deaths that are the builder's own crash in native code: the same build would crash again.
CRASH_SIGNALS = {"SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE"}


class BuildProcessDied(BuildFailed):
    """The build's child process ended without a result: `transient` unless it crashed (see
    CRASH_SIGNALS); killed from outside, it is worth a retry at the next start."""


def _signal_name(exitcode: int | None) -> str | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def _ended(exitcode: int | None) -> str:
    """How a child process ended, in words."""
    if exitcode is None:
        return "did not end"
    name = _signal_name(exitcode)
    if name is None:
        return f"exited with code {exitcode}"
    why = " (the kernel's out-of-memory killer ends processes this way)" if name == "SIGKILL" else ""
    return f"was killed by {name}{why}"


class _ForwardingProgress(BuildProgress):
    """The child's `BuildProgress`: every callback goes over the pipe (TensorRT calls these from
    its own threads, so sends are serialised). A pipe that broke (the parent is gone) cancels
    the build; otherwise the parent never asks the child to cancel: it terminates it."""

    def __init__(self, title: str, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__(title, bars=False)
        self._send = send
        self._sending = threading.Lock()

    def forward(self, message: tuple[Any, ...]) -> None:
        with self._sending:
            try:
                self._send(message)
            except (OSError, ValueError):  # broken pipe, or closed: nobody is waiting any more
                self.cancel.set()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        self.forward(("phase_start", phase_name, parent_phase, num_steps))

    def step_complete(self, phase_name: str, step: int) -> bool:
        self.forward(("step_complete", phase_name, step))
        if self.cancel.is_set():
            self.cancelled = True
            return False
        return True

    def phase_finish(self, phase_name: str) -> None:
        self.forward(("phase_finish", phase_name))


class _PipeLog(logging.Handler):
    """The child's log records, sent to the parent's logging as (level, logger, message)."""

    def __init__(self, progress: _ForwardingProgress) -> None:
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.forward(("log", record.levelno, record.name, record.getMessage()))


def _end_with_parent() -> None:
    """In the child: exit as soon as the parent process is gone (its sentinel, on every OS)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


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
    """The child: build, write the plan to `plan_path`, send ("done", timing) or
    ("failed", text, transient)."""
    # Ctrl+C reaches the whole process group; the parent decides, and terminates this child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _end_with_parent()
    progress = _ForwardingProgress(spec.component.value, conn.send)
    root = logging.getLogger()
    root.addHandler(_PipeLog(progress))
    root.setLevel(logging.INFO)
    try:
        if device_index is not None:
            import torch

            torch.cuda.set_device(device_index)  # the builder times its tactics on the engine's GPU
        backend = factory()
        plan, timing = backend.build(
            onnx_path, spec, settings=settings, timing_cache=timing_cache, progress=progress
        )
        if progress.cancelled:
            return  # the parent is gone; nobody reads a result
        plan_path.write_bytes(plan)
        progress.forward(("done", timing))
    except BaseException as exc:  # every failure goes back as text; the parent raises BuildFailed
        kind = "" if isinstance(exc, BuildFailed) else f"{type(exc).__name__}: "
        progress.forward(("failed", f"{kind}{exc}"[:600], is_transient(exc)))
    finally:
        conn.close()


@contextlib.contextmanager
def _without_main() -> Iterator[None]:
    """spawn imports the parent's `__main__` again in the child (as `__mp_main__`): a script
    without a main guard would run a second time there. Started while this is in effect, the
    child imports only what its target needs."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class ChildProcessBuilds:
    """A `Backend` whose builds run in a spawned child process (see the module docstring)."""

    def __init__(self, backend: Backend, factory: Callable[[], Backend], *, device_index: int | None = None):
        self.backend = backend
        self.factory = factory
        self.device_index = device_index
        self.name = backend.name
        self.version = backend.version
        self.pid: int | None = None  # the last build's child process

    def load(self, plan: bytes, spec: ExportSpec) -> Runner:
        return self.backend.load(plan, spec)

    def merge_timing_caches(self, ours: bytes, theirs: bytes) -> bytes:
        return self.backend.merge_timing_caches(ours, theirs)  # here: short, and no build

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
        handle, part = tempfile.mkstemp(dir=Path(onnx_path).parent, prefix="engine.", suffix=".plan.part")
        os.close(handle)
        plan_path = Path(part)
        context = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA
        parent_conn, child_conn = context.Pipe(duplex=False)
        args = (
            child_conn,
            self.factory,
            onnx_path,
            spec,
            settings,
            timing_cache,
            plan_path,
            self.device_index,
        )
        # daemon: multiprocessing ends it if the bridge exits mid-build
        child = context.Process(target=_child_main, args=args, name=f"sdbridge-build-{title}", daemon=True)
        started = time.monotonic()
        try:
            with _without_main():
                child.start()
            child_conn.close()  # the child holds the only writing end: EOF once it is gone
            self.pid = child.pid
            log.info("building the %s engine in child process %d", title, child.pid)
            try:
                outcome = self._follow(child, parent_conn, progress, title)
            finally:
                parent_conn.close()
                if child.is_alive():
                    _stop(child)
            kind, *rest = outcome
            if kind == "died":
                name = _signal_name(child.exitcode)
                raise BuildProcessDied(rest[0], transient=name not in CRASH_SIGNALS)
            if kind == "failed":
                raise BuildFailed(rest[0], transient=bool(rest[1]))  # the child's kind, kept
            plan = plan_path.read_bytes()
        finally:
            plan_path.unlink(missing_ok=True)
        log.info("the %s engine was built in %.0f s", title, time.monotonic() - started)
        return plan, rest[0]

    def _follow(self, child: Any, conn: Any, progress: BuildProgress, title: str) -> tuple[Any, ...]:
        """Relay the child's progress and log until it sends its result: ("done", timing cache),
        ("failed", why, transient) or, when it ended without one, ("died", how)."""
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
                return tuple(message)
            if kind == "log":
                level, name, text = args
                logging.getLogger(name).log(level, "[build process] %s", text)
            elif kind in _RELAYED:
                shielded(progress, functools.partial(getattr(progress, kind), *args), _RELAYED[kind])
        child.join(5.0)
        return (
            "died",
            f"the {title} engine's build process {_ended(child.exitcode)} before it finished "
            f"(a crash or an out-of-memory kill in the builder); the bridge carried on",
        )


def _stop(child: Any) -> None:
    """SIGTERM, then SIGKILL: a stopped build ends within about 2 x TERMINATE_GRACE_S."""
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
