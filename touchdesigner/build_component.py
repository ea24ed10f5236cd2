"""Builds the StreamDiffusionBridge component in TouchDesigner and saves it as a .tox.

Run it once in TouchDesigner (2023 or newer), in the Textport:

    folder = "/path/to/streamdiffusion-bridge/touchdesigner"
    exec(open(folder + "/build_component.py").read())
    build(op("/project1"), folder=folder)    # -> /project1/StreamDiffusionBridge + StreamDiffusionBridge.tox

`exec` leaves `__file__` unset, so the builder cannot tell where it lives: `folder` says where
sdbridge_params.json, sdbridge_shm.py and the .tox are (run as a file, it defaults to its own).

Everything on the component comes from `sdbridge_params.json` beside this file (`sdbridge params
--json`). That includes the custom parameter pages with TouchDesigner-style names (Prompt,
Guidance, Ssfthreshold, ...), ranges and defaults, and the OSC address each one sends to. The
component holds:

- a Parameter Execute DAT that sends a parameter's new value through an OSC Out DAT when it
  changes;
- an OSC In DAT whose callbacks parse /sd/status/* (and /sd/error) into a `status` Table DAT:
  state, mode, fps, latency, skip rate, dropped, frames, last error;
- a Transport menu: Spout (Windows) / Syphon (macOS) through the Syphon Spout In/Out TOPs (the
  In TOP on the named sender, never "the active sender", which could be our own output), NDI
  through the NDI In/Out TOPs (the In TOP on the source whose stream part is the Receivename,
  found in an NDI DAT, as NDI names sources "MACHINE (stream)"), or shm: an Execute DAT reads
  the ring through sdbridge_shm.py at every frame start and forces the Script TOP to cook when a
  frame arrived (a Script TOP with no inputs would otherwise cook once and freeze);
- Start and Stop pulses that launch and stop `sdbridge run -c <Config>` as a subprocess.

Live objects (the process, the shm reader, the last frame) are stored with a startup value of
None (OP.storeStartupValue), so saving the .toe mid-show writes None, not the object.

The plan (pages, names, ranges, menus, generated callback code) is plain Python and is tested
outside TouchDesigner (tests/test_touchdesigner.py). Only `apply_plan` calls TouchDesigner.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# None under `exec(open(...).read())` in the Textport, which sets no __file__: build() then needs `folder`
HERE: Path | None = Path(__file__).resolve().parent if "__file__" in globals() else None
SPEC_NAME = "sdbridge_params.json"
COMPONENT = "StreamDiffusionBridge"

# Media the component can exchange frames over, per OS: (menu name, label)
TRANSPORTS = {
    "win32": [("spout", "Spout"), ("ndi", "NDI"), ("shm", "Shared memory")],
    "darwin": [("syphon", "Syphon"), ("ndi", "NDI"), ("shm", "Shared memory")],
    "linux": [("ndi", "NDI"), ("shm", "Shared memory")],
}
STATUS_KEYS = (
    "state", "mode", "fps", "latency_ms", "engine_ms", "skip_rate", "dropped", "frames", "error",
    "latency_age_s", "dropped_at", "control_error",
)  # fmt: skip


# ------------------------------------------------------------------------------------ the plan


def textport_help(folder: Path | None) -> str:
    if folder is None:
        why = (
            "it was run with exec(open(...).read()), as in the Textport, which leaves __file__ unset, "
            "so its folder is unknown"
        )
    else:
        why = f"{str(folder)!r} lacks {SPEC_NAME} or sdbridge_shm.py"
    return (
        f"build_component.py cannot find its files: {why}. Give the touchdesigner folder of "
        'streamdiffusion-bridge: build(op("/project1"), folder="/path/to/streamdiffusion-bridge/touchdesigner")'
    )


def home(folder: str | Path | None = None) -> Path:
    """The folder holding the spec and the shm reader: `folder`, else this file's own."""
    found = Path(folder).expanduser() if folder else HERE
    if found is None or not (found / SPEC_NAME).is_file() or not (found / "sdbridge_shm.py").is_file():
        raise FileNotFoundError(textport_help(found))
    return found.resolve()


