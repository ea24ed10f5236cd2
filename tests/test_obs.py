"""The OBS script (obs/sdbridge_obs.py) run by a stand-in for OBS 29 (tests/obspython_standin.py)
that calls it as real OBS does: its OSC encoder against python-osc byte for byte, the order of
OBS's calls, the properties it derives from the parameter spec (named by a setting or found
beside it), the datagrams that start-up, a control change, typing and a preset hotkey send,
and a real UDP round trip into a running bridge."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.control.wire import decode_reply
from bridge.params import LIVE, SEED_MAX, Kind, table
from bridge.runtime import in_background
from tests.conftest import tiny_bridge
from tests.obspython_standin import OBS_TEXT_INFO, OBS_TEXT_INFO_ERROR, DataArray, Obs, string_list

ROOT = Path(__file__).resolve().parents[1]


SCRIPT = ROOT / "obs" / "sdbridge_obs.py"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.3)
    yield sock
    sock.close()


@pytest.fixture(autouse=True)
def no_obspython_left() -> Iterator[None]:
    """Obs.start() puts its `obspython` into sys.modules, as OBS does; take it out after."""
    yield
    sys.modules.pop("obspython", None)


@pytest.fixture
def script(listener: socket.socket) -> ModuleType:
    """The script's module as OBS loaded it (for the encoder tests)."""
    module: ModuleType = Obs(SCRIPT, {"port": listener.getsockname()[1]}).start()
    return module


def received(listener: socket.socket) -> list[tuple[str, list[Any]]]:
    """Every datagram that arrived, decoded, until 0.3 s pass without one."""
    got = []
    while True:
        try:
            got.append(decode_reply(listener.recv(65536)))
        except TimeoutError:
            return got


def to(listener: socket.socket) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": listener.getsockname()[1]}


def alone(tmp_path: Path) -> Path:
    """The script copied into an OBS scripts folder without its JSON file."""
    path = tmp_path / "scripts" / "sdbridge_obs.py"
    path.parent.mkdir()
    path.write_text(SCRIPT.read_text())
    return path


def own_spec(tmp_path: Path) -> Path:
    """A parameter spec of one's own, with defaults unlike the bridge's."""
    rows = table()
    for row in rows:
        row["default"] = {"guidance": 2.5, "seed": 77, "prompt": "ink on paper"}.get(
            row["name"], row["default"]
        )
    path = tmp_path / "specs" / "mine.json"
    path.parent.mkdir()
    path.write_text(json.dumps(rows))
    return path


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


def test_obs_calls_defaults_then_description_load_update_and_properties_last() -> None:
    """The order of obs_python_script_create and the Scripts window (see the stand-in's notes)."""
    obs = Obs(SCRIPT)
    obs.start()
    obs.open()
    assert obs.calls == [
        "script_defaults",
        "script_description",
        "script_load",
        "script_update",
        "script_properties",
    ]


def test_properties_come_from_the_parameter_spec() -> None:
    obs = Obs(SCRIPT)
    obs.start()
    props = obs.open()
    assert props["sd_prompt"]["kind"] == "text" and props["sd_prompt"]["args"] == (2,)  # multiline
    assert props["sd_guidance"] == {
        "kind": "float_slider",
        "key": "sd_guidance",
        "label": "Guidance",
        "args": (0.0, 10.0, 0.05),
    }
    assert props["sd_strength"]["args"][:2] == (0.0, 1.0)
    # the table's labels, not "Ssf max skip"
    assert props["sd_ssf_max_skip"] == {
        "kind": "int_slider",
        "key": "sd_ssf_max_skip",
        "label": "Max skipped frames",
        "args": (0, 100, 1),
    }
    assert props["sd_ssf_enabled"]["label"] == "Similarity filter"
    assert props["sd_ssf_threshold"]["label"] == "Skip threshold"
    # the seed is a number field (OBS's spin box), not a slider over two billion values
    assert props["sd_seed"] == {"kind": "int", "key": "sd_seed", "label": "Seed", "args": (0, SEED_MAX, 1)}
    assert props["sd_ssf_enabled"]["kind"] == "bool" and props["sd_freeze"]["kind"] == "bool"
    assert props["presets"]["kind"] == "editable_list"
    # every live number with a range and every on/off parameter is there, with nothing hand-listed
    wanted = {
        f"sd_{n.replace('/', '_')}"
        for n, p in LIVE.items()
        if (p.numeric and p.maximum is not None) or p.kind is Kind.BOOL
    }
    assert wanted <= set(props.shown())
    for name, p in LIVE.items():
        key = f"sd_{name.replace('/', '_')}"
        if key in props.shown():
            assert obs.settings.defaults[key] == p.default
            assert props[key]["label"] == p.label
    assert "problem" not in props.shown()


