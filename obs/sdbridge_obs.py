"""StreamDiffusion Bridge controls for OBS Studio (Tools > Scripts > +).

Shows the bridge's live parameters as script properties, under the labels of the bridge's
parameter table: the prompts as text, a slider for every numeric parameter with a short range
(guidance, delta, strength, the similarity filter, ...), a number field for the seed, check
boxes for the on/off ones, and a list of prompt presets that can be bound to hotkeys (Settings >
Hotkeys > "sdbridge: prompt preset N"). A change is sent to the bridge as OSC over UDP at once;
a prompt is sent when typing pauses (TYPING_PAUSE_MS) or on Enter, not once per key.

The properties come from the bridge's parameter spec, `sdbridge_params.json` (made by `sdbridge
params --json`): the file the "Parameter spec" setting names, else the one in this script's
folder, else ../touchdesigner/, so the script works from a checkout of the project or copied into
OBS's scripts folder together with the JSON file. OBS's Python has only the standard library, so
this file carries its own small OSC encoder (tests check it byte for byte against python-osc).

How OBS 29 calls a script (deps/obs-scripting/obs-scripting-python.c; the test stand-in
tests/obspython_standin.py copies it): script_defaults, script_description, script_load, then
script_update at start-up; script_properties when the Scripts window shows the script;
script_update on every change of a control, key by key in a text box, then the control's
modified callback, whose True lays out the *same* properties object again (script_properties is
not called again). The description is read once, at load, so problems are shown as a property.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any

try:
    import obspython as obs  # provided by OBS when it runs the script
except ImportError:  # imported outside OBS (the tests put a stand-in in its place first)
    obs = None

PRESET_HOTKEYS = 8
SPEC_NAME = "sdbridge_params.json"
TEXT_PARAMS = ("prompt", "negative_prompt")
TYPING_PAUSE_MS = 700  # a prompt goes out this long after the last key (or at once on Enter)
SLIDER_STEPS = 1000  # an int range wider than this gets a number field (the seed), not a slider


# --------------------------------------------------------------------------------- OSC encoding


def _pad(data: bytes) -> bytes:
    """OSC strings and blobs end on a 4-byte boundary (strings with at least one NUL)."""
    return data + b"\0" * (4 - len(data) % 4)


def osc_message(address: str, *args: Any) -> bytes:
    """One OSC 1.0 message, typed as python-osc types it: str -> s, bool -> T/F and None -> N
    (no payload), int -> i (int32), or h (int64) past 31 bits, float -> f (float32)."""
    tags = ","
    payload = b""
    for arg in args:
        if arg is None:
            tags += "N"
        elif isinstance(arg, bool):
            tags += "T" if arg else "F"
        elif isinstance(arg, int) and arg.bit_length() > 31:
            tags += "h"
            payload += struct.pack(">q", arg)
        elif isinstance(arg, int):
            tags += "i"
            payload += struct.pack(">i", arg)
        elif isinstance(arg, float):
            tags += "f"
            payload += struct.pack(">f", arg)
        elif isinstance(arg, str):
            tags += "s"
            payload += _pad(arg.encode("utf-8"))
        else:
            raise TypeError(f"OSC cannot carry {type(arg).__name__} {arg!r}")
    return _pad(address.encode("utf-8")) + _pad(tags.encode("ascii")) + payload


# ------------------------------------------------------------------------------ the parameters


def find_spec(script_dir: Path, override: str = "") -> Path | None:
    """The spec file: `override` when set (and only it), else beside the script, else in
    ../touchdesigner/."""
    if override:
        path = Path(override).expanduser()
        return path if path.is_file() else None
    candidates = [script_dir / SPEC_NAME, script_dir.parent / "touchdesigner" / SPEC_NAME]
    return next((p for p in candidates if p.is_file()), None)


def controls(spec: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The live parameters OBS can show, each with the widget it gets: "text" for the prompts,
    "float"/"int" sliders for numbers with a range, "number" fields for ints with a range too
    wide to slide over (the seed), "bool" check boxes. Lists (t_index_list, prompt_blend) are
    left to OSC: strength moves the steps from a slider."""
    shown = []
    for row in spec:
        if not row["live"]:
            continue
        kind = row["type"]
        if kind == "string" and row["name"] in TEXT_PARAMS:
            widget = "text"
        elif kind == "int" and row["min"] is not None and row["max"] is not None:
            widget = "number" if row["max"] - row["min"] > SLIDER_STEPS else "int"
        elif kind == "float" and row["min"] is not None and row["max"] is not None:
            widget = "float"
        elif kind == "bool":
            widget = "bool"
        else:
            continue
        label = row.get("label") or row["name"].replace("/", " ").replace("_", " ").capitalize()
        shown.append({**row, "widget": widget, "label": label})
    return shown


def slider_step(row: dict[str, Any]) -> float:
    if row["widget"] in ("int", "number"):
        return 1
    return round((row["max"] - row["min"]) / 200, 6)


