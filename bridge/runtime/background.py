"""Running a bridge on a thread of its own, for the benchmark and the tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from bridge.runtime.loop import Bridge
from bridge.runtime.status import OutputInfo


@contextmanager
def in_background(bridge: Bridge, *, start_timeout_s: float = 300.0) -> Iterator[list[OutputInfo]]:
    """Run `bridge` on a thread of its own (the benchmark and tests drive it from outside).

    Yields the list every output's `OutputInfo` is appended to, once the state is "running".
    On exit: stop, join, and re-raise whatever `run` raised; a bridge that did not start or
    did not stop is a RuntimeError."""
    infos: list[OutputInfo] = []
    bridge.on_output(lambda _frame, info: infos.append(info))
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            bridge.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="bridge")
    thread.start()
    try:
        if not bridge.ready.wait(start_timeout_s):
            raise RuntimeError(f"the bridge did not start within {start_timeout_s:.0f} s: {errors}")
        yield infos
    finally:
        stop.set()
        thread.join(30)
        if errors:
            raise errors[0]
        if thread.is_alive():
            raise RuntimeError("the bridge did not stop within 30 s")
