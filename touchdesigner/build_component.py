"""Builds the StreamDiffusionBridge component in TouchDesigner and saves it as a .tox.

Run it once in TouchDesigner (2023 or newer), in the Textport:

    exec(open("/path/to/streamdiffusion-bridge/touchdesigner/build_component.py").read())
    build(op("/project1"))                   # -> /project1/StreamDiffusionBridge + StreamDiffusionBridge.tox

or paste it into a Text DAT and run that DAT, then call `build(...)`.

Everything on the component comes from `sdbridge_params.json` beside this file (`sdbridge params
--json`). That includes the custom parameter pages with TouchDesigner-style names (Prompt,
Guidance, Ssfthreshold, ...), ranges and defaults, and the OSC address each one sends to. The
component holds:

- a Parameter Execute DAT that sends a parameter's new value through an OSC Out DAT when it
  changes;
- an OSC In DAT whose callbacks parse /sd/status/* (and /sd/error) into a `status` Table DAT:
  state, mode, fps, latency, skip rate, dropped, frames, last error;
- a Transport menu: Spout (Windows) / Syphon (macOS) through the Syphon Spout In/Out TOPs, NDI
  through the NDI In/Out TOPs, or shm, where a Script TOP reads frames through sdbridge_shm.py;
- Start and Stop pulses that launch and stop `sdbridge run -c <Config>` as a subprocess.

The plan (pages, names, ranges, menus, generated callback code) is plain Python and is tested
outside TouchDesigner (tests/test_touchdesigner.py). Only `apply_plan` calls TouchDesigner.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
SPEC_NAME = "sdbridge_params.json"
COMPONENT = "StreamDiffusionBridge"

# Media the component can exchange frames over, per OS: (menu name, label)
TRANSPORTS = {
    "win32": [("spout", "Spout"), ("ndi", "NDI"), ("shm", "Shared memory")],
    "darwin": [("syphon", "Syphon"), ("ndi", "NDI"), ("shm", "Shared memory")],
    "linux": [("ndi", "NDI"), ("shm", "Shared memory")],
}
STATUS_KEYS = ("state", "mode", "fps", "latency_ms", "engine_ms", "skip_rate", "dropped", "frames", "error")


# ------------------------------------------------------------------------------------ the plan


def load_spec(folder: Path = HERE) -> list[dict[str, Any]]:
    path = folder / SPEC_NAME
    spec: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return spec


def page_of(row: dict[str, Any]) -> str:
    """The custom page a live parameter goes on."""
    name = row["name"]
    if name.startswith("ssf/"):
        return "Filter"
    if row["type"] in ("string", "blend") or name == "seed":
        return "Prompt"
    if row["type"] == "bool":
        return "Output"
    return "Diffusion"


def label_of(row: dict[str, Any]) -> str:
    words = row["name"].replace("ssf/", "filter ").replace("/", " ").replace("_", " ")
    return words[:1].upper() + words[1:]


def par_of(row: dict[str, Any]) -> dict[str, Any] | None:
    """One live parameter as a TouchDesigner custom parameter, or None when it has no sensible
    widget. Lists travel as text: t_index_list as "20 30 38 45", prompt_blend as
    "a cat:0.7 | a dog:0.3"."""
    kind = row["type"]
    style = {
        "string": "Str",
        "float": "Float",
        "int": "Int",
        "bool": "Toggle",
        "int_list": "Str",
        "blend": "Str",
    }
    if kind not in style:
        return None
    default = row["default"]
    if kind == "int_list":
        default = " ".join(str(v) for v in default)
    elif kind == "blend":
        default = " | ".join(f"{text}:{weight:g}" for text, weight in default)
    par: dict[str, Any] = {
        "name": row["td_name"],
        "label": label_of(row),
        "style": style[kind],
        "default": default,
        "address": row["address"],
        "kind": kind,
        "help": row["doc"],
    }
    if kind in ("float", "int") and row["min"] is not None and row["max"] is not None:
        # the slider covers the range, and the bridge clamps to it too
        par.update(min=row["min"], max=row["max"], clamp=True)
        if row["name"] == "seed":
            par.update(max=9999, clamp=False)  # a usable slider; typing goes up to the table's max
    return par


def connection_page(platform: str) -> list[dict[str, Any]]:
    media = TRANSPORTS.get(platform, TRANSPORTS["linux"])
    return [
        {"name": "Host", "label": "Bridge host", "style": "Str", "default": "127.0.0.1"},
        {"name": "Port", "label": "Bridge OSC port", "style": "Int", "default": 7000, "min": 1, "max": 65535},
        {
            "name": "Statusport",
            "label": "Status port (OSC in)",
            "style": "Int",
            "default": 7001,
            "min": 1,
            "max": 65535,
        },
        {
            "name": "Transport",
            "label": "Frames over",
            "style": "Menu",
            "default": media[0][0],
            "menu_names": [m[0] for m in media],
            "menu_labels": [m[1] for m in media],
        },
        {"name": "Sendname", "label": "Send to bridge as", "style": "Str", "default": "td_to_sdbridge"},
        {"name": "Receivename", "label": "Bridge output name", "style": "Str", "default": "sdbridge"},
        {"name": "Config", "label": "Bridge config", "style": "File", "default": ""},
        {"name": "Sdbridge", "label": "sdbridge command", "style": "Str", "default": "sdbridge"},
        {"name": "Start", "label": "Start bridge", "style": "Pulse"},
        {"name": "Stop", "label": "Stop bridge", "style": "Pulse"},
    ]


def plan(spec: list[dict[str, Any]], platform: str = sys.platform) -> dict[str, Any]:
    """Everything the component is made of, as data."""
    pages: dict[str, list[dict[str, Any]]] = {}
    skipped = []
    for row in spec:
        if not row["live"]:
            continue  # config-only: set in the bridge's config file
        par = par_of(row)
        if par is None:
            skipped.append(row["name"])
            continue
        pages.setdefault(page_of(row), []).append(par)
    ordered = {name: pages[name] for name in ("Prompt", "Diffusion", "Filter", "Output") if name in pages}
    ordered["Connection"] = connection_page(platform)
    return {"component": COMPONENT, "pages": ordered, "skipped": skipped}


# The two helpers below run inside TouchDesigner as part of the generated DATs, and here (the
# tests). They are kept as source text, because `exec(open(...).read())` in the Textport leaves
# no file behind for `inspect` to read.
OSC_ARGS_SOURCE = """
def osc_args(kind, value):
    # What one parameter's value becomes on the wire.
    if kind == "int_list":
        return [int(v) for v in str(value).replace(",", " ").split()]
    if kind == "blend":
        args = []
        for part in str(value).split("|"):
            text, _, weight = part.rpartition(":")
            if text.strip():
                args += [text.strip(), float(weight)]
        return args
    if kind == "bool":
        return [bool(value)]
    if kind == "int":
        return [int(value)]
    if kind == "float":
        return [float(value)]
    return [str(value)]