def load_spec(folder: str | Path | None = None) -> list[dict[str, Any]]:
    path = home(folder) / SPEC_NAME
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
    """The table's human label, the same words OBS, the preview page and OSCQuery show; a spec
    from before labels existed falls back to the name in words."""
    if row.get("label"):
        return str(row["label"])
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

KEEP_SOURCE = """
def keep(node, key, value):
    # A live object in storage, saved as None (OP.storeStartupValue): a .toe saved mid-show keeps
    # no process handle, reader or frame.
    node.store(key, value)
    node.storeStartupValue(key, None)
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
{KEEP_SOURCE}

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
    keep(comp, "sdbridge_process", subprocess.Popen(command))


def stop(comp):
    process = comp.fetch("sdbridge_process", None, search=False)
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


# The frame TouchDesigner is given: its first row is the bottom one and its channels are RGB(A)
# (docs.derivative.ca/NumPy, scriptTOP_Class), so the ring's rows are flipped and bgra/bgr
# reordered, in one copy that leaves a contiguous array.
TD_LAYOUT_SOURCE = """
TD_ORDER = {"rgba": None, "rgb": None, "bgra": [2, 1, 0, 3], "bgr": [2, 1, 0]}


def td_layout(pixels, fmt):
    rows = pixels[::-1]
    order = TD_ORDER[fmt]
    # take() writes a C-ordered array; rows[..., order] would not be contiguous
    return rows.copy() if order is None else rows.take(order, axis=2)
"""


def frame_clock_text(reader_folder: Path) -> str:
    """The Execute DAT (Frame Start on): when Transport is shm, read the bridge's ring at every
    frame start and, when a frame arrived, keep it and force the Script TOP to cook. A Script TOP
    without inputs otherwise cooks once and freezes (TouchDesigner cooks an operator only when
    something it depends on changes)."""
    return f"""# Generated by build_component.py; rebuild instead of editing.
import sys

if {str(reader_folder)!r} not in sys.path:
    sys.path.insert(0, {str(reader_folder)!r})
from sdbridge_shm import ShmReader

{KEEP_SOURCE}
{TD_LAYOUT_SOURCE}

def onFrameStart(frame):
    comp = parent()
    if comp.par.Transport.eval() != "shm":
        return
    script = op("from_bridge_shm")
    name = comp.par.Receivename.eval() or "sdbridge_out"
    reader = script.fetch("reader", None, search=False)
    if reader is None or reader.name != name:
        if reader is not None:
            reader.close()
        reader = ShmReader(name)
        keep(script, "reader", reader)
    got = reader.read()
    if got is not None:
        pixels, info = got
        keep(script, "frame", td_layout(pixels, info.format))
        script.cook(force=True)
"""


def shm_script_top_text() -> str:
    """The Script TOP's callbacks: the newest frame the Execute DAT kept, in TouchDesigner's
    layout already (copied on every cook, so any cook shows it)."""
    return """# Generated by build_component.py; rebuild instead of editing.
def onCook(scriptOp):
    frame = scriptOp.fetch("frame", None, search=False)
    if frame is not None:
        scriptOp.copyNumpyArray(frame)
