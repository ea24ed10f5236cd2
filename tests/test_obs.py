"""The OBS script (obs/sdbridge_obs.py) with a stand-in for `obspython`: its OSC encoder against
python-osc byte for byte, the properties it derives from the parameter spec, the datagrams a
property change sends, preset hotkeys, and a real UDP round trip into a running bridge."""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.params import LIVE, Kind
from bridge.runtime import in_background
from tests import obspython_standin
from tests.conftest import tiny_bridge
from tests.obspython_standin import Data, string_list

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    standin = obspython_standin.make()
    monkeypatch.setitem(sys.modules, "obspython", standin)
    spec = importlib.util.spec_from_file_location("sdbridge_obs", ROOT / "obs" / "sdbridge_obs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.obs_standin = standin  # type: ignore[attr-defined]
    yield module


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    yield sock
    sock.close()


def python_osc(address: str, *args: Any) -> bytes:
    builder = OscMessageBuilder(address=address)
    for arg in args:
        builder.add_arg(arg)
    return bytes(builder.build().dgram)


@pytest.mark.parametrize(
    "address,args",
    [
        ("/sd/prompt", ("a watercolor forest",)),
        ("/sd/prompt", ("",)),
        ("/sd/prompt", ("abc",)),  # 3 bytes + NUL: exactly one word
        ("/sd/prompt", ("abcd",)),  # 4 bytes: a whole padding word more
        ("/sd/prompt", ("néon 都市 🌃",)),  # UTF-8
        ("/sd/guidance", (1.2,)),
        ("/sd/guidance", (-0.0,)),
        ("/sd/delta", (3.4028234663852886e38,)),
        ("/sd/seed", (0,)),
        ("/sd/seed", (2147483647,)),
        ("/sd/seed", (-2147483648,)),  # 32 bits: python-osc sends int64 here
        ("/sd/seed", (2**40,)),
        ("/x", (None,)),
        ("/sd/freeze", (True,)),
        ("/sd/bypass", (False,)),
        ("/sd/get", ()),
        ("/sd/t_index_list", (20, 30, 38, 45)),
        ("/sd/prompt_blend", ("a cat", 0.7, "a dog", 0.3)),
        ("/a", ("x", 1, 2.5, True, False)),
    ],
)
def test_the_scripts_osc_encoder_matches_python_osc(
    script: ModuleType, address: str, args: tuple[Any, ...]
) -> None:
    assert script.osc_message(address, *args) == python_osc(address, *args)


def test_the_encoder_refuses_what_osc_cannot_carry(script: ModuleType) -> None:
    with pytest.raises(TypeError, match="OSC cannot carry list"):
        script.osc_message("/sd/x", [1, 2])


def test_properties_come_from_the_parameter_spec(script: ModuleType) -> None:
    settings = Data()
    script.script_load(settings)
    script.script_defaults(settings)
    props = {p["key"]: p for p in script.script_properties()}
    assert props["sd_prompt"]["kind"] == "text" and props["sd_prompt"]["args"] == (2,)  # multiline
    assert props["sd_guidance"]["kind"] == "float_slider" and props["sd_guidance"]["args"] == (
        0.0,
        10.0,
        0.05,
    )
    assert props["sd_strength"]["args"][:2] == (0.0, 1.0)
    assert props["sd_ssf_max_skip"] == {
        "kind": "int_slider",
        "key": "sd_ssf_max_skip",
        "label": "Ssf max skip",
        "args": (0, 100, 1),
    }
    assert props["sd_ssf_enabled"]["kind"] == "bool" and props["sd_freeze"]["kind"] == "bool"
    assert props["presets"]["kind"] == "editable_list"
    # every live number with a range and every on/off parameter is there, with nothing hand-listed
    wanted = {
        f"sd_{n.replace('/', '_')}"
        for n, p in LIVE.items()
        if (p.numeric and p.maximum is not None) or p.kind is Kind.BOOL
    }
    assert wanted <= set(props)
    for name, p in LIVE.items():
        key = f"sd_{name.replace('/', '_')}"
        if key in props and p.kind is not Kind.STRING:
            assert settings.defaults[key] == p.default
    assert "Problem" not in script.script_description()


def test_a_property_change_sends_exactly_that_change(script: ModuleType, listener: socket.socket) -> None:
    settings = Data()
    settings.values.update(host="127.0.0.1", port=listener.getsockname()[1])
    script.script_load(settings)
    script.script_defaults(settings)
    script.script_update(settings)  # the first update sends every value once
    first = []
    while True:
        try:
            first.append(listener.recv(65536))
        except TimeoutError:
            break
    assert python_osc("/sd/prompt", "a photo of a cat, studio lighting") in first
    assert python_osc("/sd/guidance", 1.2) in first
    assert python_osc("/sd/ssf/max_skip", 10) in first
    settings.values["sd_guidance"] = 3.5
    settings.values["sd_freeze"] = True
    script.script_update(settings)
    got = {listener.recv(65536), listener.recv(65536)}
    assert got == {python_osc("/sd/guidance", 3.5), python_osc("/sd/freeze", True)}
    script.script_update(settings)  # nothing changed: nothing sent
    with pytest.raises(TimeoutError):
        listener.recv(65536)


def test_preset_hotkeys(script: ModuleType, listener: socket.socket) -> None:
    settings = Data()
    settings.values.update(
        host="127.0.0.1", port=listener.getsockname()[1], presets=string_list("neon city", " ", "ink")
    )
    settings.values["sdbridge_preset_2"] = obspython_standin.DataArray(["saved key"])
    script.script_load(settings)
    script.script_defaults(settings)
    script.script_update(settings)
    while True:  # drop the first full send
        try:
            listener.recv(65536)
        except TimeoutError:
            break
    hotkeys = script.obs_standin.hotkeys
    assert [h["description"] for h in hotkeys.values()] == [
        f"sdbridge: prompt preset {i}" for i in range(1, 9)
    ]
    assert hotkeys[2]["keys"] == ["saved key"]  # bindings come back from the settings
    hotkeys[2]["callback"](True)  # preset 2 is "ink": the blank entry is skipped
    assert listener.recv(65536) == python_osc("/sd/prompt", "ink")
    hotkeys[1]["callback"](False)  # a key release sends nothing
    hotkeys[5]["callback"](True)  # no fifth preset
    with pytest.raises(TimeoutError):
        listener.recv(65536)
    script.script_save(settings)
    assert list(settings.values["sdbridge_preset_2"]) == ["saved key"]


def test_a_missing_spec_is_shown_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, listener: socket.socket
) -> None:
    """The script copied into OBS's scripts folder without its JSON file: OBS shows why, and
    nothing is sent or raised."""
    monkeypatch.setitem(sys.modules, "obspython", obspython_standin.make())
    alone = tmp_path / "scripts" / "sdbridge_obs.py"
    alone.parent.mkdir()
    alone.write_text((ROOT / "obs" / "sdbridge_obs.py").read_text())
    spec = importlib.util.spec_from_file_location("sdbridge_obs_alone", alone)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = Data()
    settings.values.update(host="127.0.0.1", port=listener.getsockname()[1])
    module.script_load(settings)
    module.script_defaults(settings)
    module.script_update(settings)
    assert "Problem:</b> sdbridge_params.json not found next to the script" in module.script_description()
    assert [p["key"] for p in module.script_properties()] == ["host", "port", "spec", "presets"]
    with pytest.raises(TimeoutError):
        listener.recv(65536)
    (alone.parent / "sdbridge_params.json").write_text(
        (ROOT / "touchdesigner" / "sdbridge_params.json").read_text()
    )
    module.script_update(settings)  # the file put beside it is picked up
    assert "Problem" not in module.script_description()
    assert listener.recv(65536)


def test_a_real_udp_round_trip_reaches_a_running_bridge(script: ModuleType, tiny_pipe: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bridge = tiny_bridge(tiny_pipe, [f"osc.port={port}", "osc.status_targets=[]", "runtime.fps=0"])
    with in_background(bridge, start_timeout_s=120):
        settings = Data()
        settings.values.update(host="127.0.0.1", port=port)
        script.script_load(settings)
        script.script_defaults(settings)
        script.script_update(settings)
        settings.values.update(sd_guidance=2.75, sd_prompt="a neon city at night", sd_ssf_max_skip=3)
        script.script_update(settings)
        deadline = time.monotonic() + 10
        want = {"guidance": 2.75, "prompt": "a neon city at night", "ssf/max_skip": 3}
        while {k: bridge.store.get(k) for k in want} != want:
            assert time.monotonic() < deadline, {k: bridge.store.get(k) for k in want}
            time.sleep(0.02)
        assert bridge.control is not None and bridge.control.counters.as_dict()["rejected"] == 0