def test_start_up_sends_every_value_once_then_a_change_sends_exactly_that_change(
    listener: socket.socket,
) -> None:
    obs = Obs(SCRIPT, to(listener))
    obs.start()
    first = received(listener)
    assert ("/sd/prompt", ["a photo of a cat, studio lighting"]) in first
    assert ("/sd/guidance", [pytest.approx(1.2)]) in first
    assert ("/sd/seed", [2]) in first and ("/sd/ssf/max_skip", [10]) in first
    obs.open()
    obs.change("sd_guidance", 3.5)
    obs.change("sd_freeze", True)
    assert received(listener) == [("/sd/guidance", [3.5]), ("/sd/freeze", [True])]
    obs.change("port", listener.getsockname()[1])  # nothing of the bridge's changed: nothing sent
    assert received(listener) == []


def test_a_spec_named_by_the_setting_sends_its_own_defaults_at_start_up(
    tmp_path: Path, listener: socket.socket
) -> None:
    """OBS calls script_defaults before script_load: the defaults must come from the spec the
    setting names, or start-up sends zeros (/sd/guidance 0.0, /sd/seed 0, /sd/prompt "")."""
    obs = Obs(alone(tmp_path), {**to(listener), "spec": str(own_spec(tmp_path))})
    obs.start()
    first = received(listener)
    assert ("/sd/guidance", [2.5]) in first
    assert ("/sd/seed", [77]) in first
    assert ("/sd/prompt", ["ink on paper"]) in first
    assert ("/sd/delta", [1.0]) in first
    assert "problem" not in obs.open().shown()


def test_typing_a_spec_path_shows_its_controls_at_once(tmp_path: Path, listener: socket.socket) -> None:
    obs = Obs(alone(tmp_path), to(listener))
    obs.start()
    props = obs.open()
    assert props.shown() == ["host", "port", "spec", "problem", "presets"]
    problem = props.items["problem"]
    assert problem.kind == "text" and problem.args == (OBS_TEXT_INFO,)
    assert problem.info_type == OBS_TEXT_INFO_ERROR
    assert "sdbridge_params.json not found next to the script" in problem.description
    assert received(listener) == []  # no spec: nothing to send
    path = str(own_spec(tmp_path))
    obs.type("spec", path[:-5])  # half typed: not a file yet
    assert "not found" in props.items["problem"].description and "sd_guidance" not in props.shown()
    obs.type("spec", path[-5:], start=path[:-5])
    # the same properties object OBS shows, laid out again: the controls are there, the problem gone
    assert "sd_guidance" in props.shown() and "problem" not in props.shown()
    assert props.shown()[:3] == ["host", "port", "spec"] and props.shown()[-1] == "presets"
    sent = received(listener)
    assert ("/sd/guidance", [2.5]) in sent and ("/sd/seed", [77]) in sent  # its defaults, not zeros
    assert ("/sd/guidance", [0.0]) not in sent and ("/sd/seed", [0]) not in sent


def test_a_reload_keeps_the_named_spec(tmp_path: Path, listener: socket.socket) -> None:
    """Reload runs the modified callbacks with an empty settings object first."""
    obs = Obs(alone(tmp_path), {**to(listener), "spec": str(own_spec(tmp_path))})
    obs.start()
    obs.open()
    obs.change("sd_guidance", 4.0)
    received(listener)
    obs.reload()
    assert obs.props is not None
    assert "sd_guidance" in obs.props.shown() and "problem" not in obs.props.shown()
    again = received(listener)
    assert ("/sd/guidance", [4.0]) in again and ("/sd/seed", [77]) in again