"""


# NDI names a source "MACHINE (stream)" (NDI Out TOP: "MACHINENAME (SourceName)", the form the
# NDI In TOP lists). The In TOP takes the first source the NDI DAT lists whose stream part is
# Receivename, as the bridge's own NDI input matches; a full name typed into Receivename is used
# as it is.
NDI_SOURCE_EXPR = (
    "next((c.val for r in op('ndi_sources').rows() for c in r"
    " if c.val.endswith('(' + parent().par.Receivename.eval() + ')')),"
    " parent().par.Receivename.eval())"
)


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


def _custom_pars(comp: Any, the_plan: dict[str, Any]) -> None:
    for page_name, pars in the_plan["pages"].items():
        page = comp.appendCustomPage(page_name)
        for spec in pars:
            made = getattr(page, "append" + spec["style"])(spec["name"], label=spec["label"])[0]
            if "menu_names" in spec:
                # first: a menu parameter takes only one of its names as its value or default
                made.menuNames, made.menuLabels = spec["menu_names"], spec["menu_labels"]
            if "default" in spec:
                made.default = spec["default"]
                made.val = spec["default"]
            if "min" in spec:
                made.normMin, made.normMax = spec["min"], spec["max"]
                if spec.get("clamp"):
                    made.min, made.max = spec["min"], spec["max"]
                    made.clampMin = made.clampMax = True
            if "help" in spec:
                made.help = spec["help"]


def apply_plan(parent_comp: Any, the_plan: dict[str, Any], td: Any, *, folder: Path) -> Any:
    """Create the component inside `parent_comp`. `td` is TouchDesigner's module of operator
    types (baseCOMP, oscoutDAT, ...), passed in so this file imports without TouchDesigner;
    `folder` holds sdbridge_shm.py, which the generated Execute DAT imports."""
    # 1. A fresh component with the custom parameter pages
    old = parent_comp.op(the_plan["component"])
    if old is not None:
        old.destroy()
    comp = parent_comp.create(td.baseCOMP, the_plan["component"])
    _custom_pars(comp, the_plan)

    # 2. Control: parameter changes out over OSC, status in over OSC into a table
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

    # 3. Frames to the bridge: wire your TOP into `in1`
    frames_in = comp.create(td.inTOP, "in1")
    names = next(m for m in the_plan["pages"]["Connection"] if m["name"] == "Transport")["menu_names"]
    shared = "spout" in names or "syphon" in names
    senders = []
    if shared:
        shared_out = comp.create(td.syphonspoutoutTOP, "to_bridge_syphonspout")
        shared_out.inputConnectors[0].connect(frames_in)
        _bind(shared_out, ("sendername", "servername"), "parent().par.Sendname")
        senders.append(shared_out)
    ndi_out = comp.create(td.ndioutTOP, "to_bridge_ndi")
    ndi_out.inputConnectors[0].connect(frames_in)
    _bind(ndi_out, ("name", "sourcename"), "parent().par.Sendname")
    for node in (*senders, ndi_out):
        node.par.active.expr = (
            f"parent().par.Transport.eval() in {['spout', 'syphon'] if node in senders else ['ndi']!r}"
        )

    # 4. Frames from the bridge, one TOP per medium
    order = []
    if shared:
        shared_in = comp.create(td.syphonspoutinTOP, "from_bridge_syphonspout")
        # the named sender only: following "the active sender" can pick our own output up
        active_sender = getattr(shared_in.par, "usespoutactivesender", None)
        if active_sender is not None:
            active_sender.val = False
        _bind(shared_in, ("sendername", "servername"), "parent().par.Receivename")
        order.append((names[0], shared_in))
    comp.create(td.ndiDAT, "ndi_sources")  # the sources NDI sees, for NDI_SOURCE_EXPR
    ndi_in = comp.create(td.ndiinTOP, "from_bridge_ndi")
    _bind(ndi_in, ("name", "sourcename"), NDI_SOURCE_EXPR)
    order.append(("ndi", ndi_in))
    shm_callbacks = comp.create(td.textDAT, "shm_callbacks")
    shm_callbacks.text = shm_script_top_text()
    shm_in = comp.create(td.scriptTOP, "from_bridge_shm")
    shm_in.par.callbacks = shm_callbacks
    clock = comp.create(td.executeDAT, "shm_frame_clock")
    clock.text = frame_clock_text(folder)
    clock.par.framestart = True
    clock.par.active = True
    order.append(("shm", shm_in))

    # 5. The chosen medium to the component's output
    choose = comp.create(td.switchTOP, "from_bridge")
    for index, (_, node) in enumerate(order):
        choose.inputConnectors[index].connect(node)
    choose.par.index.expr = f"{[name for name, _ in order]!r}.index(parent().par.Transport.eval())"
    out = comp.create(td.outTOP, "out1")
    out.inputConnectors[0].connect(choose)
    return comp


def build(
    parent_comp: Any, folder: str | Path | None = None, tox: str | Path | None = None
) -> Any:  # pragma: no cover - TD only (tests run it against tests/td_standin.py)
    """In TouchDesigner: make the component in `parent_comp` and save it as a .tox in `folder`
    (the touchdesigner folder of streamdiffusion-bridge; needed when this file was exec'd)."""
    import td  # TouchDesigner's own module

    where = home(folder)
    comp = apply_plan(parent_comp, plan(load_spec(where)), td, folder=where)
    target = Path(tox) if tox else where / f"{COMPONENT}.tox"
    comp.save(str(target))
    print(f"built {comp.path}; saved {target}")
    return comp
