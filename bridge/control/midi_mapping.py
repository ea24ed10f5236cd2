"""The `midi.mappings` schema: one entry's fields, its checks and its YAML form. It sits below
both the config (which loads and checks the entries) and `bridge.control.midi` (which drives
parameters with them), so neither imports the other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bridge.params import LIVE, Kind, Param

CURVES = ("linear", "exp", "log")
TAKEOVERS = ("soft", "jump")
MODES = ("toggle", "momentary")


@dataclass(frozen=True)
class MidiMapping:
    """One control -> one live parameter (`midi.mappings` entries; bridge/control/midi.py)."""

    param: str
    cc: int = -1  # control change number 0..127, or
    note: int = -1  # note number 0..127
    channel: int = 0  # 1..16 as printed on controllers; 0 = any channel
    min: float | None = None  # numeric parameters: the range the control sweeps (default: the parameter's)
    max: float | None = None
    curve: str = "linear"  # linear | exp (fine control at the low end) | log (at the high end)
    takeover: str = "soft"  # soft: pick the value up before moving it; jump: move it at once
    mode: str = "toggle"  # on/off parameters: toggle (each press flips) | momentary (on while held)


def mapping_fields(m: MidiMapping) -> dict[str, Any]:
    """A mapping as config data: `param`, then the fields that differ from their defaults."""
    defaults = MidiMapping(param=m.param)
    fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
    return {k: v for k, v in fields.items() if k == "param" or v != getattr(defaults, k)}


def check_mapping(m: MidiMapping, key: str) -> None:
    """Raise ValueError naming `key` when the mapping cannot work."""
    param = LIVE.get(m.param)
    if param is None:
        valid = ", ".join(p.name for p in LIVE.values() if p.numeric or p.kind is Kind.BOOL)
        raise ValueError(
            f"{key}.param {m.param!r} is not a live numeric or on/off parameter (valid: {valid})"
        )
    if (m.cc < 0) == (m.note < 0):
        raise ValueError(f"{key} needs exactly one of cc or note (0..127)")
    for field_name, number in (("cc", m.cc), ("note", m.note)):
        if number > 127:
            raise ValueError(f"{key}.{field_name} must be within 0..127, got {number}")
    if not 0 <= m.channel <= 16:
        raise ValueError(f"{key}.channel must be 1..16, or 0 for any, got {m.channel}")
    if m.curve not in CURVES:
        raise ValueError(f"{key}.curve must be one of {', '.join(CURVES)}, got {m.curve!r}")
    if m.takeover not in TAKEOVERS:
        raise ValueError(f"{key}.takeover must be one of {', '.join(TAKEOVERS)}, got {m.takeover!r}")
    if m.mode not in MODES:
        raise ValueError(f"{key}.mode must be one of {', '.join(MODES)}, got {m.mode!r}")
    if param.kind is Kind.BOOL:
        return
    if not param.numeric:
        raise ValueError(f"{key}.param {m.param!r} is a {param.kind.value}; MIDI drives numbers and on/off")
    if m.note >= 0:
        raise ValueError(f"{key}: a note cannot sweep {m.param!r}; map a fader or knob (cc) to it")
    lo, hi = mapping_range(m, param)
    if not lo < hi:
        raise ValueError(f"{key}: min must be below max, got {lo:g}..{hi:g}")


def mapping_range(m: MidiMapping, param: Param) -> tuple[float, float]:
    """The range a fader or knob sweeps: the mapping's min/max, else the parameter's."""
    lo = m.min if m.min is not None else param.minimum
    hi = m.max if m.max is not None else param.maximum
    if lo is None or hi is None:
        raise ValueError(f"{param.name} has no built-in range; give min and max in the mapping")
    return float(lo), float(hi)


def mapping_yaml(m: MidiMapping) -> str:
    """One `midi.mappings` entry as a YAML flow mapping, defaults left out."""
    return "{" + ", ".join(f"{key}: {value}" for key, value in mapping_fields(m).items()) + "}"
