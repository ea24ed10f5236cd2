"""The OSCQuery tree: the bridge's OSC address space as the proposal's JSON nodes
(https://github.com/Vidvox/OSCQueryProposal), and the current value of every method.

A node with a value is a method and has no children. Every live parameter is a method at its
OSC address with one fixed TYPE: numbers "f"/"i" with their RANGE, on/off "T", and
`t_index_list` and `prompt_blend` as one string in their text form ("32 45",
"a cat:0.7 | a dog:0.3"), which `bridge.params.coerce` takes from OSC as well as the list form.
The 0..1 variants are methods of their own under /sd/norm; status values are read-only methods
under /sd/status.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from bridge.control.osc import OscControl, encode
from bridge.control.status import Status
from bridge.params import LIVE, Kind, Param

READ, WRITE = 1, 2
NORM_ROOT = "/sd/norm"
# one read-only node per Status field, typed from the field: the tree cannot drift from status
STATUS_TYPES = {
    field.name: {"str": "s", "float": "f", "int": "i"}[str(field.type)]
    for field in dataclasses.fields(Status)
}
# the attributes a `?QUERY` may ask for (the proposal's list); anything else is a 400
ATTRIBUTES = frozenset(
    [
        "FULL_PATH",
        "CONTENTS",
        "TYPE",
        "VALUE",
        "RANGE",
        "ACCESS",
        "DESCRIPTION",
        "TAGS",
        "EXTENDED_TYPE",
        "UNIT",
        "CRITICAL",
        "CLIPMODE",
        "OVERLOADS",
    ]
)


def type_tag(param: Param) -> str:
    """The one OSC type of a parameter's address, whatever its current value."""
    if param.kind is Kind.BOOL:
        return "T"  # the proposal's boolean: T and F both say "a bool", VALUE says which
    return {Kind.FLOAT: "f", Kind.INT: "i"}.get(param.kind, "s")


def query_value(param: Param, value: Any) -> list[Any]:
    """A value in its address's type: lists and blends as their text form ("32 45",
    "a cat:0.7 | a dog:0.3"), which `bridge.params.coerce` accepts from OSC as well."""
    if param.kind is Kind.INT_LIST:
        return [" ".join(str(int(v)) for v in value)]
    if param.kind is Kind.BLEND:
        return [" | ".join(f"{text}:{float(weight):g}" for text, weight in value)]
    if param.kind is Kind.BOOL:
        return [bool(value)]
    if param.kind is Kind.FLOAT:
        return [float(value)]
    if param.kind is Kind.INT:
        return [int(value)]
    return [str(value)]


def norm_params() -> list[Param]:
    """The live parameters with a 0..1 variant."""
    return [p for p in LIVE.values() if p.numeric and p.minimum is not None and p.maximum is not None]


def norm_address(param: Param) -> str:
    return f"{NORM_ROOT}/{param.name}"


def _norm(param: Param, value: Any) -> float:
    assert param.minimum is not None and param.maximum is not None  # norm_params() has ranges only
    span = param.maximum - param.minimum
    return (float(value) - param.minimum) / span if span else 0.0


def _description(param: Param) -> str:
    label = str(getattr(param, "label", "") or "")
    return f"{label}: {param.doc}" if label else param.doc


def current_values(
    values: Mapping[str, Any], status: Mapping[str, Any], *, norm: bool
) -> dict[str, list[Any]]:
    """Every method's VALUE by address: what the tree shows and what LISTEN pushes."""
    out: dict[str, list[Any]] = {}
    for param in LIVE.values():
        out[param.address] = query_value(param, values.get(param.name, param.default))
    if norm:
        for param in norm_params():
            out[norm_address(param)] = [_norm(param, values.get(param.name, param.default))]
    for key, tag in STATUS_TYPES.items():
        raw = status.get(key, "" if tag == "s" else 0)
        out[f"/sd/status/{key}"] = [{"s": str, "f": float, "i": int}[tag](raw)]
    return out


def build_tree(values: Mapping[str, Any], status: Mapping[str, Any], *, norm: bool = False) -> dict[str, Any]:
    """The whole OSCQuery namespace as nested nodes; with `norm`, the /sd/norm methods too."""
    root: dict[str, Any] = {"FULL_PATH": "/", "ACCESS": 0, "CONTENTS": {}}
    current = current_values(values, status, norm=norm)

    def node(path: str) -> dict[str, Any]:
        here = root
        parts = path.strip("/").split("/")
        for i, part in enumerate(parts):
            contents = here.setdefault("CONTENTS", {})
            here = contents.setdefault(part, {"FULL_PATH": "/" + "/".join(parts[: i + 1]), "ACCESS": 0})
        return here

    for param in LIVE.values():
        entry = node(param.address)
        entry.update(TYPE=type_tag(param), ACCESS=READ | WRITE, VALUE=current[param.address])
        entry["DESCRIPTION"] = _description(param)
        if param.numeric and param.minimum is not None and param.maximum is not None:
            entry["RANGE"] = [{"MIN": param.minimum, "MAX": param.maximum}]
        if param.choices:
            entry["RANGE"] = [{"VALS": list(param.choices)}]
    if norm:
        node(NORM_ROOT)["DESCRIPTION"] = "each number as 0..1 of its range (faders, MIDI)"
        for param in norm_params():
            entry = node(norm_address(param))
            entry.update(TYPE="f", ACCESS=READ | WRITE, VALUE=current[norm_address(param)])
            entry.update(RANGE=[{"MIN": 0.0, "MAX": 1.0}], DESCRIPTION=f"{param.name} as 0..1 of its range")
    node("/sd/status")["DESCRIPTION"] = "the bridge's state, sent about once a second to osc.status_targets"
    for key, tag in STATUS_TYPES.items():
        address = f"/sd/status/{key}"
        node(address).update(TYPE=tag, ACCESS=READ, VALUE=current[address])
    return root


def find(tree: dict[str, Any], path: str) -> dict[str, Any] | None:
    current = tree
    for part in [p for p in path.split("/") if p]:
        current = current.get("CONTENTS", {}).get(part)
        if current is None:
            return None
    return current


def route_norm(control: OscControl) -> None:
    """Make the OSC server take /sd/norm/NAME as it takes /sd/NAME/norm (same coercion, same
    errors, same counters): the 0..1 addresses OSCQuery lists as methods of their own."""
    for param in norm_params():
        served = f"{param.address}/norm"

        def forward(sender: Any, address: str, *args: Any, served: str = served) -> None:
            control.dispatcher.call_handlers_for_packet(encode(served, args), sender)

        control.dispatcher.map(norm_address(param), forward, needs_reply_address=True)