class Bridge:
    """Where the OSC goes, what the controls held at the last script_update (`seen`), the last
    text sent from each text box (`sent`) and the texts waiting for typing to pause (`typing`).

    A control is sent when its value differs from `seen`, so another control's change or a
    preset hotkey (which never touches `seen`) does not send it again."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 7000
        self.seen: dict[str, Any] = {}
        self.sent: dict[str, str] = {}
        self.typing: dict[str, str] = {}
        self.spec: list[dict[str, Any]] = []
        self.spec_error = ""
        self.spec_setting: str | None = None  # the "spec" setting the spec was loaded for
        self.on_screen: tuple[Any, ...] = ()  # what the properties were last built from
        self.presets: list[str] = []
        self.hotkeys: list[Any] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, address: str, *args: Any) -> None:
        try:
            self._sock.sendto(osc_message(address, *args), (self.host, self.port))
        except OSError as exc:  # a wrong host must not take OBS's script host down
            _log(f"sdbridge: could not send {address} to {self.host}:{self.port}: {exc}")

    def load_spec(self, override: str = "") -> None:
        path = find_spec(Path(__file__).resolve().parent, override)
        if path is None:
            self.spec = []
            self.spec_error = (
                f"Parameter spec {override!r} not found; type the path of a {SPEC_NAME}"
                if override
                else f"{SPEC_NAME} not found next to the script or in ../touchdesigner/; copy it "
                "beside the script or type its path into Parameter spec"
            )
            return
        try:
            self.spec, self.spec_error = controls(json.loads(path.read_text(encoding="utf-8"))), ""
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.spec, self.spec_error = [], f"{path} is not a parameter spec: {exc}"

    def screen(self) -> tuple[Any, ...]:
        return (self.spec_error, tuple(row["name"] for row in self.spec))


STATE = Bridge()


def _log(message: str) -> None:
    if obs is not None:
        obs.script_log(obs.LOG_WARNING, message)


def _key(name: str) -> str:
    return "sd_" + name.replace("/", "_")


def _value(settings: Any, row: dict[str, Any]) -> Any:
    key = _key(row["name"])
    widget = row["widget"]
    if widget == "text":
        return obs.obs_data_get_string(settings, key)
    if widget == "float":
        return float(obs.obs_data_get_double(settings, key))
    if widget in ("int", "number"):
        return int(obs.obs_data_get_int(settings, key))
    return bool(obs.obs_data_get_bool(settings, key))


def _sync_spec(settings: Any) -> None:
    """Load the spec the "spec" setting names, when it is not the one loaded, and set its
    defaults into `settings` (every getter falls back on them)."""
    setting = obs.obs_data_get_string(settings, "spec").strip()
    if setting == STATE.spec_setting:
        return
    STATE.load_spec(setting)
    STATE.spec_setting = setting
    for row in STATE.spec:
        key, default = _key(row["name"]), row["default"]
        if row["widget"] == "text":
            obs.obs_data_set_default_string(settings, key, str(default))
        elif row["widget"] == "float":
            obs.obs_data_set_default_double(settings, key, float(default))
        elif row["widget"] in ("int", "number"):
            obs.obs_data_set_default_int(settings, key, int(default))
        else:
            obs.obs_data_set_default_bool(settings, key, bool(default))


def _presets(settings: Any) -> list[str]:
    array = obs.obs_data_get_array(settings, "presets")
    items = []
    for i in range(obs.obs_data_array_count(array)):
        item = obs.obs_data_array_item(array, i)
        text = obs.obs_data_get_string(item, "value").strip()
        obs.obs_data_release(item)
        if text:
            items.append(text)
    obs.obs_data_array_release(array)
    return items


def send_preset(index: int) -> bool:
    """Send prompt preset `index` (0-based); False when there is none. The Prompt box keeps its
    text: it is sent again only when it is edited (`sent` forgets it)."""
    if index >= len(STATE.presets):
        return False
    STATE.typing.pop("prompt", None)  # the newest action wins over a prompt still being typed
    STATE.sent.pop("prompt", None)
    STATE.send("/sd/prompt", STATE.presets[index])
    return True


def _preset_hotkey(index: int) -> Any:
    def pressed(is_pressed: bool) -> None:
        if is_pressed:
            send_preset(index)

    return pressed


def _text_changed(row: dict[str, Any], text: str, *, at_once: bool) -> None:
    """A text box's new content: sent now (start-up, Enter) or when typing pauses."""
    name, wanted = row["name"], text.strip()
    if STATE.sent.get(name) == wanted:
        STATE.typing.pop(name, None)  # typed back to what the bridge has
        return
    if at_once or text.endswith("\n"):
        STATE.typing.pop(name, None)
        STATE.sent[name] = wanted
        STATE.send(row["address"], wanted)
        return
    STATE.typing[name] = wanted
    obs.timer_remove(_typing_paused)  # the pause starts again from this key
    obs.timer_add(_typing_paused, TYPING_PAUSE_MS)


def _typing_paused() -> None:
    """OBS timer: typing stopped for TYPING_PAUSE_MS; send what was typed, once."""
    obs.remove_current_callback()
    _send_typed()


