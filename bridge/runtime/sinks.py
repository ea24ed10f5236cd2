"""The sink runner: one output on its own thread, opened, written, reopened after failures and
closed there."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from bridge.config import SinkConfig
from bridge.control.status import RateLimitedLog
from bridge.frames import Frame
from bridge.runtime.closing import close_logged
from bridge.runtime.mailbox import Mailbox
from bridge.transports.base import MissingExtra, Sink, TransportUnavailable

log = logging.getLogger(__name__)

# How long the start waits for each output's first open (a virtual camera or an NDI sender
# takes a moment); one still opening after this is reported and keeps trying.
SINK_OPEN_WAIT_S = 10.0
BLOCKED_REPORT_S = 1.0  # a write running longer than this is reported in status

# Errors that no retry can fix: the config or the machine must change. A sink or source that
# raises one of these when first opened stops the bridge at start with that message.
FINAL_ERRORS: tuple[type[BaseException], ...] = (MissingExtra, TransportUnavailable, ValueError)


class SinkRunner:
    """One sink on its own thread, which opens it, writes to it and closes it, so a medium
    whose state belongs to one thread (Spout's OpenGL context) gets that. A write that raises
    is counted, logged (rate-limited), reported in status, and the next frame is tried again;
    after `reopen_after` failures in a row the sink is closed and opened again, with a growing
    pause between attempts. A write that blocks stalls only this thread: newer frames replace
    the waiting one (counted as dropped) and status says how long the write has been stuck."""

    def __init__(
        self,
        label: str,
        opener: Callable[[], Sink],
        *,
        reopen_after: int = 3,
        backoff_s: Sequence[float] = (0.5, 1.0, 2.0, 5.0),
    ) -> None:
        self.label = label
        self.opener = opener
        self.sink: Sink | None = None
        self.box: Mailbox[Frame] = Mailbox()
        self.state = "opening"  # opening | open | reopening | failed
        self.written = 0
        self.failures = 0
        self.opens = 0
        self.last_error = ""
        self.write_ms: deque[float] = deque(maxlen=120)
        self.busy_since: float | None = None  # perf_counter when the current write began
        self._reopen_after = reopen_after
        self._backoff = tuple(backoff_s)
        self._stop = threading.Event()
        self._first_open = threading.Event()
        self._final: BaseException | None = None
        self._log = RateLimitedLog(log)
        self._thread = threading.Thread(target=self._run, name=f"sink-{label}", daemon=True)
        self._thread.start()

    def wait_open(self, timeout_s: float) -> None:
        """Wait for the first open. Raises its error when it is final (FINAL_ERRORS); any other
        failure leaves the runner retrying in the background, reported in status."""
        self._first_open.wait(timeout_s)
        if self._final is not None:
            raise self._final

    def blocked_s(self) -> float:
        """How long the write in progress has been running (0 when none is)."""
        since = self.busy_since
        return 0.0 if since is None else time.perf_counter() - since

    def _open(self, attempt: int) -> bool:
        try:
            self.sink = self.opener()
        except FINAL_ERRORS as exc:
            if attempt == 0:
                self._final = exc
                self.state = "failed"
                return False
            self._failed(exc, "open")
            return False
        except Exception as exc:
            self._failed(exc, "open")
            return False
        self.opens += 1
        self.state = "open"
        if attempt:
            log.info("output %s is open again", self.label)
        return True

    def _failed(self, exc: BaseException, during: str) -> None:
        self.failures += 1
        self.last_error = f"output {self.label}: {type(exc).__name__}: {exc}"
        self._log.warning(self.label, f"{self.last_error} ({during} failed; retrying)")

    def _close_sink(self) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            close_logged(self.label, sink)

    def _run(self) -> None:
        attempt = 0
        try:
            opened = self._open(attempt)
            self._first_open.set()
            if self._final is not None:
                return
            in_a_row = 0
            while not self._stop.is_set():
                if not opened:
                    pause = self._backoff[min(attempt, len(self._backoff) - 1)]
                    self.state = "reopening"
                    if self._stop.wait(pause):
                        return
                    attempt += 1
                    opened = self._open(attempt)
                    in_a_row = 0
                    continue
                attempt = 0
                frame = self.box.get(0.1)
                if frame is None or self.sink is None:
                    continue
                t0 = self.busy_since = time.perf_counter()
                try:
                    self.sink.write(frame)
                except Exception as exc:
                    self._failed(exc, "write")
                    in_a_row += 1
                    if in_a_row >= self._reopen_after:
                        self._close_sink()
                        opened = False
                    continue
                finally:
                    self.busy_since = None
                in_a_row = 0
                self.write_ms.append(1000 * (time.perf_counter() - t0))
                self.written += 1
                self.last_error = ""  # it works again: the old error is no longer true
        finally:
            self._first_open.set()
            self._close_sink()

    def stop(self, timeout_s: float) -> None:
        """Stop the thread; it closes the sink. A thread stuck in a write past `timeout_s`
        is left behind (daemon) and the sink is closed from here instead."""
        self._stop.set()
        self.box.close()
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            log.warning(
                "output %s did not finish its write within %.1f s; closing it anyway", self.label, timeout_s
            )
            self._close_sink()


def sink_problem(runner: SinkRunner) -> str:
    """The sink's current trouble for the status line, "" when it is fine."""
    blocked = runner.blocked_s()
    if blocked >= BLOCKED_REPORT_S:
        return f"output {runner.label}: a write has been blocked for {blocked:.1f} s"
    if runner.state != "open":
        return runner.last_error or f"output {runner.label}: {runner.state}"
    return runner.last_error


def sink_label(index: int, cfg: SinkConfig) -> str:
    """The output's name in status: its kind, with `#index` after the first."""
    return cfg.kind if index == 0 else f"{cfg.kind}#{index}"