"""

STATUS_UPDATE_SOURCE = """
def status_update(table, address, args):
    # Fold one OSC message from the bridge into the status rows; True when it was status.
    if address.startswith("/sd/status/"):
        key = address[len("/sd/status/"):]
        if key in STATUS_KEYS:
            table[key] = " ".join(str(a) for a in args)
            return True
        return False
    if address == "/sd/error":
        table["error"] = " ".join(str(a) for a in args)
        return True
    return False
"""

exec(OSC_ARGS_SOURCE)
exec(STATUS_UPDATE_SOURCE)


def parexec_text(the_plan: dict[str, Any]) -> str:
    """The Parameter Execute DAT: each live parameter's change goes out through `osc_out`;
    Start and Stop run the bridge."""
    routes = {
        par["name"]: (par["address"], par["kind"])
        for name, pars in the_plan["pages"].items()
        if name != "Connection"
        for par in pars
    }
    return f"""# Generated by build_component.py from sdbridge_params.json; rebuild instead of editing.
import subprocess

ROUTES = {json.dumps(routes, indent=1)}

{OSC_ARGS_SOURCE}

def onValueChange(par, prev):
    route = ROUTES.get(par.name)
    if route is None:
        return
    address, kind = route
    try:
        args = osc_args(kind, par.eval())
    except ValueError as exc:
        debug("StreamDiffusionBridge: " + par.name + ": " + str(exc))
        return
    op("osc_out").sendOSC(address, args)


