"""Prompts encoded off the engine loop: a new text goes through the text encoder on a thread of
its own while the loop keeps making frames with the old one, and the finished prompt is applied
between two frames (every text then cached, so applying it costs no encoder call)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

ENCODED = ("prompt", "prompt_blend", "negative_prompt")  # the values that need the text encoder


@dataclass(frozen=True)
class Encoded:
    """A prompt value whose texts are in the engine's cache, or the reason they could not be."""

    name: str
    value: Any
    version: int  # the store's submit version of `value`
    error: Exception | None = None


class PromptEncoder:
    """One worker thread running `encode(name, value)` for each submitted prompt value.

    The engine loop calls `submit` and `take_done`; latest wins per name, so a value replaced
    before its turn is never encoded. `close()` once, from the loop's thread, at shutdown: an
    encode still running is left to finish on its (daemon) thread."""

    def __init__(self, encode: Callable[[str, Any], None]) -> None:
        self._encode = encode
        self._cond = threading.Condition()
        self._todo: dict[str, tuple[Any, int]] = {}
        self._done: dict[str, Encoded] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="prompt-encoder", daemon=True)
        self._thread.start()

    def submit(self, name: str, value: Any, version: int) -> None:
        with self._cond:
            self._todo[name] = (value, version)
            self._cond.notify()

    def take_done(self) -> list[Encoded]:
        """The values encoded since the last call, oldest submission first."""
        with self._cond:
            done, self._done = self._done, {}
        return sorted(done.values(), key=lambda d: d.version)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._todo and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                name = min(self._todo, key=lambda n: self._todo[n][1])
                value, version = self._todo.pop(name)
            error: Exception | None = None
            try:
                self._encode(name, value)
            except Exception as exc:  # the engine refuses it; the loop reports the reason
                error = exc
            with self._cond:
                self._done[name] = Encoded(name, value, version, error)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=0.5)
