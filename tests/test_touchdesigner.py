"""The TouchDesigner side, outside TouchDesigner: the checked-in parameter spec against the
table, the component plan generated from it (pages, names, ranges, menus), the code the builder
puts into the component's DATs, and the component itself, built by `apply_plan`/`build` into
tests/td_standin.py, a stand-in that cooks, stores, saves and takes frames as TouchDesigner does
(each behaviour cites its Derivative page there). Parameter changes reach the bridge's OSC
control, status messages fill the table, Start/Stop run a real process, the shm return path
cooks every frame from a real ring, and saving mid-show keeps no live object.

Only TouchDesigner itself can confirm the operator parameter names and what it does with them;
the stand-in holds the names Derivative documents."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import time
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

from tests import td_standin  # noqa: E402


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
    assert (
        pars["Ssfthreshold"]["label"] == "Skip threshold"
    )  # the table's label, as on every surface and pars["Ssfthreshold"]["max"] == 1.0
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


# ----------------------------------------------------------------- the component, built


def built(platform: str = "linux") -> tuple[td_standin.Network, Any]:
    """The component as `build` makes it, inside a stand-in TouchDesigner."""
    network = td_standin.Network()
    the_plan = tdb.plan(tdb.load_spec(), platform=platform)
    comp = tdb.apply_plan(network.root, the_plan, td_standin.td_module(), folder=tdb.home())
    return network, comp


@pytest.mark.parametrize("platform", ["win32", "darwin", "linux"])
def test_the_transport_menu_gets_its_names_before_its_default(platform: str) -> None:
    """A menu parameter takes only one of its names as value or default (Par Class)."""
    _, comp = built(platform)
    transport = comp.par.Transport
    assert transport.menuNames == [m for m, _ in tdb.TRANSPORTS[platform]]
    assert transport.default == transport.val == tdb.TRANSPORTS[platform][0][0]


# TouchDesigner reads a TOP's array bottom row first, channels RGB(A) (docs.derivative.ca/NumPy)
TO_RING = {"rgba": [0, 1, 2, 3], "bgra": [2, 1, 0, 3], "rgb": [0, 1, 2], "bgr": [2, 1, 0]}


@pytest.mark.parametrize("fmt", ["rgba", "bgra", "rgb", "bgr"])
def test_the_shm_return_cooks_every_frame_in_touchdesigners_layout(fmt: str) -> None:
    """A Script TOP without inputs cooks once and then only when what it reads changes
    (derivative.ca/UserGuide/Cook), so the generated Execute DAT asks for a cook at every frame
    start that brought a frame. Each frame reaches out1 rows bottom-up and channels RGB(A),
    whatever the sink's format, as one contiguous array (copyNumpyArray refuses a flipped view)."""
    network, comp = built()
    name = f"sdb_td_{uuid.uuid4().hex[:8]}"
    comp.par.Transport = "shm"
    comp.par.Receivename = name
    clock, script, out = comp.op("shm_frame_clock"), comp.op("from_bridge_shm"), comp.op("out1")
    assert clock.type.name == "executeDAT" and clock.par.active.eval() and clock.par.framestart.eval()
    writer = ShmWriter(name)
    rng = np.random.default_rng(5)
    try:
        for seq in range(1, 4):
            rgba = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
            writer.write(np.ascontiguousarray(rgba[..., TO_RING[fmt]]), fmt=fmt, source_seq=seq)
            network.run_frame(out)
            assert out.image is not None, f"frame {seq} did not reach out1"
            assert np.array_equal(out.image, rgba[::-1, :, : len(TO_RING[fmt])]), f"frame {seq}"
        assert script.cooks == 3  # one cook per frame that brought a new frame
        network.run_frame(out)  # nothing new: no cook, the last frame stays
        assert script.cooks == 3 and np.array_equal(out.image, rgba[::-1, :, : len(TO_RING[fmt])])
        # without the clock's request nothing else makes it cook: the output would freeze
        clock.par.active = False
        writer.write(np.ascontiguousarray(rgba[::-1][..., TO_RING[fmt]]), fmt=fmt, source_seq=9)
        network.run_frame(out)
        assert script.cooks == 3
    finally:
        reader = script.fetch("reader", None, search=False)
        if reader is not None:
            reader.close()
        writer.close()


def write_fake_sdbridge(folder: Path) -> tuple[Path, Path]:
    """An executable that records its arguments and runs until terminated, as `sdbridge run` does."""
    argv_file, script = folder / "argv.json", folder / "sdbridge"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys, time\n"
        f"open({str(argv_file)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        "time.sleep(60)\n"
    )
    script.chmod(0o755)
    return script, argv_file


