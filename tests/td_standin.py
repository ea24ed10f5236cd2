"""A stand-in for the part of TouchDesigner that build_component.py and the DATs it generates
touch: operators made with `COMP.create`, their parameters (only the documented names), custom
parameter pages, wiring, storage, saving, and the frame loop that decides what cooks. Each
behaviour copies a Derivative page:

- Cooking (derivative.ca/UserGuide/Cook): "TouchDesigner will cook a node only when it needs
  to"; an operator cooks when something asks for it (a node downstream, a viewer, `cook()`)
  AND it has a reason: never cooked, a parameter or an input changed, an expression it reads
  changed, or it is time dependent (reads `absTime`). `OP.cook(force=True)` always cooks
  (docs.derivative.ca/OP_Class). `Network.run_frame()` is one TouchDesigner frame: Execute DATs
  with Frame Start on get `onFrameStart(frame)` (docs.derivative.ca/Execute_DAT), then whatever
  views the output pulls it.
- Parameters (derivative.ca/UserGuide/Par_Class): `val`, `expr`, `eval()`, `default`,
  `menuNames`/`menuLabels`; a Menu parameter takes only one of its menu names as its value or
  default, so the names must exist first (the page says menu values are its names; that a
  value set before them is refused is issue 13's finding, to confirm inside TouchDesigner).
  An operator has only the parameters its Derivative page lists: `getattr(node.par, "wrong",
  None)` is None. Defaults the builder relies on: a new Execute DAT and Parameter Execute DAT
  are active with their events off; a Syphon Spout In TOP follows the active sender (the
  toggle `usespoutactivesender`, named as public TouchDesigner scripts set it; its Derivative
  page is not in the stored copies). Custom parameter names are a capital followed by
  lower-case letters and digits (derivative.ca/UserGuide/Custom_Parameters).
- Storage (derivative.ca/UserGuide/Storage, OP_Class): saved with the .toe/.tox; a key given a
  startup value (`storeStartupValue`) is saved as that value instead of the live one. Saving
  here pickles what would be saved, so a live object (a process, a shared-memory reader) fails
  the save as it cannot be written into the file.
- Script TOP (docs.derivative.ca/NumPy, scriptTOP_Class): `copyNumpyArray(array)` takes an
  (H, W, C) array of 1-4 channels, uint8/uint16/float32, read as RGBA with the first row at the
  bottom; a non-contiguous view (a flipped one has negative strides) is refused, as issue 13
  reports; the stored Derivative pages do not say, so this too wants a check in TouchDesigner.
"""

from __future__ import annotations

import itertools
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_clock = itertools.count(1)  # a global change counter: every change gets a later number


class StorageNotSaved(RuntimeError):
    """TouchDesigner could not write an operator's storage into the file."""


@dataclass(frozen=True)
class OpType:
    """An operator type as the `td` module names it (`td.scriptTOP`), with its parameter names."""

    name: str
    pars: tuple[str, ...]
    inputs: int = 0
    defaults: tuple[tuple[str, Any], ...] = ()


