"""MIDI control: faders, knobs and pads mapped onto live parameters (the `midi` config section).

A mapping ties one control change (`cc`) or note to one live parameter. Faders and knobs drive
numeric parameters through a range and a curve; pads and buttons drive booleans (freeze, bypass,
the similarity filter) as toggles or momentary switches. Soft takeover keeps a fader from making
the value jump: after a start, or after OSC moved the value, the fader does nothing until it
reaches or crosses the current value, and from then on it drives it.

`MidiMapper` works on message objects with mido's attributes (`type`, `channel`, `control`,
`value`, `note`, `velocity`), so it is tested on plain message streams. `MidiInput` opens a real
port through mido (extra `midi`: mido + python-rtmidi) and is imported lazily.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from bridge.control.midi_mapping import MidiMapping, check_mapping, mapping_range, mapping_yaml
from bridge.params import BY_NAME, LIVE, Kind, Param, ParamError, coerce
from bridge.transports.base import import_vendor

log = logging.getLogger(__name__)

__all__ = ["MidiInput", "MidiMapper", "MidiMapping", "check_mapping", "learn", "listen", "mapping_yaml"]

PICKUP_TOLERANCE = 0.02  # of the range: a fader this close to the value has reached it


class MidiMessage(Protocol):
    type: str
    channel: int


def shape(x: float, curve: str) -> float:
    """0..1 -> 0..1 through `curve`."""
    if curve == "exp":
        return x * x
    if curve == "log":
        return math.sqrt(x)
    return x


class MidiMapper:
    """Turns MIDI messages into parameter changes through `mappings`. `submit(name, value)`
    queues a change; `current(name)` reads the live value (for toggles and soft takeover)."""

    def __init__(
        self,
        mappings: Iterable[MidiMapping],
        submit: Callable[[str, Any], object],
        current: Callable[[str], Any],
    ) -> None:
        self.mappings = tuple(mappings)
        for i, m in enumerate(self.mappings):
            check_mapping(m, f"midi.mappings.{i}")
        self._submit = submit
        self._current = current
        self._engaged: dict[int, bool] = {}
        self._last_sent: dict[int, Any] = {}
        self._last_position: dict[int, float] = {}
        self._pressed: dict[int, bool] = {}
        self.ignored = 0  # messages no mapping took
        self.waiting: dict[str, float] = {}  # soft takeover: parameter -> the value to reach

    def handle(self, msg: MidiMessage) -> list[tuple[str, Any]]:
        """Apply one message; returns the changes it submitted."""
        changes: list[tuple[str, Any]] = []
        for i, m in enumerate(self.mappings):
            if m.channel and getattr(msg, "channel", -1) != m.channel - 1:
                continue
            change = self._apply(i, m, msg)
            if change is not None:
                self._submit(*change)
                changes.append(change)
        if not changes:
            self.ignored += 1
        return changes

    def _apply(self, i: int, m: MidiMapping, msg: MidiMessage) -> tuple[str, Any] | None:
        param = BY_NAME[m.param]
        if m.cc >= 0 and msg.type == "control_change" and msg.control == m.cc:  # type: ignore[attr-defined]
            level = int(msg.value)  # type: ignore[attr-defined]
            if param.kind is Kind.BOOL:
                return self._button(i, m, level >= 64)
            return self._fader(i, m, param, level / 127)
        if m.note >= 0 and msg.type in ("note_on", "note_off") and msg.note == m.note:  # type: ignore[attr-defined]
            down = msg.type == "note_on" and int(msg.velocity) > 0  # type: ignore[attr-defined]
            return self._button(i, m, down)
        return None

    def _button(self, i: int, m: MidiMapping, down: bool) -> tuple[str, Any] | None:
        was_down = self._pressed.get(i, False)
        self._pressed[i] = down
        if m.mode == "momentary":
            return (m.param, down) if down != was_down else None
        if down and not was_down:  # toggle on the press edge only
            return m.param, not bool(self._current(m.param))
        return None

    def _fader(self, i: int, m: MidiMapping, param: Param, x: float) -> tuple[str, Any] | None:
        lo, hi = mapping_range(m, param)
        target = lo + shape(x, m.curve) * (hi - lo)
        value = coerce(param, [round(target) if param.kind is Kind.INT else target]).value
        previous_position = self._last_position.get(i)
        self._last_position[i] = target
        if m.takeover == "soft":
            current = float(self._current(m.param))
            sent = self._last_sent.get(i)
            tolerance = PICKUP_TOLERANCE * (hi - lo)
            if self._engaged.get(i) and sent is not None and abs(float(sent) - current) > tolerance:
                self._engaged[i] = False  # something else (OSC, another control) moved it
            if not self._engaged.get(i):
                near = abs(target - current) <= tolerance
                crossed = (
                    previous_position is not None and (previous_position - current) * (target - current) <= 0
                )
                if not (near or crossed):
                    self.waiting[m.param] = current
                    return None
                self._engaged[i] = True
                self.waiting.pop(m.param, None)
        self._last_sent[i] = value
        return m.param, value


def learn(messages: Iterable[Any], param_name: str, *, timeout_hint: str = "") -> MidiMapping:
    """The mapping for `param_name` from the first control that moves in `messages`: a fader or
    knob (cc) for a numeric parameter, a pad, key or button (note or cc) for an on/off one.
    Clock, sensing and other traffic is skipped."""
    param = LIVE.get(param_name)
    if param is None or not (param.numeric or param.kind is Kind.BOOL):
        valid = ", ".join(p.name for p in LIVE.values() if p.numeric or p.kind is Kind.BOOL)
        raise ValueError(f"{param_name!r} cannot be mapped to MIDI (valid: {valid})")
    for msg in messages:
        channel = int(getattr(msg, "channel", -1)) + 1
        if msg.type == "control_change":
            return MidiMapping(param=param_name, cc=int(msg.control), channel=channel)
        if msg.type == "note_on" and int(msg.velocity) > 0:
            if param.kind is not Kind.BOOL:
                log.info("a note moved, but %s needs a fader or knob; still listening", param_name)
                continue
            return MidiMapping(param=param_name, note=int(msg.note), channel=channel)
    raise TimeoutError(f"no control moved{timeout_hint}")


# ------------------------------------------------------------------------------ real ports


def _mido() -> Any:
    return import_vendor("mido", what="MIDI control", extra="midi")


def input_names() -> list[str]:
    """The MIDI input ports; raises OSError when this machine has no MIDI subsystem."""
    mido = _mido()
    try:
        return list(mido.get_input_names())
    except ImportError:
        raise import_error() from None
    except Exception as exc:  # rtmidi raises its own SystemError when ALSA/CoreMIDI is missing
        raise OSError(no_midi_message(exc)) from None


def import_error() -> ImportError:
    from bridge.transports.base import missing_extra

    return missing_extra("MIDI control", "midi", "rtmidi (python-rtmidi)", "OSC from a MIDI-to-OSC app")


def no_midi_message(exc: BaseException) -> str:
    return (
        f"no MIDI subsystem on this machine ({type(exc).__name__}: {str(exc).strip()}). On Linux "
        "the ALSA sequencer (/dev/snd/seq) is needed: load snd-seq, or run on the machine the "
        "controller is plugged into and send OSC from there"
    )


def pick_port(names: list[str], wanted: str) -> str:
    if not names:
        raise OSError("no MIDI input ports: plug in a controller (or start a virtual MIDI port)")
    if not wanted:
        return names[0]
    for name in names:
        if name == wanted or wanted.lower() in name.lower():
            return name
    raise OSError(f"no MIDI input port matches {wanted!r}; ports here: {', '.join(names)}")


class MidiInput:
    """A mido input port feeding `on_message` from mido's own thread."""

    def __init__(self, port: str, on_message: Callable[[Any], None]) -> None:
        mido = _mido()
        self.name = pick_port(input_names(), port)
        try:
            self._port = mido.open_input(self.name, callback=on_message)
        except Exception as exc:
            raise OSError(f"MIDI port {self.name!r} could not be opened: {exc}") from None
        log.info("MIDI: listening on %r", self.name)

    def close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            port.close()


def listen(port: str, timeout_s: float) -> Iterator[Any]:
    """Messages from a real port until `timeout_s` passes (for `sdbridge midi-learn`)."""
    import time

    mido = _mido()
    name = pick_port(input_names(), port)
    with mido.open_input(name) as inport:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            yield from inport.iter_pending()
            time.sleep(0.005)


__all__ = ["MidiInput", "MidiMapper", "MidiMapping", "ParamError", "check_mapping", "learn", "mapping_yaml"]
