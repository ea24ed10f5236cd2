"""Control start-up: the OSC server and its status publisher, OSCQuery, and MIDI. Started
before the engine loads, closed after the outputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from bridge.config import BridgeConfig
from bridge.control.osc import OscControl, OscServer, StatusPublisher, parse_target
from bridge.control.status import Status
from bridge.params import BY_NAME, ParamStore
from bridge.runtime.closing import close_logged

log = logging.getLogger(__name__)

MISTAKE_SHOWN_S = 5.0  # how long status shows a refused control message


class Controls:
    """Every way in for live values, and status out. `start()` once, `close()` once, both from
    the thread that runs the bridge. Each part is None while off (or, for MIDI, not opened)."""

    def __init__(self, config: BridgeConfig, store: ParamStore, *, status: Callable[[], Status]) -> None:
        self.config = config
        self.store = store
        self._status = status
        self.control: OscControl | None = None
        self.osc: OscServer | None = None
        self.publisher: StatusPublisher | None = None
        self.oscquery: Any = None  # bridge.control.oscquery.OscQueryServer when osc.oscquery_port is set
        self.midi: Any = None  # bridge.control.midi.MidiInput when MIDI is on and a port opened
        self.midi_mapper: Any = None  # bridge.control.midi.MidiMapper when MIDI is on
        self.midi_error = ""
        self._mistake = ("", -1e9)  # the last refused control message and when (monotonic s)
        self._osc_seen: tuple[str, int] = ("", 0)  # OscControl's last error and mistake count

    def start(self) -> None:
        self._start_osc()
        self._start_midi()

    def poke(self) -> None:
        """Send changed status and values now rather than at the next interval."""
        if self.publisher is not None:
            self.publisher.poke()

    def refuse(self, name: str, reason: str) -> None:
        """Report a value the engine refused: on /sd/error when OSC is on, else in the log;
        in status for a few seconds either way."""
        if self.control is not None:
            self.control.reject(BY_NAME[name].address, reason, None)
        else:
            log.warning("%s", reason)
        self._mistake = (f"{BY_NAME[name].address}: {reason}", time.monotonic())

    def recent_error(self) -> str:
        """The last refused control message (OSC, a form, a value the engine refused) while it
        is under MISTAKE_SHOWN_S old, else "". A mistake is the sender's, not the bridge's:
        it is shown briefly and never stands for the bridge's state or its other errors."""
        control = self.control
        if control is not None:
            seen = (control.last_error, control.counters.rejected + control.counters.unknown)
            if seen != self._osc_seen:
                self._osc_seen = seen
                if control.last_error:
                    self._mistake = (control.last_error, time.monotonic())
        text, since = self._mistake
        return text if time.monotonic() - since < MISTAKE_SHOWN_S else ""

    def _start_osc(self) -> None:
        osc = self.config.osc
        if not osc.enabled:
            return
        self.osc = OscServer(osc.host, osc.port)
        targets = [parse_target(t) for t in osc.status_targets]
        self.control = OscControl(
            self.store, send=self.osc.send, error_targets=targets, allowlist=osc.allowlist
        )
        self.osc.start(self.control)
        self.publisher = StatusPublisher(
            send=self.osc.send,
            targets=targets,
            status=self._status,
            store=self.store,
            interval_s=osc.status_interval_s,
        )
        self.publisher.start()
        log.info("OSC on %s:%d, status to %s", *self.osc.address, ", ".join(osc.status_targets))
        if osc.oscquery_port:
            from bridge.control.oscquery import OscQueryServer

            self.oscquery = OscQueryServer(
                host=osc.host,
                port=osc.oscquery_port,
                osc_port=self.osc.address[1],
                values=self.store.snapshot,
                status=lambda: vars(self._status()),
                advertise=osc.oscquery_advertise,
                allowed_hosts=osc.oscquery_allowed_hosts,
                control=self.control,  # routes the /sd/norm/NAME methods
            )
            self.oscquery.start()

    def _start_midi(self) -> None:
        """MIDI is a convenience, never a reason to stop: without a MIDI subsystem, the library
        or the port, the error is logged and shown in status and the bridge runs on."""
        midi = self.config.midi
        if not midi.enabled:
            return
        from bridge.control.midi import MidiInput, MidiMapper

        self.midi_mapper = MidiMapper(midi.mappings, submit=self.store.submit, current=self.store.latest)
        mapper = self.midi_mapper

        def on_message(msg: Any) -> None:
            try:
                mapper.handle(msg)
            except Exception:
                log.exception("MIDI message %r failed", msg)

        try:
            self.midi = MidiInput(midi.port, on_message)
        except (ImportError, OSError) as exc:
            self.midi_error = f"MIDI: {exc}"
            log.error("%s; the bridge runs on without MIDI", self.midi_error)

    def midi_dict(self) -> dict[str, Any]:
        """MIDI's part of the status page."""
        mapper = self.midi_mapper
        return {
            "port": self.midi.name if self.midi is not None else "",
            "error": self.midi_error,
            "unmapped_messages": mapper.ignored if mapper is not None else 0,
            "soft_takeover_waiting": dict(mapper.waiting) if mapper is not None else {},
        }

    def close(self) -> None:
        """Close MIDI, OSCQuery, the publisher and the OSC server, in that order."""
        if self.midi is not None:
            close_logged("midi", self.midi)
        if self.oscquery is not None:
            close_logged("oscquery", self.oscquery)
        if self.publisher is not None:
            self.publisher.close()
        if self.osc is not None:
            self.osc.close()
