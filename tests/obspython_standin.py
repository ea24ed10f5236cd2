"""A stand-in for OBS Studio 29: its `obspython` module (the subset the OBS script calls, with
OBS's names, argument order and odd rules) and `Obs`, the host that calls the script's functions
in the order, and with the settings, that real OBS does.

Every rule below copies OBS 29.1.3 (github.com/obsproject/obs-studio, tag 29.1.3); the paths
are from that tree, `python.c` is deps/obs-scripting/obs-scripting-python.c,
`scripts.cpp` is UI/frontend-plugins/frontend-tools/scripts.cpp and `view.cpp` is
UI/properties-view.cpp.

- Start-up and Tools > Scripts > +: `obs_python_script_create` (python.c:1306) copies the saved
  settings (python.c:1333-1334) and runs `load_python_script` (python.c:174): the module is
  imported, then `script_defaults(settings)` (python.c:234-236), `script_description()`
  (python.c:242), `script_load(settings)` (python.c:278-289); then `script_update(settings)`
  (python.c:1346). The description is read once, there, and kept (python.c:250), shown from that copy (scripts.cpp:537).
- `script_properties()` runs when the Scripts window shows the script: an OBSPropertiesView is
  made with `obs_script_get_properties` as its reload callback and `obs_script_update` as its
  visual-update callback (scripts.cpp:532-535), and its `ReloadProperties` calls it
  (view.cpp:89-119). Adding a script, and Reload Scripts, also call it once on a throwaway
  properties object with a *fresh empty* settings object, through `obs_properties_apply_settings`
  (scripts.cpp:251-266, 368-371), which runs every property's modified callback
  (libobs/obs-properties.c:362-389).
- A control change (view.cpp:2002-2102, `WidgetInfo::ControlChanged`): the setting is written,
  `script_update(settings)` runs at once (the visual-update callback, view.cpp:2088-2093: the
  500 ms timer at view.cpp:2063-2083 only drives the *other* callback, which scripts leave
  null), then the property's modified callback (view.cpp:2097); when that returns exactly
  `True` (python.c:957, `py_ret == Py_True`) the widgets are laid out again from the *same*
  properties object (`RefreshProperties`, view.cpp:123-171): `script_properties` is not called
  again, so a callback that wants other controls must change the object it is given. A
  multi-line text box reports every keystroke (`textChanged`, view.cpp:298).
- Callbacks must be plain Python functions; anything else is ignored without a word
  (`PyFunction_Check`, python.c:982 for modified callbacks).
- Timers (`timer_add`, python.c:451-470): the interval starts at the current video frame time
  (python.c:467) and the timer joins the list later (`defer_call_post`, python.c:469); each
  video tick calls a due timer once and moves its start on by one interval
  (python.c:1594-1606). It repeats until `timer_remove(callback)` (python.c:413-428, found by
  the function object) or `remove_current_callback()` (python.c:994) from inside it.
- Properties: a second property of an existing name is refused with a log line and NULL
  (`contains_prop`, libobs/obs-properties.c:461-470); `obs_properties_add_int` is a spin box (a number field,
  OBS_NUMBER_SCROLLER, libobs/obs-properties.c:544-549), `..._int_slider` a slider (:558-563).
- obs_data: a getter returns the user value, else the default, else zero/empty; numbers read
  as either kind (libobs/obs-data.c).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOG_ERROR, LOG_WARNING, LOG_INFO = 100, 200, 300
OBS_TEXT_DEFAULT, OBS_TEXT_PASSWORD, OBS_TEXT_MULTILINE, OBS_TEXT_INFO = 0, 1, 2, 3
OBS_TEXT_INFO_NORMAL, OBS_TEXT_INFO_WARNING, OBS_TEXT_INFO_ERROR = 0, 1, 2
OBS_EDITABLE_LIST_TYPE_STRINGS = 0
FRAME_NS = 1_000_000_000 // 60  # one video tick at 60 fps


class Data:
    """obs_data_t: user values over defaults."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.defaults: dict[str, Any] = {}

    def get(self, key: str, empty: Any) -> Any:
        return self.values.get(key, self.defaults.get(key, empty))


class DataArray(list):  # type: ignore[type-arg]
    pass