def onPulse(par):
    comp = par.owner
    if par.name == "Start":
        start(comp)
    elif par.name == "Stop":
        stop(comp)


def start(comp):
    stop(comp)
    command = [comp.par.Sdbridge.eval() or "sdbridge", "run"]
    if comp.par.Config.eval():
        command += ["-c", comp.par.Config.eval()]
    command += ["--set", "osc.port=" + str(comp.par.Port.eval())]
    command += ["--set", "osc.status_targets=['127.0.0.1:" + str(comp.par.Statusport.eval()) + "']"]
    comp.store("sdbridge_process", subprocess.Popen(command))


def stop(comp):
    process = comp.fetch("sdbridge_process", None, storeDefault=False)
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
    comp.unstore("sdbridge_process")
"""


def oscin_text() -> str:
    """The OSC In DAT's callbacks: status messages into the `status` table."""
    keys = json.dumps(list(STATUS_KEYS))
    return f"""# Generated by build_component.py; rebuild instead of editing.
STATUS_KEYS = {keys}

{STATUS_UPDATE_SOURCE}

def onReceiveOSC(dat, rowIndex, message, bytes, timeStamp, address, args, peer):
    rows = {{}}
    if not status_update(rows, address, list(args)):
        return
    table = op("status")
    for key, value in rows.items():
        if table.row(key) is None:
            table.appendRow([key, value])
        else:
            table[key, 1] = value
"""


def shm_script_top_text(reader_folder: Path = HERE) -> str:
    """The Script TOP's callbacks: frames from the bridge's shm ring (TouchDesigner's rows run
    bottom-up, hence the flip)."""
    return f"""# Generated by build_component.py; rebuild instead of editing.
import sys

if {str(reader_folder)!r} not in sys.path:
    sys.path.insert(0, {str(reader_folder)!r})
from sdbridge_shm import ShmReader


def onCook(scriptOp):
    reader = scriptOp.fetch("reader", None, storeDefault=False)
    name = parent().par.Receivename.eval() or "sdbridge_out"
    if reader is None or reader.name != name:
        reader = ShmReader(name)
        scriptOp.store("reader", reader)
    got = reader.read()
    if got is not None:
        scriptOp.copyNumpyArray(got[0][::-1])
"""


# ------------------------------------------------------------------------ TouchDesigner calls


def _bind(node: Any, names: tuple[str, ...], expression: str) -> None:
    """Bind the first of `names` the node has to `expression` (operator parameter names have
    moved between TouchDesigner builds)."""
    for name in names:
        par = getattr(node.par, name, None)
        if par is not None:
            par.expr = expression
            return
    raise AttributeError(f"{node.path} has none of the parameters {names}")