def test_a_preset_is_not_undone_by_the_next_change_of_another_control(listener: socket.socket) -> None:
    obs = Obs(SCRIPT, {**to(listener), "presets": string_list("neon city", " ", "ink")})
    obs.settings.values["sdbridge_preset_2"] = DataArray(["saved key"])
    obs.start()
    obs.open()
    received(listener)  # the start-up send
    hotkeys = obs.obs.hotkeys
    assert [h["description"] for h in hotkeys.values()] == [
        f"sdbridge: prompt preset {i}" for i in range(1, 9)
    ]
    assert hotkeys[2]["keys"] == ["saved key"]  # bindings come back from the settings
    hotkeys[2]["callback"](True)  # preset 2 is "ink": the blank entry is skipped
    assert received(listener) == [("/sd/prompt", ["ink"])]
    obs.change("sd_guidance", 2.0)  # the preset stays: only the guidance goes out
    obs.tick(2.0)
    assert received(listener) == [("/sd/guidance", [2.0])]
    hotkeys[1]["callback"](False)  # a key release sends nothing
    hotkeys[5]["callback"](True)  # no fifth preset
    assert received(listener) == []
    obs.type("sd_prompt", " again", start="a photo of a cat, studio lighting")  # the box wins again
    obs.tick(2.0)
    assert received(listener) == [("/sd/prompt", ["a photo of a cat, studio lighting again"])]
    obs.module.script_save(obs.settings)
    assert list(obs.settings.values["sdbridge_preset_2"]) == ["saved key"]


def test_typing_a_prompt_sends_it_once_when_typing_stops(listener: socket.socket) -> None:
    obs = Obs(SCRIPT, to(listener))
    obs.start()
    obs.open()
    received(listener)
    for i, _ in enumerate("neon city at night", start=1):  # a key every 0.1 s
        obs.change("sd_prompt", "neon city at night"[:i])
        obs.tick(0.1)
    assert received(listener) == []  # no half-typed prompts
    obs.tick(1.0)
    assert received(listener) == [("/sd/prompt", ["neon city at night"])]
    obs.tick(5.0)  # the timer is gone once it sent
    assert received(listener) == [] and obs.obs.timers == []
    obs.type("sd_prompt", "\n", start="neon city at night")  # Enter sends at once
    assert received(listener) == []  # same text as sent: nothing new
    obs.type("sd_prompt", ", rain\n", start="neon city at night")
    assert received(listener) == [("/sd/prompt", ["neon city at night, rain"])]
    obs.tick(5.0)
    assert received(listener) == []


def test_a_missing_spec_is_shown_not_raised(tmp_path: Path, listener: socket.socket) -> None:
    """The script copied into OBS's scripts folder without its JSON file: OBS shows why, and
    nothing is sent or raised; the file put beside it is picked up on the next change."""
    obs = Obs(alone(tmp_path), to(listener))
    obs.start()
    props = obs.open()
    assert props.shown() == ["host", "port", "spec", "problem", "presets"]
    assert received(listener) == []
    (obs.script.parent / "sdbridge_params.json").write_text(
        (ROOT / "touchdesigner" / "sdbridge_params.json").read_text()
    )
    obs.reload()
    assert obs.props is not None and "sd_guidance" in obs.props.shown()
    assert received(listener)


def test_a_real_udp_round_trip_reaches_a_running_bridge(tiny_pipe: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bridge = tiny_bridge(tiny_pipe, [f"osc.port={port}", "osc.status_targets=[]", "runtime.fps=0"])
    with in_background(bridge, start_timeout_s=120):
        obs = Obs(SCRIPT, {"host": "127.0.0.1", "port": port})
        obs.start()
        obs.open()
        obs.change("sd_guidance", 2.75)
        obs.change("sd_ssf_max_skip", 3)
        obs.type("sd_prompt", "a neon city at night\n", start="")
        # checked in the engine itself, not only in the parameter store
        engine = bridge.driver.engine

        typed = engine.prompt_cache.encode("a neon city at night").embeds[0]  # (L, D)

        def applied() -> dict[str, Any]:
            return {
                "guidance": engine.guidance_scale,
                "prompt": torch.equal(engine.prepared_unet_inputs.embeds[0], typed),
                "ssf/max_skip": engine.similarity.max_skip,
            }

        deadline = time.monotonic() + 10
        want = {"guidance": 2.75, "prompt": True, "ssf/max_skip": 3}
        while applied() != want:
            assert time.monotonic() < deadline, applied()
            time.sleep(0.02)
        assert bridge.control is not None and bridge.control.counters.as_dict()["rejected"] == 0
