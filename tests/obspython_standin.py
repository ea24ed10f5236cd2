"""A stand-in for OBS's `obspython` module: the subset the OBS script calls, with OBS's names and
argument order (obs_data_*, obs_properties_*, obs_hotkey_*), backed by dictionaries. Properties
are recorded so a test can read what the script put on screen."""

from __future__ import annotations

import types
from typing import Any

LOG_WARNING = 200
OBS_TEXT_DEFAULT, OBS_TEXT_PASSWORD, OBS_TEXT_MULTILINE = 0, 1, 2
OBS_EDITABLE_LIST_TYPE_STRINGS = 0


class Data:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.defaults: dict[str, Any] = {}

    def get(self, key: str, empty: Any) -> Any:
        return self.values.get(key, self.defaults.get(key, empty))


class DataArray(list):  # type: ignore[type-arg]
    pass


def make() -> types.ModuleType:
    m = types.ModuleType("obspython")
    m.LOG_WARNING = LOG_WARNING  # type: ignore[attr-defined]
    m.OBS_TEXT_DEFAULT, m.OBS_TEXT_MULTILINE = OBS_TEXT_DEFAULT, OBS_TEXT_MULTILINE  # type: ignore[attr-defined]
    m.OBS_EDITABLE_LIST_TYPE_STRINGS = OBS_EDITABLE_LIST_TYPE_STRINGS  # type: ignore[attr-defined]
    m.logged = []  # type: ignore[attr-defined]
    m.hotkeys = {}  # type: ignore[attr-defined]

    def typed(kind: type, empty: Any) -> Any:
        def getter(data: Data, key: str) -> Any:
            value = data.get(key, empty)
            assert isinstance(value, kind), f"{key} holds {value!r}, not {kind.__name__}"
            return value

        def setter(data: Data, key: str, value: Any) -> None:
            assert isinstance(value, kind), f"{key} set to {value!r}, not {kind.__name__}"
            data.values[key] = value

        def default(data: Data, key: str, value: Any) -> None:
            assert isinstance(value, kind), f"{key} default {value!r}, not {kind.__name__}"
            data.defaults[key] = value

        return getter, setter, default

    for name, kind, empty in (
        ("string", str, ""),
        ("int", int, 0),
        ("double", float, 0.0),
        ("bool", bool, False),
    ):
        get, put, default = typed(kind, empty)
        setattr(m, f"obs_data_get_{name}", get)
        setattr(m, f"obs_data_set_{name}", put)
        setattr(m, f"obs_data_set_default_{name}", default)

    m.obs_data_create = Data  # type: ignore[attr-defined]
    m.obs_data_release = lambda data: None  # type: ignore[attr-defined]
    m.obs_data_get_array = lambda data, key: data.values.get(key, DataArray())  # type: ignore[attr-defined]
    m.obs_data_set_array = lambda data, key, array: data.values.__setitem__(key, array)  # type: ignore[attr-defined]
    m.obs_data_array_count = len  # type: ignore[attr-defined]
    m.obs_data_array_item = lambda array, i: array[i]  # type: ignore[attr-defined]
    m.obs_data_array_release = lambda array: None  # type: ignore[attr-defined]
    m.script_log = lambda level, text: m.logged.append((level, text))  # type: ignore[attr-defined]

    def properties_create() -> list[dict[str, Any]]:
        return []

    def add(kind: str) -> Any:
        def adder(props: list[dict[str, Any]], key: str, label: str, *rest: Any) -> dict[str, Any]:
            prop = {"kind": kind, "key": key, "label": label, "args": rest}
            props.append(prop)
            return prop

        return adder

    m.obs_properties_create = properties_create  # type: ignore[attr-defined]
    for kind in ("text", "int", "float_slider", "int_slider", "bool", "editable_list"):
        setattr(m, f"obs_properties_add_{kind}", add(kind))

    def register(name: str, description: str, callback: Any) -> int:
        hotkey_id = len(m.hotkeys) + 1
        m.hotkeys[hotkey_id] = {"name": name, "description": description, "callback": callback, "keys": None}
        return hotkey_id

    def load(hotkey_id: int, saved: Any) -> None:
        m.hotkeys[hotkey_id]["keys"] = list(saved)

    def save(hotkey_id: int) -> DataArray:
        return DataArray(m.hotkeys[hotkey_id]["keys"] or [])

    m.obs_hotkey_register_frontend = register  # type: ignore[attr-defined]
    m.obs_hotkey_load = load  # type: ignore[attr-defined]
    m.obs_hotkey_save = save  # type: ignore[attr-defined]
    return m


def string_list(*items: str) -> DataArray:
    """What OBS stores for an editable list of strings: obs_data items with a "value"."""
    array = DataArray()
    for text in items:
        item = Data()
        item.values["value"] = text
        array.append(item)
    return array