def apply_plan(parent_comp: Any, the_plan: dict[str, Any], td: Any) -> Any:  # pragma: no cover - TD only
    """Create the component inside `parent_comp`. `td` is TouchDesigner's module of operator
    types (baseCOMP, oscoutDAT, ...), passed in so this file imports without TouchDesigner."""
    old = parent_comp.op(the_plan["component"])
    if old is not None:
        old.destroy()
    comp = parent_comp.create(td.baseCOMP, the_plan["component"])
    for page_name, pars in the_plan["pages"].items():
        page = comp.appendCustomPage(page_name)
        for spec in pars:
            made = getattr(page, "append" + spec["style"])(spec["name"], label=spec["label"])[0]
            if "default" in spec:
                made.default = spec["default"]
                made.val = spec["default"]
            if "min" in spec:
                made.normMin, made.normMax = spec["min"], spec["max"]
                if spec.get("clamp"):
                    made.min, made.max = spec["min"], spec["max"]
                    made.clampMin = made.clampMax = True
            if "menu_names" in spec:
                made.menuNames, made.menuLabels = spec["menu_names"], spec["menu_labels"]
            if "help" in spec:
                made.help = spec["help"]

    osc_out = comp.create(td.oscoutDAT, "osc_out")
    osc_out.par.address.expr = "parent().par.Host"
    osc_out.par.port.expr = "parent().par.Port"

    status = comp.create(td.tableDAT, "status")
    status.clear()
    for key in STATUS_KEYS:
        status.appendRow([key, ""])
    callbacks = comp.create(td.textDAT, "osc_in_callbacks")
    callbacks.text = oscin_text()
    osc_in = comp.create(td.oscinDAT, "osc_in")
    osc_in.par.port.expr = "parent().par.Statusport"
    osc_in.par.callbacks = callbacks

    parexec = comp.create(td.parameterexecuteDAT, "parameters")
    parexec.text = parexec_text(the_plan)
    parexec.par.op = comp.path
    parexec.par.pars = "*"
    parexec.par.valuechange = True
    parexec.par.onpulse = True

    # frames to the bridge: wire your TOP into `in1`
    frames_in = comp.create(td.inTOP, "in1")
    names = next(m for m in the_plan["pages"]["Connection"] if m["name"] == "Transport")["menu_names"]
    senders = []
    if "spout" in names or "syphon" in names:
        shared_out = comp.create(td.syphonspoutoutTOP, "to_bridge_syphonspout")
        shared_out.inputConnectors[0].connect(frames_in)
        _bind(shared_out, ("sendername", "servername"), "parent().par.Sendname")
        senders.append(shared_out)
        shared_in = comp.create(td.syphonspoutinTOP, "from_bridge_syphonspout")
        _bind(shared_in, ("sendername", "servername"), "parent().par.Receivename")
    ndi_out = comp.create(td.ndioutTOP, "to_bridge_ndi")
    ndi_out.inputConnectors[0].connect(frames_in)
    _bind(ndi_out, ("name", "sourcename"), "parent().par.Sendname")
    ndi_in = comp.create(td.ndiinTOP, "from_bridge_ndi")
    _bind(ndi_in, ("name", "sourcename"), "parent().par.Receivename")
    shm_callbacks = comp.create(td.textDAT, "shm_callbacks")
    shm_callbacks.text = shm_script_top_text()
    shm_in = comp.create(td.scriptTOP, "from_bridge_shm")
    shm_in.par.callbacks = shm_callbacks

    choose = comp.create(td.switchTOP, "from_bridge")
    order = []
    if "spout" in names or "syphon" in names:
        choose.inputConnectors[len(order)].connect(comp.op("from_bridge_syphonspout"))
        order.append(names[0])
    choose.inputConnectors[len(order)].connect(ndi_in)
    order.append("ndi")
    choose.inputConnectors[len(order)].connect(shm_in)
    order.append("shm")
    choose.par.index.expr = f"{order!r}.index(parent().par.Transport.eval())"
    for node in (*senders, ndi_out):
        node.par.active.expr = (
            f"parent().par.Transport.eval() in {['spout', 'syphon'] if node in senders else ['ndi']!r}"
        )
    out = comp.create(td.outTOP, "out1")
    out.inputConnectors[0].connect(choose)
    return comp


def build(parent_comp: Any, tox: str | Path | None = None) -> Any:  # pragma: no cover - TD only
    """In TouchDesigner: make the component in `parent_comp` and save it as a .tox."""
    import td  # TouchDesigner's own module

    comp = apply_plan(parent_comp, plan(load_spec()), td)
    target = Path(tox) if tox else HERE / f"{COMPONENT}.tox"
    comp.save(str(target))
    print(f"built {comp.path}; saved {target}")
    return comp
