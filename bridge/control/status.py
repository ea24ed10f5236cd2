"""What the bridge reports about itself, and the rate-limited logger the control threads share."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

STATES = ("loading", "warming", "running", "error")
MODES = ("live", "frozen", "bypass", "holding")


@dataclass(frozen=True)
class Status:
    """A snapshot the runtime publishes: `/sd/status/<field>` for each field."""

    state: str = "loading"  # one of STATES; never an error text (that is `error`)
    mode: str = "live"  # one of MODES: holding = the source stopped, the last output repeats
    fps: float = 0.0  # output frames per second: the last 2 s, or the last two frames below 1 fps
    latency_ms: float = 0.0  # capture to output, median of the last engine frames only; kept
    # as it was while frozen, bypassed or holding (see latency_age_s)
    engine_ms: float = 0.0  # engine call, median of the last engine frames
    skip_rate: float = 0.0  # similarity-filter skips / frames the engine saw, recent window
    dropped: int = 0  # frames replaced in a mailbox before anyone took them, all stages
    frames: int = 0  # output frames so far
    error: str = ""  # the bridge's most serious current problem (engine, output, input, MIDI),
    # else an OSC or form mistake of the last few seconds; "" when none
    latency_age_s: float = 0.0  # seconds since the newest engine frame behind latency_ms
    dropped_at: str = ""  # where `dropped` happened: "input 12, preview 3" (mailboxes with drops)
    control_error: str = ""  # the last refused control message, for a few seconds; "" when none


class RateLimitedLog:
    """Log at most one message per `key` every `interval_s`, counting the ones it held back.

    At most `max_keys` keys get a budget of their own; messages under any further key share one
    (so 20,000 distinct OSC addresses make a handful of lines, and the table stays bounded)."""

    OVERFLOW = "(other keys)"

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0, *, max_keys: int = 64) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        if key not in self._last and len(self._last) >= self._max_keys:
            key = self.OVERFLOW
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self._interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        suffix = f" ({held} more like it since the last report)" if held else ""
        self._last[key] = now
        self._logger.warning("%s%s", message, suffix)
