"""StreamDiffusion Bridge controls for OBS Studio (Tools > Scripts > +).

Shows the bridge's live parameters as script properties: the prompt as text, a slider for every
numeric parameter with a range (guidance, delta, strength, the similarity filter, ...), check
boxes for the on/off ones, and a list of prompt presets that can be bound to hotkeys (Settings >
Hotkeys > "sdbridge: prompt preset N"). A change is sent to the bridge as OSC over UDP right away.

The properties come from the bridge's parameter spec, `sdbridge_params.json` (made by `sdbridge
params --json`). It is read from this script's folder, then from ../touchdesigner/, so the
script works from a checkout of the project or copied into OBS's scripts folder together with
the JSON file. OBS's Python has only the standard library, so this file carries its own small
OSC encoder (tests check it byte for byte against python-osc).
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
    candidates = [Path(override).expanduser()] if override else []
    candidates += [script_dir / SPEC_NAME, script_dir.parent / "touchdesigner" / SPEC_NAME]
    return next((p for p in candidates if p.is_file()), None)


def controls(spec: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The live parameters OBS can show, each with the widget it gets: "text" for the prompts,
    "float"/"int" sliders for numbers with a range, "bool" check boxes. Lists (t_index_list,
    prompt_blend) are left to OSC: strength moves the steps from a slider."""
    shown = []
    for row in spec:
        if not row["live"]:
            continue
        kind = row["type"]
        if kind == "string" and row["name"] in TEXT_PARAMS:
            widget = "text"
        elif kind in ("float", "int") and row["min"] is not None and row["max"] is not None:
            widget = kind
        elif kind == "bool":
            widget = "bool"
        else:
            continue
        shown.append({**row, "widget": widget})
    return shown


def slider_step(row: dict[str, Any]) -> float:
    if row["widget"] == "int":
        return 1
    return round((row["max"] - row["min"]) / 200, 6)


class Bridge:
    """Where the OSC goes, and the last value sent per parameter (only changes are sent)."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 7000
        self.sent: dict[str, Any] = {}
        self.spec: list[dict[str, Any]] = []
        self.spec_error = ""
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
            self.spec, self.spec_error = (
                [],
                f"{SPEC_NAME} not found next to the script or in ../touchdesigner/",
            )
            return
        try:
            self.spec, self.spec_error = controls(json.loads(path.read_text(encoding="utf-8"))), ""
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.spec, self.spec_error = [], f"{path} is not a parameter spec: {exc}"


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
    if widget == "int":
        return int(obs.obs_data_get_int(settings, key))
    return bool(obs.obs_data_get_bool(settings, key))


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
    """Send prompt preset `index` (0-based); False when there is none."""
    if index >= len(STATE.presets):
        return False
    STATE.send("/sd/prompt", STATE.presets[index])
    STATE.sent["prompt"] = STATE.presets[index]
    return True


def _preset_hotkey(index: int) -> Any:
    def pressed(is_pressed: bool) -> None:
        if is_pressed:
            send_preset(index)

    return pressed


# --------------------------------------------------------------------- the obspython interface


def script_description() -> str:
    text = (
        "<b>StreamDiffusion Bridge</b><br>Steers a running <code>sdbridge run</code> over OSC. "
        "Presets can be bound to hotkeys in Settings &gt; Hotkeys."
    )
    if STATE.spec_error:
        text += f"<br><b>Problem:</b> {STATE.spec_error}"
    return text


def script_defaults(settings: Any) -> None:
    obs.obs_data_set_default_string(settings, "host", "127.0.0.1")
    obs.obs_data_set_default_int(settings, "port", 7000)
    if not STATE.spec:
        STATE.load_spec()
    for row in STATE.spec:
        key, default = _key(row["name"]), row["default"]
        if row["widget"] == "text":
            obs.obs_data_set_default_string(settings, key, default)
        elif row["widget"] == "float":
            obs.obs_data_set_default_double(settings, key, float(default))
        elif row["widget"] == "int":
            obs.obs_data_set_default_int(settings, key, int(default))
        else:
            obs.obs_data_set_default_bool(settings, key, bool(default))


def script_properties() -> Any:
    props = obs.obs_properties_create()
    obs.obs_properties_add_text(props, "host", "Bridge host", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_int(props, "port", "Bridge OSC port", 1, 65535, 1)
    obs.obs_properties_add_text(
        props, "spec", "Parameter spec (blank: next to the script)", obs.OBS_TEXT_DEFAULT
    )
    for row in STATE.spec:
        key, label = _key(row["name"]), row["name"].replace("/", " ").replace("_", " ").capitalize()
        if row["widget"] == "text":
            obs.obs_properties_add_text(props, key, label, obs.OBS_TEXT_MULTILINE)
        elif row["widget"] == "float":
            obs.obs_properties_add_float_slider(props, key, label, row["min"], row["max"], slider_step(row))
        elif row["widget"] == "int":
            obs.obs_properties_add_int_slider(props, key, label, int(row["min"]), int(row["max"]), 1)
        else:
            obs.obs_properties_add_bool(props, key, label)
    obs.obs_properties_add_editable_list(
        props, "presets", "Prompt presets (hotkeys 1-8)", obs.OBS_EDITABLE_LIST_TYPE_STRINGS, None, None
    )
    return props


def script_update(settings: Any) -> None:
    """OBS calls this on every property change: send what changed."""
    STATE.host = obs.obs_data_get_string(settings, "host") or "127.0.0.1"
    STATE.port = int(obs.obs_data_get_int(settings, "port") or 7000)
    spec_path = obs.obs_data_get_string(settings, "spec")
    if not STATE.spec or spec_path:
        STATE.load_spec(spec_path)
    STATE.presets = _presets(settings)
    for row in STATE.spec:
        value = _value(settings, row)
        if STATE.sent.get(row["name"]) != value:
            STATE.sent[row["name"]] = value
            STATE.send(row["address"], value)


def script_load(settings: Any) -> None:
    STATE.load_spec(obs.obs_data_get_string(settings, "spec"))
    STATE.sent = {}
    STATE.hotkeys = []
    for i in range(PRESET_HOTKEYS):
        hotkey = obs.obs_hotkey_register_frontend(
            f"sdbridge_preset_{i + 1}", f"sdbridge: prompt preset {i + 1}", _preset_hotkey(i)
        )
        saved = obs.obs_data_get_array(settings, f"sdbridge_preset_{i + 1}")
        obs.obs_hotkey_load(hotkey, saved)
        obs.obs_data_array_release(saved)
        STATE.hotkeys.append(hotkey)


def script_save(settings: Any) -> None:
    for i, hotkey in enumerate(STATE.hotkeys):
        saved = obs.obs_hotkey_save(hotkey)
        obs.obs_data_set_array(settings, f"sdbridge_preset_{i + 1}", saved)
        obs.obs_data_array_release(saved)