# The parameters each operator's Derivative page lists (those the builder may touch, and the
# common ones). Pages: Base COMP, OSC Out DAT, OSC In DAT, Table DAT, Text DAT, Parameter
# Execute DAT, Execute DAT, NDI DAT, In TOP, Out TOP, Syphon Spout In/Out TOP, NDI In/Out TOP,
# Script TOP, Switch TOP.
TYPES = {
    t.name: t
    for t in (
        OpType("baseCOMP", ()),
        OpType("oscoutDAT", ("active", "protocol", "address", "port")),
        OpType("oscinDAT", ("active", "protocol", "port", "callbacks")),
        OpType("tableDAT", ()),
        OpType("textDAT", ()),
        OpType(
            "parameterexecuteDAT",
            ("active", "op", "pars", "valuechange", "onpulse"),
            defaults=(("active", True), ("valuechange", False), ("onpulse", False)),
        ),
        OpType(  # a new Execute DAT is active, with every event off
            "executeDAT",
            ("active", "start", "create", "exit", "framestart", "frameend"),
            defaults=(("active", True), ("framestart", False), ("frameend", False)),
        ),
        OpType("ndiDAT", ("callbacks", "extraips", "persistence")),
        OpType("inTOP", (), inputs=0),
        OpType("outTOP", (), inputs=1),
        OpType("syphonspoutoutTOP", ("active", "sendername"), inputs=1),
        # On by default: with no sender named it takes whichever Spout sender is active
        OpType(
            "syphonspoutinTOP",
            ("active", "sendername", "usespoutactivesender"),
            defaults=(("active", True), ("usespoutactivesender", True)),
        ),
        OpType("ndioutTOP", ("active", "name", "fps"), inputs=1),
        OpType("ndiinTOP", ("active", "name", "extraips", "bandwidth")),
        OpType("scriptTOP", ("callbacks",)),
        OpType("switchTOP", ("index",), inputs=8),
    )
}
CUSTOM_NAME = re.compile(r"[A-Z][a-z0-9]*")


class AbsTime:
    frame = 0


class Par:
    def __init__(self, owner: Op, name: str, style: str = "", value: Any = None) -> None:
        self.owner, self.name, self.style = owner, name, style
        self._val, self._expr, self._default = value, "", value
        self.menuNames: list[str] = []
        self.menuLabels: list[str] = []
        self.label = self.help = ""
        self.normMin = self.normMax = self.min = self.max = 0.0
        self.clampMin = self.clampMax = False
        self.changed = next(_clock)

    def _check_menu(self, value: Any) -> None:
        if self.style == "Menu" and value not in self.menuNames:
            raise ValueError(
                f"{self.owner.path}: {value!r} is not a menu entry of {self.name} {self.menuNames}"
            )

    @property
    def default(self) -> Any:
        return self._default

    @default.setter
    def default(self, value: Any) -> None:
        self._check_menu(value)
        self._default = value

    @property
    def val(self) -> Any:
        return self._val

    @val.setter
    def val(self, value: Any) -> None:
        self._check_menu(value)
        self._val, self._expr, self.changed = value, "", next(_clock)

    @property
    def expr(self) -> str:
        return self._expr

    @expr.setter
    def expr(self, text: str) -> None:
        compile(text, f"<{self.owner.path}.par.{self.name}>", "eval")  # a bad expression fails here
        self._expr, self.changed = text, next(_clock)

    def eval(self) -> Any:
        reading = self.owner.network.reading
        if reading is not None:
            reading.add(self)
        if not self._expr:
            return self._val
        value = eval(self._expr, self.owner.scope())  # what TouchDesigner does with an expression
        return value.eval() if isinstance(value, Par) else value

    def time_dependent(self) -> bool:
        return "absTime" in self._expr

    def pulse(self) -> None:
        self.owner.network.pulse(self)


