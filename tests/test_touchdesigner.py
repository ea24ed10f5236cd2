"""The TouchDesigner side, outside TouchDesigner: the checked-in parameter spec against the
table, the component plan generated from it (pages, names, ranges, menus), and the code the
builder puts into the component's DATs, run here against stand-ins for `op`, `parent` and the
Script TOP: parameter changes reach the bridge's OSC control, status messages fill the table,
Start/Stop run `sdbridge`, and the Script TOP reads a real shm ring.

Not run here: `apply_plan`/`build`, the thin layer of calls into TouchDesigner's `td` module."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.control.osc import OscControl
from bridge.params import LIVE, ParamStore, table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "touchdesigner"))
import build_component as tdb  # noqa: E402
from sdbridge_shm import ShmWriter  # noqa: E402


def test_the_checked_in_spec_is_the_parameter_table() -> None:
    """Fails when bridge/params.py changes and touchdesigner/sdbridge_params.json was not
    regenerated: `sdbridge params --json > touchdesigner/sdbridge_params.json`."""
    checked_in = (ROOT / "touchdesigner" / "sdbridge_params.json").read_text(encoding="utf-8")
    assert json.loads(checked_in) == table()
    printed = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "params", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert checked_in == printed


def test_the_plan_has_a_td_parameter_for_every_live_one() -> None:
    plan = tdb.plan(tdb.load_spec(), platform="win32")
    pages = plan["pages"]
    assert list(pages) == ["Prompt", "Diffusion", "Filter", "Output", "Connection"]
    pars = {p["name"]: p for name, ps in pages.items() if name != "Connection" for p in ps}
    assert {p["address"] for p in pars.values()} == {p.address for p in LIVE.values()}
    assert plan["skipped"] == []
    for name in pars:
        assert re.fullmatch(r"[A-Z][a-z0-9]*", name), name  # TouchDesigner's custom-parameter form
    assert pars["Guidance"] == {
        "name": "Guidance", "label": "Guidance", "style": "Float", "default": 1.2, "address": "/sd/guidance",
        "kind": "float", "help": LIVE["guidance"].doc, "min": 0.0, "max": 10.0, "clamp": True,
    }  # fmt: skip
    assert pars["Ssfthreshold"]["label"] == "Filter threshold" and pars["Ssfthreshold"]["max"] == 1.0
    assert pars["Ssfmaxskip"]["style"] == "Int" and (
        pars["Ssfmaxskip"]["min"],
        pars["Ssfmaxskip"]["max"],
    ) == (0, 100)
    assert pars["Tindexlist"]["style"] == "Str" and pars["Tindexlist"]["default"] == "32 45"
    assert pars["Freeze"]["style"] == "Toggle" and pars["Freeze"] in pages["Output"]
    assert pars["Prompt"] in pages["Prompt"] and pars["Ssfenabled"] in pages["Filter"]
    assert pars["Seed"]["max"] == 9999 and pars["Seed"]["clamp"] is False


@pytest.mark.parametrize(
    "platform,first,names",
    [
        ("win32", "spout", ["spout", "ndi", "shm"]),
        ("darwin", "syphon", ["syphon", "ndi", "shm"]),
        ("linux", "ndi", ["ndi", "shm"]),
    ],
)
def test_the_transport_menu_per_os(platform: str, first: str, names: list[str]) -> None:
    connection = {p["name"]: p for p in tdb.plan(tdb.load_spec(), platform=platform)["pages"]["Connection"]}
    transport = connection["Transport"]
    assert transport["style"] == "Menu" and transport["menu_names"] == names and transport["default"] == first
    assert connection["Start"]["style"] == connection["Stop"]["style"] == "Pulse"
    assert connection["Port"]["default"] == 7000 and connection["Statusport"]["default"] == 7001


class FakePar:
    def __init__(self, name: str, value: Any, owner: Any = None) -> None:
        self.name, self.value, self.owner = name, value, owner

    def eval(self) -> Any:
        return self.value


class FakeOscOut:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any]]] = []

    def sendOSC(self, address: str, args: list[Any]) -> None:
        self.sent.append((address, args))


def run_dat(text: str, **names: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {"__name__": "td_dat", **names}
    exec(compile(text, "<generated DAT>", "exec"), scope)
    return scope


def test_parameter_changes_reach_the_bridges_osc_control() -> None:
    out = FakeOscOut()
    scope = run_dat(tdb.parexec_text(tdb.plan(tdb.load_spec())), op=lambda path: out, debug=print)
    changes = {
        "Prompt": "a neon city",
        "Guidance": 2.5,
        "Seed": 42,
        "Freeze": 1,  # TouchDesigner toggles evaluate to ints
        "Tindexlist": "20, 30 38",
        "Promptblend": "a cat:0.7 | a dog:0.3",
        "Ssfthreshold": 0.9,
    }
    for name, value in changes.items():
        scope["onValueChange"](FakePar(name, value), None)
    scope["onValueChange"](FakePar("Host", "10.0.0.2"), None)  # not a bridge parameter: not sent
    assert out.sent == [
        ("/sd/prompt", ["a neon city"]),
        ("/sd/guidance", [2.5]),
        ("/sd/seed", [42]),
        ("/sd/freeze", [True]),
        ("/sd/t_index_list", [20, 30, 38]),
        ("/sd/prompt_blend", ["a cat", 0.7, "a dog", 0.3]),
        ("/sd/ssf/threshold", [0.9]),
    ]
    # and the bridge takes every one of them as sent (TouchDesigner's OSC Out DAT types them alike)
    store = ParamStore({})
    control = OscControl(store, send=lambda data, address: None)
    for address, args in out.sent:
        builder = OscMessageBuilder(address=address)
        for arg in args:
            builder.add_arg(arg)
        control.handle_datagram(builder.build().dgram, ("127.0.0.1", 9000))
    assert control.counters.as_dict()["rejected"] == 0
    pending = {name: item.value for name, item in store.take_pending().items()}
    assert pending["t_index_list"] == (20, 30, 38) and pending["freeze"] is True
    assert pending["prompt_blend"] == (
        ("a cat", pytest.approx(0.7)),
        ("a dog", pytest.approx(0.3)),
    )  # float32


def test_a_bad_list_is_reported_not_sent() -> None:
    out, said = FakeOscOut(), []
    scope = run_dat(tdb.parexec_text(tdb.plan(tdb.load_spec())), op=lambda path: out, debug=said.append)
    scope["onValueChange"](FakePar("Tindexlist", "20 thirty"), None)
    assert out.sent == [] and said and "Tindexlist" in said[0]


class FakeComp:
    def __init__(self, **pars: Any) -> None:
        self.par = type("Pars", (), {k: FakePar(k, v) for k, v in pars.items()})()
        self.stored: dict[str, Any] = {}

    def store(self, key: str, value: Any) -> None:
        self.stored[key] = value

    def fetch(self, key: str, default: Any = None, storeDefault: bool = False) -> Any:
        return self.stored.get(key, default)

    def unstore(self, key: str) -> None:
        self.stored.pop(key, None)


def test_start_and_stop_run_sdbridge(monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[list[str]] = []

    class FakeProcess:
        def __init__(self, command: list[str]) -> None:
            launched.append(command)
            self.terminated = False

        def poll(self) -> int | None:
            return 0 if self.terminated else None

        def terminate(self) -> None:
            self.terminated = True

        def wait(self, timeout: float) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    scope = run_dat(tdb.parexec_text(tdb.plan(tdb.load_spec())), op=lambda path: None, debug=print)
    comp = FakeComp(Sdbridge="/venv/bin/sdbridge", Config="/shows/td.yaml", Port=7010, Statusport=7011)
    scope["onPulse"](FakePar("Start", None, owner=comp))
    assert launched == [
        ["/venv/bin/sdbridge", "run", "-c", "/shows/td.yaml", "--set", "osc.port=7010", "--set", "osc.status_targets=['127.0.0.1:7011']"]
    ]  # fmt: skip
    process = comp.stored["sdbridge_process"]
    scope["onPulse"](FakePar("Stop", None, owner=comp))
    assert process.terminated and "sdbridge_process" not in comp.stored


class FakeTable:
    def __init__(self) -> None:
        self.rows: dict[str, str] = {}

    def row(self, key: str) -> Any:
        return key if key in self.rows else None

    def appendRow(self, values: list[str]) -> None:
        self.rows[values[0]] = values[1]

    def __setitem__(self, cell: tuple[str, int], value: str) -> None:
        self.rows[cell[0]] = value


def test_status_messages_fill_the_status_table() -> None:
    status = FakeTable()
    scope = run_dat(tdb.oscin_text(), op=lambda path: status)
    receive = scope["onReceiveOSC"]
    for address, args in [
        ("/sd/status/state", ["running"]),
        ("/sd/status/fps", [29.5]),
        ("/sd/status/skip_rate", [0.25]),
        ("/sd/guidance", [1.5]),  # an echoed parameter: not a status row
        ("/sd/status/unknown", [1]),
        ("/sd/error", ["/sd/guidance", "out of range"]),
    ]:
        receive(None, 0, "", b"", 0.0, address, args, ("127.0.0.1", 7000))
    assert status.rows == {
        "state": "running",
        "fps": "29.5",
        "skip_rate": "0.25",
        "error": "/sd/guidance out of range",
    }


def test_the_script_top_reads_a_real_shm_ring() -> None:
    name = f"sdb_td_{uuid.uuid4().hex[:8]}"
    writer = ShmWriter(name)
    try:
        frame = np.random.default_rng(5).integers(0, 256, (24, 32, 4), dtype=np.uint8)
        writer.write(frame, source_seq=1)
        comp = FakeComp(Receivename=name)

        class ScriptOp:
            def __init__(self) -> None:
                self.stored: dict[str, Any] = {}
                self.copied: list[np.ndarray] = []

            store = FakeComp.store
            fetch = FakeComp.fetch

            def copyNumpyArray(self, array: np.ndarray) -> None:
                self.copied.append(np.array(array))

        script_op = ScriptOp()
        scope = run_dat(tdb.shm_script_top_text(), parent=lambda: comp)
        scope["onCook"](script_op)
        scope["onCook"](script_op)  # nothing new: nothing copied
        assert len(script_op.copied) == 1
        assert np.array_equal(script_op.copied[0], frame[::-1])  # TouchDesigner's rows run bottom-up
        script_op.stored["reader"].close()
    finally:
        writer.close()