class Property:
    def __init__(self, kind: str, name: str, description: str, args: tuple[Any, ...]) -> None:
        self.kind = kind
        self.name = name
        self.description = description
        self.args = args
        self.modified: Callable[..., Any] | None = None
        self.visible = True
        self.info_type = OBS_TEXT_INFO_NORMAL

    def row(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.name, "label": self.description, "args": self.args}


class Properties:
    """obs_properties_t: properties in the order they were added."""

    def __init__(self) -> None:
        self.items: dict[str, Property] = {}

    def rows(self) -> list[dict[str, Any]]:
        return [p.row() for p in self.items.values() if p.visible]

    def shown(self) -> list[str]:
        """The names of the visible properties, in order."""
        return [p.name for p in self.items.values() if p.visible]

    def __getitem__(self, name: str) -> dict[str, Any]:
        return self.items[name].row()


class _Timer:
    def __init__(self, callback: Callable[[], Any], interval_ns: int, start_ns: int) -> None:
        self.callback = callback
        self.interval_ns = interval_ns
        self.last_ns = start_ns
        self.removed = False


def make() -> types.ModuleType:
    """A fresh `obspython`; `m.host` is set by `Obs` (timers need its clock)."""
    m = types.ModuleType("obspython")
    for name, value in globals().items():
        if name.startswith(("LOG_", "OBS_")):
            setattr(m, name, value)
    m.logged = []  # type: ignore[attr-defined]
    m.hotkeys = {}  # type: ignore[attr-defined]
    m.frame_ns = 0  # type: ignore[attr-defined]
    m.timers = []  # type: ignore[attr-defined]  # active ones
    m.deferred = []  # type: ignore[attr-defined]  # added, joining at the next tick
    m.current = None  # type: ignore[attr-defined]  # the timer being called

    def numeric(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    def typed(kind: type, empty: Any) -> Any:
        def check(key: str, value: Any, what: str) -> None:
            ok = numeric(value) if kind in (int, float) else isinstance(value, kind)
            assert ok, f"{key} {what} {value!r}, not {kind.__name__}"

        def getter(data: Data, key: str) -> Any:
            value = data.get(key, empty)
            check(key, value, "holds")
            return kind(value)

        def setter(data: Data, key: str, value: Any) -> None:
            check(key, value, "set to")
            data.values[key] = value

        def default(data: Data, key: str, value: Any) -> None:
            check(key, value, "default")
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

    def add(kind: str) -> Callable[..., Property | None]:
        def adder(props: Properties, name: str, description: str, *rest: Any) -> Property | None:
            if name in props.items:  # contains_prop, libobs/obs-properties.c:461-470
                m.logged.append((LOG_WARNING, f"Property '{name}' exists"))
                return None
            prop = Property(kind, name, description, rest)
            props.items[name] = prop
            return prop

        return adder

    m.obs_properties_create = Properties  # type: ignore[attr-defined]
    m.obs_properties_destroy = lambda props: None  # type: ignore[attr-defined]
    for kind in ("text", "int", "int_slider", "float", "float_slider", "bool", "editable_list"):
        setattr(m, f"obs_properties_add_{kind}", add(kind))
    m.obs_properties_get = lambda props, name: props.items.get(name)  # type: ignore[attr-defined]
    m.obs_properties_remove_by_name = lambda props, name: props.items.pop(name, None) and None  # type: ignore[attr-defined]
    m.obs_property_name = lambda prop: prop.name  # type: ignore[attr-defined]
    m.obs_property_set_description = lambda prop, text: setattr(prop, "description", text)  # type: ignore[attr-defined]
    m.obs_property_set_visible = lambda prop, visible: setattr(prop, "visible", bool(visible))  # type: ignore[attr-defined]
    m.obs_property_text_set_info_type = lambda prop, kind: setattr(prop, "info_type", kind)  # type: ignore[attr-defined]

    def set_modified(prop: Property, callback: Any) -> None:
        if isinstance(callback, types.FunctionType):  # PyFunction_Check, python.c:982
            prop.modified = callback

    m.obs_property_set_modified_callback = set_modified  # type: ignore[attr-defined]

    def timer_add(callback: Any, ms: int) -> None:
        assert isinstance(ms, int), f"timer_add takes int milliseconds ('Oi'), got {ms!r}"
        m.deferred.append(_Timer(callback, ms * 1_000_000, m.frame_ns))

    def timer_remove(callback: Any) -> None:
        for timer in [*m.timers, *m.deferred]:  # the first one of that function
            if timer.callback is callback and not timer.removed:
                timer.removed = True
                return

    def remove_current_callback() -> None:
        if m.current is not None:
            m.current.removed = True

    m.timer_add = timer_add  # type: ignore[attr-defined]
    m.timer_remove = timer_remove  # type: ignore[attr-defined]
    m.remove_current_callback = remove_current_callback  # type: ignore[attr-defined]

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


class Obs:
    """OBS running one script: `start()` as at start-up (or Tools > Scripts > +), `open()` the
    Scripts window on it, `change()`/`type()` its controls, `tick()` video frames, `reload()`.
    `calls` records each script function OBS called, in order."""

    def __init__(self, script: Path, saved: dict[str, Any] | None = None) -> None:
        self.script = script
        self.obs = make()
        self.settings = Data()
        self.settings.values.update(saved or {})  # python.c:1333-1334
        self.calls: list[str] = []
        self.module: Any = None
        self.description = ""
        self.props: Properties | None = None  # what the Scripts window shows

    def _call(self, name: str, *args: Any) -> Any:
        function = getattr(self.module, name, None)
        if function is None:
            return None
        self.calls.append(name)
        return function(*args)

    def start(self) -> Any:
        """obs_python_script_create: import, defaults, description, load, then update."""
        sys.modules["obspython"] = self.obs
        spec = importlib.util.spec_from_file_location(self.script.stem, self.script)
        assert spec is not None and spec.loader is not None
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)
        self._call("script_defaults", self.settings)
        self.description = self._call("script_description") or ""
        self._call("script_load", self.settings)
        self._call("script_update", self.settings)
        return self.module

    def open(self) -> Properties:
        """The Scripts window shows the script: ReloadProperties (view.cpp:89-119)."""
        self.props = self._call("script_properties")
        assert isinstance(self.props, Properties)
        return self.props

    def apply_to_empty_settings(self) -> None:
        """scripts.cpp:251-266 and 368-371: script_properties on a throwaway object, and every
        modified callback run with a fresh empty settings object."""
        props = self._call("script_properties")
        empty = Data()
        for prop in list(props.items.values()):
            if prop.modified is not None:
                self.calls.append(f"modified:{prop.name}")
                prop.modified(props, prop, empty)

    def change(self, key: str, value: Any) -> bool:
        """One control change (view.cpp:2002-2102); True when the widgets were laid out again."""
        assert self.props is not None, "open() the Scripts window first"
        assert key in self.props.shown(), f"no control {key!r} on screen: {self.props.shown()}"
        self.settings.values[key] = value
        self._call("script_update", self.settings)
        prop = self.props.items[key]
        if prop.modified is None:
            return False
        self.calls.append(f"modified:{key}")
        return prop.modified(self.props, prop, self.settings) is True  # python.c:957

    def type(self, key: str, text: str, *, start: str = "") -> None:
        """Typing `text` at the end of a text box that holds `start`: one change per key."""
        for i in range(1, len(text) + 1):
            self.change(key, start + text[:i])

    def tick(self, seconds: float = 1 / 60) -> None:
        """Video frames for `seconds`: python_tick's timer pass once per frame."""
        for _ in range(max(1, round(seconds * 60))):
            self.obs.frame_ns += FRAME_NS
            self.obs.timers += self.obs.deferred
            self.obs.deferred = []
            for timer in list(self.obs.timers):
                if timer.removed:
                    self.obs.timers.remove(timer)
                elif self.obs.frame_ns - timer.last_ns >= timer.interval_ns:
                    self.obs.current = timer
                    try:
                        timer.callback()
                    finally:
                        self.obs.current = None
                    timer.last_ns += timer.interval_ns

    def reload(self) -> None:
        """Reload Scripts: script_unload, the module run again from its file, the start-up
        sequence on the same settings, then the throwaway properties pass and a new window."""
        self._call("script_unload")
        self.start()
        self.apply_to_empty_settings()
        self.open()


def string_list(*items: str) -> DataArray:
    """What OBS stores for an editable list of strings: obs_data items with a "value"."""
    array = DataArray()
    for text in items:
        item = Data()
        item.values["value"] = text
        array.append(item)
    return array
