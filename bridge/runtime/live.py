"""Live values between frames: what the control threads submitted, applied to the engine by the
engine loop, and committed to the store as the engine then holds them."""

from __future__ import annotations

import logging
from typing import Any

from bridge.params import ParamStore, cut
from bridge.runtime.controls import Controls
from bridge.runtime.driver import EngineDriver
from bridge.runtime.encoding import ENCODED, PromptEncoder

log = logging.getLogger(__name__)


class LiveValues:
    """The engine loop's side of the parameter store, made once the engine is prepared:
    `apply_pending()` before each frame, `close()` once at shutdown, both from the loop. Freeze
    and bypass are the loop's own switches and live here too."""

    def __init__(self, store: ParamStore, controls: Controls, driver: EngineDriver) -> None:
        self.store = store
        self.controls = controls
        self.freeze = bool(store.get("freeze"))
        self.bypass = bool(store.get("bypass"))
        self._driver = driver
        self._encoder = PromptEncoder(driver.encode)
        self._applied_version = 0  # the newest submission applied (or refused)
        self._encoding: dict[str, int] = {}  # prompt values being encoded: name -> version

    def close(self) -> None:
        self._encoder.close()

    def apply_pending(self) -> None:
        """Apply what was submitted since the last frame, and the prompts encoded since.

        A new prompt goes to the encoder thread first and is applied once its texts are
        cached, so the frames in between run with the old prompt instead of waiting."""
        pending = self.store.take_pending()
        changed = False
        for name, item in sorted(pending.items(), key=lambda kv: kv[1].version):
            if name in ENCODED:
                self._encoding[name] = item.version
                self._encoder.submit(name, item.value, item.version)
                continue
            self._apply(name, item.value, item.version)
            changed = True
        for done in self._encoder.take_done():
            if self._encoding.get(done.name) != done.version:
                continue  # a newer value for it is on its way
            del self._encoding[done.name]
            if done.error is not None:
                self._refused(done.name, done.value, done.version, done.error)
            else:
                self._apply(done.name, done.value, done.version)
            changed = True
        if changed:
            self.controls.poke()

    def _apply(self, name: str, value: Any, version: int) -> None:
        """Apply one value and commit to the store what the engine then holds."""
        try:
            if name == "freeze":
                self.freeze = bool(value)
                applied = {name: self.freeze}
            elif name == "bypass":
                self.bypass = bool(value)
                applied = {name: self.bypass}
            else:
                applied = self._driver.apply(name, value)
        except (ValueError, TypeError) as exc:
            self._refused(name, value, version, exc)
            return
        for key, held in applied.items():
            self.store.commit(key, held)
        if name in applied and applied[name] != value:
            log.warning("the engine took %s=%s as %s", name, cut(repr(value)), cut(repr(applied[name])))
        self._applied_version = max(self._applied_version, version)

    def _refused(self, name: str, value: Any, version: int, exc: BaseException) -> None:
        self.controls.refuse(name, f"the engine refused {name}={cut(repr(value))}: {exc}")
        self._applied_version = max(self._applied_version, version)

    def version_applied(self) -> int:
        """The newest submission version such that every one before it has been applied or
        refused (a prompt still being encoded holds it back)."""
        if not self._encoding:
            return self._applied_version
        return min(self._applied_version, min(self._encoding.values()) - 1)
