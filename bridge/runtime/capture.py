"""The capture runner: the source on its own thread, feeding the newest frame into a mailbox."""

from __future__ import annotations

import logging
import threading

from bridge.control.status import RateLimitedLog
from bridge.frames import Frame
from bridge.runtime.closing import close_logged
from bridge.runtime.mailbox import Mailbox
from bridge.transports.base import Source

log = logging.getLogger(__name__)


class CaptureRunner:
    """The source on its own thread, feeding the newest frame into `box`. The thread also
    closes the source, so a receiver whose state belongs to one thread (Spout, Syphon) is
    created, used and released there."""

    def __init__(self, source: Source, box: Mailbox[Frame]) -> None:
        self.source = source
        self.box = box
        self.frames = 0
        self.failures = 0
        self.last_error = ""
        self._closed = False
        self._stop = threading.Event()
        self._log = RateLimitedLog(log)
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def waiting(self) -> str:
        """What the source says it is waiting for ("" when frames flow or it says nothing)."""
        return str(getattr(self.source, "waiting", "") or "")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    frame = self.source.read(0.1)
                except Exception as exc:
                    self.failures += 1
                    self.last_error = f"input: {type(exc).__name__}: {exc}"
                    self._log.warning("input", f"{self.last_error} (holding the last output, retrying)")
                    self._stop.wait(0.1)
                    continue
                self.last_error = ""  # the read worked: the old error is no longer true
                if frame is not None:
                    self.frames += 1
                    self.box.put(frame)
        finally:
            self._close_source()

    def _close_source(self) -> None:
        if not self._closed:
            self._closed = True
            close_logged("input", self.source)

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            log.warning("the input did not return within %.1f s; closing it anyway", timeout_s)
            self._close_source()