class Pars:
    """`op.par`: attribute access to the parameters the operator has, nothing else."""

    def __init__(self, owner: Op, names: tuple[str, ...]) -> None:
        object.__setattr__(self, "_pars", {name: Par(owner, name) for name in names})

    def __getattr__(self, name: str) -> Par:
        try:
            return self._pars[name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(f"no parameter {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        getattr(self, name).val = value  # `op.par.x = 5` sets the constant value

    def add(self, par: Par) -> None:
        self._pars[par.name] = par


class Connector:
    def __init__(self, owner: Op) -> None:
        self.owner = owner
        self.source: Op | None = None

    def connect(self, target: Op) -> None:
        self.source = target
        self.owner.network.touch(self.owner)


class Page:
    def __init__(self, comp: Op, name: str) -> None:
        self.comp, self.name = comp, name

    def _append(self, style: str, name: str, label: str = "") -> list[Par]:
        if not CUSTOM_NAME.fullmatch(name):
            raise ValueError(f"custom parameter names are a capital then lower case or digits, got {name!r}")
        par = Par(self.comp, name, style, None if style == "Menu" else {"Toggle": False}.get(style, ""))
        par.label = label
        self.comp.par.add(par)
        return [par]

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("append"):
            return lambda name, label="": self._append(attr[len("append") :], name, label)
        raise AttributeError(attr)


class Op:
    def __init__(self, network: Network, optype: OpType, name: str, parent: Op | None) -> None:
        self.network, self.type, self.name, self._parent = network, optype, name, parent
        self.path = f"{parent.path.rstrip('/')}/{name}" if parent else name
        self.par = Pars(self, optype.pars)
        for par_name, value in optype.defaults:
            getattr(self.par, par_name).val = value
        self.inputConnectors = [Connector(self) for _ in range(optype.inputs)]
        self.children: dict[str, Op] = {}
        self.storage: dict[str, Any] = {}
        self.startup: dict[str, Any] = {}
        self._text = ""
        self.module: dict[str, Any] | None = None
        self.rows_: list[list[str]] = []
        self.image: np.ndarray | None = None
        self.cooks = 0
        self.cooked_at = 0  # the change counter when it last cooked
        self.cooked_frame = -1
        self.read_pars: set[Par] = set()

    # -------------------------------------------------------------------------- the network
    def create(self, optype: OpType, name: str) -> Op:
        if name in self.children:
            raise ValueError(f"{self.path} already has a child {name!r}")
        child = Op(self.network, optype, name, self)
        self.children[name] = child
        return child

    def op(self, name: str) -> Op | None:
        return self.children.get(name)

    def destroy(self) -> None:
        if self._parent is not None:
            self._parent.children.pop(self.name, None)

    def appendCustomPage(self, name: str) -> Page:
        return Page(self, name)

    def scope(self) -> dict[str, Any]:
        """What a parameter expression or a DAT's script sees: `parent()`, `op()`, `me`."""
        home = self._parent
        return {
            "parent": lambda: home,
            "op": lambda name: home.op(name) if home else None,
            "me": self,
            "absTime": AbsTime,
            "debug": self.network.debugged.append,
        }

    # ------------------------------------------------------------------------- text and DATs
    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text, self.module = value, None  # a DAT recompiles when its text changes
        self.network.touch(self)

    def run_module(self) -> dict[str, Any]:
        if self.module is None:
            self.module = {"__name__": self.name, **self.scope()}
            exec(compile(self._text, f"<{self.path}>", "exec"), self.module)
        return self.module

    def clear(self) -> None:
        self.rows_ = []

    def appendRow(self, values: list[Any]) -> None:
        self.rows_.append([str(v) for v in values])

    def rows(self) -> list[list[Any]]:
        return [[type("Cell", (), {"val": v})() for v in row] for row in self.rows_]

    # ------------------------------------------------------------------------------ storage
    def store(self, key: str, value: Any) -> Any:
        self.storage[key] = value
        return value

    def storeStartupValue(self, key: str, value: Any) -> None:
        self.startup[key] = value

    def fetch(self, key: str, default: Any = None, search: bool = True, storeDefault: bool = False) -> Any:
        node: Op | None = self
        while node is not None:
            if key in node.storage:
                return node.storage[key]
            node = node._parent if search else None
        if storeDefault:
            self.storage[key] = default
        return default

    def unstore(self, *keys: str) -> None:
        for key in keys:
            self.storage.pop(key, None)
            self.startup.pop(key, None)

    def saved_storage(self) -> dict[str, dict[str, bytes]]:
        saved: dict[str, dict[str, bytes]] = {}
        for node in self.walk():
            for key, value in node.storage.items():
                kept = node.startup.get(key, value)
                try:
                    saved.setdefault(node.path, {})[key] = pickle.dumps(kept)
                except (TypeError, AttributeError, pickle.PicklingError) as exc:
                    raise StorageNotSaved(f"{node.path}: storage {key!r} cannot be saved: {exc}") from None
        return saved

    def save(self, path: str) -> str:
        """COMP.save(filepath): write the component as a .tox."""
        Path(path).write_bytes(pickle.dumps(self.saved_storage()))
        return path

    def walk(self) -> list[Op]:
        return [self, *(n for child in self.children.values() for n in child.walk())]

    # ------------------------------------------------------------------------------ cooking
    def cook(self, force: bool = False) -> None:
        """OP.cook(force=False): cook if there is a reason to; always when forced."""
        if force or self.needs_cook():
            self._cook()

    def needs_cook(self) -> bool:
        if self.cooks == 0 or self.network.changed_since(self):
            return True
        if any(p.time_dependent() for p in self.par._pars.values()):
            return True
        return any(p.changed > self.cooked_at for p in self.read_pars)

    def _cook(self) -> None:
        net = self.network
        outer, net.reading = net.reading, set()
        try:
            if self.type.name == "scriptTOP":
                callbacks = self.par.callbacks.eval()
                callbacks.run_module()["onCook"](self)
        finally:
            self.read_pars, net.reading = net.reading, outer
        self.cooks += 1
        self.cooked_at = next(_clock)
        self.cooked_frame = AbsTime.frame

    def pull(self) -> bool:
        """Something downstream wants this TOP: cook what it depends on, then itself if needed;
        True when it cooked this frame. A Switch TOP asks only its selected input."""
        sources = [c.source for c in self.inputConnectors if c.source is not None]
        if self.type.name == "switchTOP":
            index = int(self.par.index.eval())
            sources = [self.inputConnectors[index].source] if 0 <= index < len(self.inputConnectors) else []
        upstream = [s.pull() for s in sources if s is not None]
        if any(upstream) or self.needs_cook():
            self._cook()
        if self.type.name in ("switchTOP", "outTOP") and sources and sources[0] is not None:
            self.image = sources[0].image
        return self.cooked_frame == AbsTime.frame

    # --------------------------------------------------------------------------- Script TOP
    def copyNumpyArray(self, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray) or array.ndim != 3 or not 1 <= array.shape[2] <= 4:
            raise ValueError(
                f"copyNumpyArray needs an (H, W, 1..4) array, got {getattr(array, 'shape', array)}"
            )
        if array.dtype not in (np.uint8, np.uint16, np.float32):
            raise ValueError(f"copyNumpyArray takes uint8, uint16 or float32, got {array.dtype}")
        if not array.flags.c_contiguous:
            raise ValueError(f"copyNumpyArray needs a contiguous array, got strides {array.strides}")
        self.image = np.array(array)


class Network:
    """One TouchDesigner process: the root COMP, the frame loop and what was debugged."""

    def __init__(self) -> None:
        self.root = Op(self, TYPES["baseCOMP"], "/project1", None)
        self.reading: set[Par] | None = None
        self.debugged: list[str] = []
        self._touched: dict[int, int] = {}
        AbsTime.frame = 0

    def touch(self, node: Op) -> None:
        self._touched[id(node)] = next(_clock)

    def changed_since(self, node: Op) -> bool:
        return self._touched.get(id(node), 0) > node.cooked_at

    def pulse(self, par: Par) -> None:
        for node in self.all():
            if node.type.name == "parameterexecuteDAT" and node.par.active.eval() and node.par.onpulse.eval():
                node.run_module()["onPulse"](par)

    def all(self) -> list[Op]:
        return self.root.walk()

    def run_frame(self, *viewed: Op) -> None:
        """One frame: Frame Start callbacks, then every `viewed` TOP pulls what it shows."""
        AbsTime.frame += 1
        for node in self.all():
            if node.type.name == "executeDAT" and node.par.active.eval() and node.par.framestart.eval():
                node.run_module()["onFrameStart"](AbsTime.frame)
        for node in viewed:
            node.pull()


def td_module() -> Any:
    """TouchDesigner's `td` module as far as the builder uses it: the operator types."""
    return type("td", (), dict(TYPES))