def _send_typed() -> None:
    addresses = {row["name"]: row["address"] for row in STATE.spec}
    for name, text in STATE.typing.items():
        if name in addresses:
            STATE.sent[name] = text
            STATE.send(addresses[name], text)
    STATE.typing.clear()


def _add_controls(props: Any) -> None:
    """Everything after the connection fields: the problem (if any), the parameters, presets."""
    if STATE.spec_error:
        problem = obs.obs_properties_add_text(
            props, "problem", f"Problem: {STATE.spec_error}", obs.OBS_TEXT_INFO
        )
        obs.obs_property_text_set_info_type(problem, obs.OBS_TEXT_INFO_ERROR)
    for row in STATE.spec:
        key, label = _key(row["name"]), row["label"]
        if row["widget"] == "text":
            obs.obs_properties_add_text(props, key, label, obs.OBS_TEXT_MULTILINE)
        elif row["widget"] == "float":
            obs.obs_properties_add_float_slider(props, key, label, row["min"], row["max"], slider_step(row))
        elif row["widget"] == "int":
            obs.obs_properties_add_int_slider(props, key, label, int(row["min"]), int(row["max"]), 1)
        elif row["widget"] == "number":
            obs.obs_properties_add_int(props, key, label, int(row["min"]), int(row["max"]), 1)
        else:
            obs.obs_properties_add_bool(props, key, label)
    obs.obs_properties_add_editable_list(
        props, "presets", "Prompt presets (hotkeys 1-8)", obs.OBS_EDITABLE_LIST_TYPE_STRINGS, None, None
    )
    STATE.on_screen = STATE.screen()


def _spec_modified(props: Any, prop: Any, settings: Any) -> bool:
    """The "spec" control changed. script_update has already loaded the spec it names (OBS
    calls it first), so only the controls on screen are rebuilt, in the object OBS shows. The
    settings given here may be a fresh empty object (Reload runs every modified callback so),
    so they are not read."""
    if STATE.on_screen == STATE.screen():
        return False
    for name in ("problem", *(_key(name) for name in STATE.on_screen[1]), "presets"):
        obs.obs_properties_remove_by_name(props, name)
    _add_controls(props)
    return True


# --------------------------------------------------------------------- the obspython interface


def script_description() -> str:
    return (
        "<b>StreamDiffusion Bridge</b><br>Steers a running <code>sdbridge run</code> over OSC. "
        "Presets can be bound to hotkeys in Settings &gt; Hotkeys."
    )


def script_defaults(settings: Any) -> None:
    """First of all (before script_load): the defaults of the spec the settings name."""
    obs.obs_data_set_default_string(settings, "host", "127.0.0.1")
    obs.obs_data_set_default_int(settings, "port", 7000)
    _sync_spec(settings)


def script_properties() -> Any:
    props = obs.obs_properties_create()
    obs.obs_properties_add_text(props, "host", "Bridge host", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_int(props, "port", "Bridge OSC port", 1, 65535, 1)
    spec = obs.obs_properties_add_text(
        props, "spec", "Parameter spec (blank: next to the script)", obs.OBS_TEXT_DEFAULT
    )
    obs.obs_property_set_modified_callback(spec, _spec_modified)
    _add_controls(props)
    return props


def script_update(settings: Any) -> None:
    """OBS calls this at start-up and on every change of a control: send what changed."""
    STATE.host = obs.obs_data_get_string(settings, "host") or "127.0.0.1"
    STATE.port = int(obs.obs_data_get_int(settings, "port") or 7000)
    _sync_spec(settings)
    STATE.presets = _presets(settings)
    for row in STATE.spec:
        name, value = row["name"], _value(settings, row)
        if name in STATE.seen and STATE.seen[name] == value:
            continue
        first = name not in STATE.seen
        STATE.seen[name] = value
        if row["widget"] == "text":
            _text_changed(row, value, at_once=first)
        else:
            STATE.send(row["address"], value)


def script_load(settings: Any) -> None:
    _sync_spec(settings)
    STATE.seen, STATE.sent, STATE.typing = {}, {}, {}
    STATE.hotkeys = []
    for i in range(PRESET_HOTKEYS):
        hotkey = obs.obs_hotkey_register_frontend(
            f"sdbridge_preset_{i + 1}", f"sdbridge: prompt preset {i + 1}", _preset_hotkey(i)
        )
        saved = obs.obs_data_get_array(settings, f"sdbridge_preset_{i + 1}")
        obs.obs_hotkey_load(hotkey, saved)
        obs.obs_data_array_release(saved)
        STATE.hotkeys.append(hotkey)


def script_unload() -> None:
    """Reload, removal or exit: a prompt still waiting for the typing pause goes out now."""
    obs.timer_remove(_typing_paused)
    _send_typed()


def script_save(settings: Any) -> None:
    for i, hotkey in enumerate(STATE.hotkeys):
        saved = obs.obs_hotkey_save(hotkey)
        obs.obs_data_set_array(settings, f"sdbridge_preset_{i + 1}", saved)
        obs.obs_data_array_release(saved)
