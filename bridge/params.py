"""THE parameter table. OSC addresses, `sdbridge params`, the preview form, the TouchDesigner
component, the OBS script, MIDI maps and OSCQuery are all derived from `PARAMS`.

Also here: coercion of inbound values (OSC, forms, MIDI) and the thread-safe `ParamStore`
that the OSC thread writes and the runtime reads between frames (latest value wins).
"""

from __future__ import annotations

import enum
import itertools
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NUM_INFERENCE_STEPS = 50  # the LCM schedule the t_index values index into
MAX_STEPS = 10  # longest t_index_list (one UNet row per step; StreamEngine's limit)
SEED_MAX = 2**31 - 1  # OSC ints are int32
# Bounds on what control input may ask for (each refused beyond with the reason on /sd/error).
# CLIP reads 77 tokens (about 300 characters) and truncates the rest, so 2000 characters is
# generous; the cap keeps a 5 MB prompt from costing seconds of tokenizing.
MAX_PROMPT_CHARS = 2000
MAX_BLEND_ENTRIES = 16  # each new text is one text-encoder call before the blend applies
SHOWN_CHARS = 200  # values quoted in error messages are cut to this


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` for an error message or status: at most `limit` characters, saying how much was
    left out. The one cut every part uses (config, OSC, HTTP, the runtime's status)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters in all)"


def shown(value: Any) -> str:
    """`repr(value)` cut to `SHOWN_CHARS` characters, for error messages."""
    return cut(repr(value))


class Kind(enum.Enum):
    """The value type of a parameter, as it appears in YAML, OSC and UIs."""

    STRING = "string"
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    INT_LIST = "int_list"  # OSC: one int per argument
    BLEND = "blend"  # weighted prompt list; OSC: text, weight, text, weight, ...
    CHOICE = "choice"  # one of `choices`


@dataclass(frozen=True)
class Param:
    """One control. `live` ones change between frames; the others are config-only (they need
    a reload) and OSC refuses them with `reload_reason`."""

    name: str
    kind: Kind
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    live: bool = True
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    reload_reason: str = ""
    label: str = ""  # what a person reads on every surface (OBS, TouchDesigner, preview, OSCQuery)

    @property
    def address(self) -> str:
        return f"/sd/{self.name}"

    @property
    def numeric(self) -> bool:
        return self.kind in (Kind.FLOAT, Kind.INT)

    @property
    def td_name(self) -> str:
        """TouchDesigner's custom-parameter form: capitalised, letters and digits only."""
        flat = "".join(ch for ch in self.name if ch.isalnum())
        return flat[:1].upper() + flat[1:].lower()


PARAMS: tuple[Param, ...] = (
    Param(
        "prompt",
        Kind.STRING,
        "a photo of a cat, studio lighting",
        "what to draw",
        aliases=("/prompt",),
        label="Prompt",
    ),
    Param(
        "negative_prompt",
        Kind.STRING,
        "",
        "what to avoid (used when cfg_type is full or initialize, or self with guidance > 1)",
        aliases=("/negative_prompt",),
        label="Negative prompt",
    ),
    Param(
        "prompt_blend",
        Kind.BLEND,
        (),
        "weighted prompts blended in embedding space: text, weight, text, weight, ...",
        label="Prompt blend",
    ),
    Param("seed", Kind.INT, 2, "noise seed", 0, SEED_MAX, aliases=("/seed",), label="Seed"),
    Param(
        "guidance",
        Kind.FLOAT,
        1.2,
        "classifier-free guidance scale; <= 1 switches guidance off",
        0.0,
        10.0,
        aliases=("/guidance_scale",),
        label="Guidance",
    ),
    Param(
        "delta",
        Kind.FLOAT,
        1.0,
        "residual CFG: scale of the virtual negative",
        0.0,
        5.0,
        aliases=("/delta",),
        label="Delta (residual CFG)",
    ),
    Param(
        "strength",
        Kind.FLOAT,
        0.35,
        "how far the output departs from the input (sets t_index_list for the current step count)",
        0.0,
        1.0,
        label="Strength",
    ),
    Param(
        "t_index_list",
        Kind.INT_LIST,
        (32, 45),
        "denoising steps as indices into the 50-step schedule; ascending, 1 to 10 of them",
        0,
        NUM_INFERENCE_STEPS - 1,
        aliases=("/t_list",),
        label="Denoising steps",
    ),
    Param(
        "ssf/enabled",
        Kind.BOOL,
        False,
        "stochastic similarity filter: skip near-identical input frames",
        label="Similarity filter",
    ),
    Param(
        "ssf/threshold",
        Kind.FLOAT,
        0.98,
        "similarity above which frames may be skipped",
        0.0,
        1.0,
        label="Skip threshold",
    ),
    Param("ssf/max_skip", Kind.INT, 10, "most frames skipped in a row", 0, 100, label="Max skipped frames"),
    Param("freeze", Kind.BOOL, False, "hold the current output", label="Freeze"),
    Param("bypass", Kind.BOOL, False, "pass the input through untouched", label="Bypass"),
    # config-only: changing these means loading or rebuilding the model
    Param(
        "model",
        Kind.STRING,
        "tiny",
        "embedded name, local folder, .safetensors file or hub id",
        live=False,
        reload_reason="loading a model takes seconds to minutes and is never done over OSC",
        label="Model",
    ),
    Param(
        "width",
        Kind.INT,
        256,
        "frame width (multiple of 8)",
        64,
        2048,
        live=False,
        reload_reason="buffers and compiled graphs are sized to it",
        label="Width",
    ),
    Param(
        "height",
        Kind.INT,
        256,
        "frame height (multiple of 8)",
        64,
        2048,
        live=False,
        reload_reason="buffers and compiled graphs are sized to it",
        label="Height",
    ),
    Param(
        "cfg_type",
        Kind.CHOICE,
        "self",
        "guidance mode: none, full, self (residual CFG) or initialize",
        live=False,
        choices=("none", "full", "self", "initialize"),
        reload_reason="it changes the UNet batch layout",
        label="Guidance mode",
    ),
    Param(
        "acceleration",
        Kind.CHOICE,
        "none",
        "model acceleration: none (eager, exact), compile (torch.compile), cuda_graph (the whole "
        "frame as one CUDA graph, exact; needs CUDA), compile+cuda_graph, tensorrt (the "
        "tensorrt extra) or tensorrt+cuda_graph",
        live=False,
        choices=("none", "compile", "cuda_graph", "compile+cuda_graph", "tensorrt", "tensorrt+cuda_graph"),
        reload_reason="it rebuilds the model graph",
        label="Acceleration",
    ),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
LIVE: dict[str, Param] = {p.name: p for p in PARAMS if p.live}


class ParamError(ValueError):
    """An inbound value that cannot be used; the message is the reason sent back on /sd/error."""


@dataclass(frozen=True)
class Coerced:
    value: Any
    warning: str = ""  # set when the value was clamped or rounded


def _number(param: Param, arg: Any) -> float:
    if isinstance(arg, bool):
        return float(arg)
    if isinstance(arg, int | float):
        x = float(arg)
    elif isinstance(arg, str):
        try:
            x = float(arg.strip())
        except ValueError:
            raise ParamError(f"{param.name} expects a number, got the string {shown(arg)}") from None
    else:
        raise ParamError(f"{param.name} expects a number, got {type(arg).__name__} {shown(arg)}")
    if not math.isfinite(x):
        raise ParamError(f"{param.name} expects a finite number, got {shown(arg)}")
    return x


def _clamp(param: Param, x: float) -> tuple[float, str]:
    lo = param.minimum if param.minimum is not None else -math.inf
    hi = param.maximum if param.maximum is not None else math.inf
    if lo <= x <= hi:
        return x, ""
    clamped = min(max(x, lo), hi)
    return clamped, f"{param.name}={x:g} is outside [{lo:g}, {hi:g}]; clamped to {clamped:g}"


def _integer(param: Param, arg: Any) -> tuple[int, str]:
    x = _number(param, arg)
    warning = ""
    if x != round(x) and abs(x - round(x)) > 1e-3:  # TouchDesigner sends ints as (float32) floats
        warning = f"{param.name} expects an int, got {x:g}; rounded to {round(x)}"
    x, clamp_warning = _clamp(param, float(round(x)))
    return int(x), clamp_warning or warning


_TRUE = {"1", "true", "on", "yes", "t"}
_FALSE = {"0", "false", "off", "no", "f"}


def _boolean(param: Param, arg: Any) -> bool:
    if isinstance(arg, bool):
        return arg
    if isinstance(arg, int | float):
        return _number(param, arg) >= 0.5  # a fader or a TD toggle sending 0.0/1.0
    if isinstance(arg, str) and arg.strip().lower() in _TRUE | _FALSE:
        return arg.strip().lower() in _TRUE
    raise ParamError(f"{param.name} expects true/false (or 1/0), got {shown(arg)}")


def coerce(param: Param, args: Sequence[Any]) -> Coerced:
    """Turn inbound arguments (OSC args, a form field, a YAML value wrapped in a list) into the
    parameter's value. Clamps with a warning; raises `ParamError` with the reason otherwise."""
    if not param.live:
        raise ParamError(
            f"{param.name} is config-only ({param.reload_reason}); set it in the config and restart"
        )
    kind = param.kind
    one_string = len(args) == 1 and isinstance(args[0], str)
    if one_string and (kind is Kind.INT_LIST or (kind is Kind.BLEND and ":" in args[0])):
        args = text_args(param, args[0])  # the one-string form OSCQuery lists ("32 45", "a:0.5 | b:0.5")
    if kind is Kind.BLEND:
        return _blend(param, args)
    if kind is Kind.INT_LIST:
        return _int_list(param, args)
    if len(args) != 1:
        raise ParamError(f"{param.name} expects one value, got {len(args)}: {shown(list(args))}")
    arg = args[0]
    if kind is Kind.STRING:
        if not isinstance(arg, str):
            raise ParamError(f"{param.name} expects a string, got {type(arg).__name__} {shown(arg)}")
        _check_text(param, arg)
        return Coerced(arg)
    if kind is Kind.CHOICE:
        if arg not in param.choices:
            raise ParamError(f"{param.name} must be one of {', '.join(param.choices)}, got {shown(arg)}")
        return Coerced(arg)
    if kind is Kind.BOOL:
        return Coerced(_boolean(param, arg))
    if kind is Kind.INT:
        value, warning = _integer(param, arg)
        return Coerced(value, warning)
    value_f, warning = _clamp(param, _number(param, arg))
    return Coerced(value_f, warning)


def coerce_norm(param: Param, args: Sequence[Any]) -> Coerced:
    """The `/norm` variant: one number in 0..1 mapped linearly onto the parameter's range."""
    if not (param.live and param.numeric):
        raise ParamError(f"{param.name} has no /norm variant (only numeric live parameters do)")
    if len(args) != 1:
        raise ParamError(f"{param.address}/norm expects one value in 0..1, got {len(args)}")
    u = _number(param, args[0])
    warning = ""
    if not 0.0 <= u <= 1.0:
        warning = f"{param.address}/norm={u:g} is outside [0, 1]; clamped"
        u = min(max(u, 0.0), 1.0)
    assert param.minimum is not None and param.maximum is not None  # numeric params all have a range
    coerced = coerce(param, [param.minimum + u * (param.maximum - param.minimum)])
    return Coerced(coerced.value, warning or coerced.warning)


def _int_list(param: Param, args: Sequence[Any]) -> Coerced:
    if not 1 <= len(args) <= MAX_STEPS:
        raise ParamError(f"{param.name} expects 1 to {MAX_STEPS} ints, got {len(args)}")  # bounds the work
    values: list[int] = []
    warnings: list[str] = []
    for arg in args:
        value, warning = _integer(param, arg)
        values.append(value)
        if warning:
            warnings.append(warning)
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ParamError(f"{param.name} must be strictly ascending, got {values}")
    return Coerced(tuple(values), "; ".join(warnings))


def _check_text(param: Param, text: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise ParamError(
            f"{param.name} is {len(text)} characters long ({shown(text)}); the most is "
            f"{MAX_PROMPT_CHARS} (CLIP reads only its first 77 tokens, about 300 characters)"
        )


def _blend(param: Param, args: Sequence[Any]) -> Coerced:
    if not args or len(args) % 2:
        raise ParamError(f"{param.name} expects pairs of text and weight, got {len(args)} argument(s)")
    if len(args) // 2 > MAX_BLEND_ENTRIES:
        raise ParamError(
            f"{param.name} has {len(args) // 2} entries; the most is {MAX_BLEND_ENTRIES} "
            "(each new text is one text-encoder call); blend fewer prompts"
        )
    pairs: list[tuple[str, float]] = []
    for text, weight in zip(args[::2], args[1::2], strict=True):
        if not isinstance(text, str):
            raise ParamError(f"{param.name}: each pair starts with a text, got {shown(text)}")
        _check_text(param, text)
        w = _number(param, weight)
        if w < 0:
            raise ParamError(f"{param.name}: weights must be >= 0, got {w:g} for {shown(text)}")
        pairs.append((text, w))
    if sum(w for _, w in pairs) <= 0:
        raise ParamError(f"{param.name}: the weights sum to 0; at least one must be positive")
    return Coerced(tuple(pairs))


def strength_to_t_index(strength: float, steps: int) -> tuple[int, ...]:
    """Map the 0..1 strength knob onto `steps` ascending t_index values.

    The first index sets how much noise the input gets (low index = more change), so
    t0 = round((1 - strength) * 49), capped so that `steps` distinct indices fit; the rest
    spread evenly from t0 towards the end of the schedule: strength 0.35 at 2 steps gives
    (32, 41); strength 1 at 4 steps gives (0, 12, 25, 37).
    """
    if not 1 <= steps <= MAX_STEPS:
        raise ParamError(f"steps must be within [1, {MAX_STEPS}], got {steps}")
    s = min(max(float(strength), 0.0), 1.0)
    t0 = min(round((1.0 - s) * (NUM_INFERENCE_STEPS - 1)), NUM_INFERENCE_STEPS - steps)
    span = NUM_INFERENCE_STEPS - t0
    return tuple(t0 + (k * span) // steps for k in range(steps))


def t_index_to_strength(t_index_list: Sequence[int]) -> float:
    """The strength that `strength_to_t_index` would map onto `t_index_list[0]`."""
    return round(1.0 - t_index_list[0] / (NUM_INFERENCE_STEPS - 1), 4)


@dataclass(frozen=True)
class Pending:
    """A submitted value waiting for the next frame boundary."""

    value: Any
    version: int  # the store's submit counter when it arrived
    t_received: float  # time.perf_counter()


class ParamStore:
    """Live parameter values shared by the control threads and the runtime.

    Any thread may `submit` (latest value wins per name). The runtime alone calls
    `take_pending` between frames, applies what it can, and `commit`s the values it applied.
    A taken value is "in flight" until it is committed or the next `take_pending` (the engine
    refused it), so `latest`/`newest` never fall back to the old value while it is applied.
    """

    def __init__(self, initial: Mapping[str, Any]) -> None:
        unknown = set(initial) - set(LIVE)
        if unknown:
            raise KeyError(f"not live parameters: {sorted(unknown)}")
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {name: p.default for name, p in LIVE.items()}
        self._values.update(initial)
        self._pending: dict[str, Pending] = {}
        self._in_flight: dict[str, Pending] = {}  # taken by the runtime, not committed yet
        self._changed: set[str] = set()
        self._version = 0

    def submit(self, name: str, value: Any) -> int:
        """Queue `value` for `name`; returns the submit version it got."""
        if name not in LIVE:
            raise KeyError(name)
        with self._lock:
            self._version += 1
            self._pending[name] = Pending(value, self._version, time.perf_counter())
            return self._version

    def take_pending(self) -> dict[str, Pending]:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._in_flight = dict(pending)
            return pending

    def commit(self, name: str, value: Any) -> None:
        with self._lock:
            if self._values.get(name) != value:
                self._changed.add(name)
            self._values[name] = value
            self._in_flight.pop(name, None)

    def get(self, name: str) -> Any:
        with self._lock:
            return self._values[name]

    def latest(self, name: str) -> Any:
        """The newest value for `name`: a pending submission, else the applied value."""
        return self.newest(name)[0]

    def newest(self, name: str) -> tuple[Any, bool]:
        """(the newest value for `name`, whether it is still waiting to be applied)."""
        with self._lock:
            pending = self._pending.get(name) or self._in_flight.get(name)
            return (pending.value, True) if pending is not None else (self._values[name], False)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    def take_changed(self) -> dict[str, Any]:
        """Values committed with a new value since the last call (for status feedback)."""
        with self._lock:
            changed = {name: self._values[name] for name in sorted(self._changed)}
            self._changed.clear()
            return changed


def osc_args(param: Param, value: Any) -> list[Any]:
    """A parameter value as OSC arguments (the form `/sd/get` and status feedback send)."""
    if param.kind is Kind.INT_LIST:
        return [int(v) for v in value]
    if param.kind is Kind.BLEND:
        return [x for text, weight in value for x in (text, float(weight))]
    if param.kind is Kind.BOOL:
        return [bool(value)]
    return [value]


def table(params: Iterable[Param] = PARAMS) -> list[dict[str, Any]]:
    """The table as plain data: what `sdbridge params --json` prints and tools are built from."""
    rows = []
    for p in params:
        default = list(p.default) if isinstance(p.default, tuple) else p.default
        rows.append(
            {
                "name": p.name,
                "type": p.kind.value,
                "default": default,
                "min": p.minimum,
                "max": p.maximum,
                "live": p.live,
                "doc": p.doc,
                "label": p.label,
                "address": p.address,
                "norm_address": f"{p.address}/norm" if p.live and p.numeric else None,
                "aliases": list(p.aliases),
                "choices": list(p.choices),
                "td_name": p.td_name,
                "reload_reason": p.reload_reason,
            }
        )
    return rows


def text_args(param: Param, text: str) -> list[Any]:
    """Arguments from one line of text (a form field, `sdbridge send`): lists split on commas or
    spaces; blends are `text:weight | text:weight`; everything else is one argument."""
    if param.kind is Kind.INT_LIST:
        return [part for part in text.replace(",", " ").split() if part]
    if param.kind is Kind.BLEND:
        args: list[Any] = []
        for item in text.split("|"):
            body, sep, weight = item.rpartition(":")
            if not sep:
                raise ParamError(f"{param.name}: write each entry as text:weight, got {shown(item.strip())}")
            args += [body.strip(), weight.strip()]
        return args
    return [text]