def test_start_stop_and_a_save_mid_show(tmp_path: Path) -> None:
    """Start runs the bridge as a real process; saving the component meanwhile (its storage is
    saved with the .tox, derivative.ca/UserGuide/Storage) writes no process, reader or frame, and
    Stop still ends the process afterwards."""
    network, comp = built()
    script_path, argv_file = write_fake_sdbridge(tmp_path)
    name = f"sdb_td_{uuid.uuid4().hex[:8]}"
    comp.par.Sdbridge, comp.par.Config, comp.par.Port, comp.par.Statusport = (
        str(script_path),
        "/shows/td.yaml",
        7010,
        7011,
    )
    comp.par.Transport, comp.par.Receivename = "shm", name
    writer = ShmWriter(name)
    try:
        writer.write(np.zeros((8, 8, 4), np.uint8), source_seq=1)
        network.run_frame(comp.op("out1"))
        comp.par.Start.pulse()
        process = comp.fetch("sdbridge_process", None, search=False)
        assert process is not None and process.poll() is None
        saved = comp.save(str(tmp_path / "show.tox"))  # raises StorageNotSaved for a live object
        kept = {
            (path.rsplit("/", 1)[-1], key): pickle.loads(value)
            for path, entries in pickle.loads(Path(saved).read_bytes()).items()
            for key, value in entries.items()
        }
        assert kept == {
            ("StreamDiffusionBridge", "sdbridge_process"): None,
            ("from_bridge_shm", "reader"): None,
            ("from_bridge_shm", "frame"): None,
        }
        deadline = time.monotonic() + 10
        while not argv_file.exists():
            assert time.monotonic() < deadline, "the process never started"
            time.sleep(0.02)
        assert json.loads(argv_file.read_text()) == [
            "run", "-c", "/shows/td.yaml", "--set", "osc.port=7010", "--set", "osc.status_targets=['127.0.0.1:7011']"
        ]  # fmt: skip
        comp.par.Stop.pulse()
        assert process.poll() is not None and comp.fetch("sdbridge_process", None, search=False) is None
    finally:
        process = comp.fetch("sdbridge_process", None, search=False)
        if process is not None:
            process.kill()
            process.wait()
        comp.op("from_bridge_shm").fetch("reader").close()
        writer.close()


def test_ndi_in_takes_the_source_whose_stream_is_the_receive_name() -> None:
    """NDI lists sources as "MACHINE (stream)" (NDI Out TOP page: "MACHINENAME (SourceName)");
    the In TOP takes the one the NDI DAT lists with our stream part, or a full name as typed."""
    _, comp = built("win32")
    ndi_in, sources = comp.op("from_bridge_ndi"), comp.op("ndi_sources")
    sources.appendRow(["STAGE-PC (Arena Output)", "192.168.1.20:5961"])
    sources.appendRow(["STAGE-PC (sdbridge)", "192.168.1.20:5962"])
    assert ndi_in.par.name.eval() == "STAGE-PC (sdbridge)"
    comp.par.Receivename = "GPU-BOX (sdbridge)"  # a full name is used as it is
    assert ndi_in.par.name.eval() == "GPU-BOX (sdbridge)"


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_syphon_spout_in_takes_the_named_sender_only(platform: str) -> None:
    """Left on, the In TOP's active-sender toggle can receive TouchDesigner's own output (a
    feedback loop): it is turned off and the sender named."""
    _, comp = built(platform)
    shared_in = comp.op("from_bridge_syphonspout")
    assert shared_in.par.usespoutactivesender.eval() is False
    assert shared_in.par.sendername.eval() == comp.par.Receivename.eval() == "sdbridge"


def test_the_builder_run_from_the_textport(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """exec(open(path).read()) in the Textport sets no __file__: without `folder` the builder
    says how to run it; with it, it builds and saves the .tox."""
    monkeypatch.setitem(sys.modules, "td", td_standin.td_module())
    monkeypatch.chdir(tmp_path)  # TouchDesigner's working folder holds none of our files
    textport: dict[str, Any] = {"__name__": "__main__"}
    exec(compile((ROOT / "touchdesigner" / "build_component.py").read_text(), "<Textport>", "exec"), textport)
    network = td_standin.Network()
    with pytest.raises(FileNotFoundError) as error:
        textport["build"](network.root)
    assert "as in the Textport, which leaves __file__ unset" in str(error.value)
    assert 'build(op("/project1"), folder="/path/to/streamdiffusion-bridge/touchdesigner")' in str(
        error.value
    )
    comp = textport["build"](network.root, folder=str(ROOT / "touchdesigner"), tox=tmp_path / "built.tox")
    assert comp.op("out1") is not None and (tmp_path / "built.tox").is_file()
    assert str(ROOT / "touchdesigner") in comp.op("shm_frame_clock").text
