"""Configuration: strict YAML into frozen dataclasses. The only reader of YAML and overrides.

An unknown key is an error naming the key and the nearest valid one; a value of the wrong type
names the key, the value and the expected type. Live parameter values are checked with the same
coercion OSC uses (`bridge.params.coerce`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bridge.acceleration import COMPILE_MODES, Acceleration
from bridge.control.midi_mapping import MidiMapping, check_mapping, mapping_fields, mapping_yaml
from bridge.params import BY_NAME, LIVE, MAX_STEPS, SHOWN_CHARS, Kind, ParamError, coerce, cut, shown
from bridge.transports.kinds import SINK_KINDS, SOURCE_KINDS


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


# The model cache (models, compile caches, TensorRT engines), as a config value. The engine, which
# imports no other part, has its own: bridge.engine.loading.DEFAULT_CACHE_DIR (a test keeps them equal).
DEFAULT_CACHE_DIR = "~/.cache/sdbridge"


@dataclass(frozen=True)
class EngineConfig:
    """What needs a reload to change (the config-only rows of the parameter table)."""

    model: str = "tiny"  # embedded name, local diffusers folder, .safetensors file or hub id
    width: int = 256
    height: int = 256
    cfg_type: str = "self"  # none | full | self | initialize
    acceleration: str = "none"  # none | compile | cuda_graph | tensorrt, +cuda_graph (bridge/acceleration.py)
    compile_mode: str = "default"  # inductor mode for compile: default | max-autotune-no-cudagraphs
    # Step counts the show may switch to live, made ready before it starts (compile: compiled;
    # tensorrt: profiles built) besides the start's own and the table's default.
    warm_steps: tuple[int, ...] = ()
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float16 on cuda, float32 on cpu) | float16 | float32
    frame_buffer_size: int = 1  # the live bridge takes only 1 (see _check)
    use_denoising_batch: bool = True
    tiny_vae: str = ""  # "taesd", "taesdxl", a hub id or a folder: swap in a tiny VAE; "" = none
    lcm_lora: str = ""  # hub id or local path of an LCM-LoRA to fuse; "" for none
    cache_dir: str = DEFAULT_CACHE_DIR
    offline: bool = False  # never touch the network (hub ids must already be cached)
    similarity_seed: int | None = None  # fixes the similarity filter's dice (tests)


@dataclass(frozen=True)
class SourceConfig:
    """The input. Fields a kind does not use are ignored by it."""

    kind: str = "synthetic"  # see bridge.transports.kinds.SOURCE_KINDS
    fps: float = 30.0  # synthetic, image: frames per second; video: 0 = the file's rate; spout: the sender's
    width: int = 0  # synthetic size; 0 = the engine's size
    height: int = 0
    path: str = ""  # image / video file
    loop: bool = True  # video: start again at the end
    device: int = 0  # camera index (OBS Virtual Camera is one too)
    name: str = ""  # shm ring / Spout sender / Syphon server / NDI source name
    address: str = ""  # ndi: hosts or IPs to look at when mDNS discovery does not work (a,b,c)
    flip: bool = False  # spout / syphon: turn the received image upside down


@dataclass(frozen=True)
class SinkConfig:
    """One output. Fields a kind does not use are ignored by it."""

    kind: str = "shm"  # see bridge.transports.kinds.SINK_KINDS
    name: str = ""  # shm ring / Spout sender / Syphon server / NDI source name; "" = sdbridge_out or sdbridge
    format: str = "rgba"  # rgba|bgra|rgb|bgr: shm and spout as given; ndi adds alpha, virtualcam drops it
    flip: bool = False  # spout / syphon: send upside down (for receivers that count rows from the bottom)
    slots: int = 3  # shm ring slots
    host: str = "127.0.0.1"  # preview bind address
    port: int = 7860  # preview HTTP port
    fps: float = 0.0  # preview cap (0: 30) / virtualcam and ndi rate (0: runtime.fps, else 30)
    jpeg_quality: int = 80  # preview
    allowed_hosts: tuple[str, ...] = ()  # preview: names besides its address and localhost clients may use
    token: str = ""  # preview: when set, every request needs it (open the page once as /?token=...)
    device: str = ""  # virtualcam device: /dev/videoN on Linux, "" = the first one
    backend: str = ""  # virtualcam backend: obs | unitycapture | v4l2loopback; "" = any that works
    width: int = 0  # virtualcam size; 0 = the engine's size
    height: int = 0


@dataclass(frozen=True)
class OscConfig:
    enabled: bool = True
    host: str = "127.0.0.1"  # 0.0.0.0 to accept other machines (consider `allowlist`)
    port: int = 7000
    status_targets: tuple[str, ...] = ("127.0.0.1:7001",)
    allowlist: tuple[str, ...] = ()  # sender IPs; empty = anyone who can reach the port
    status_interval_s: float = 1.0
    oscquery_port: int = 0  # serve OSCQuery (the address space over HTTP) on this port; 0 = off
    oscquery_advertise: bool = True  # announce it over mDNS when zeroconf is installed
    # names besides osc.host and localhost that OSCQuery clients may use
    oscquery_allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class MidiConfig:
    enabled: bool = False
    port: str = ""  # input port name, or part of it; "" = the first port
    mappings: tuple[MidiMapping, ...] = ()


@dataclass(frozen=True)
class RuntimeConfig:
    fps: float = 30.0  # output pacing; 0 = as fast as frames come
    hold_after_s: float = 0.5  # source silence before the bridge repeats its last output
    warmup_frames: int = 2  # engine calls before the state turns "running"


@dataclass(frozen=True)
class BridgeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    params: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    input: SourceConfig = field(default_factory=SourceConfig)
    output: SinkConfig = field(default_factory=lambda: SinkConfig(kind="shm", name="sdbridge_out"))
    extra_outputs: tuple[SinkConfig, ...] = (SinkConfig(kind="preview"),)
    osc: OscConfig = field(default_factory=OscConfig)
    midi: MidiConfig = field(default_factory=MidiConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def outputs(self) -> tuple[SinkConfig, ...]:
        return (self.output, *self.extra_outputs)


# ---------------------------------------------------------------------- loading
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB; a real config is a few KB
MAX_YAML_ALIASES = 100  # `*name` uses in one document; a real config needs a handful
MAX_YAML_NODES = 100_000  # nodes once every alias is expanded; a real config has a few hundred
MAX_SHOWN = SHOWN_CHARS  # characters of a value quoted in an error message


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing documents whose aliases would expand past a small limit
    (a 'billion laughs' of a few hundred bytes otherwise builds gigabytes)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise ConfigError(
                    f"uses more than {MAX_YAML_ALIASES} YAML aliases (*name); "
                    "write the values out, or use fewer anchors"
                )
        return super().compose_node(parent, index)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes in `node` with every alias expanded; `sizes` memoizes shared nodes, so this is
    linear in the document even when its expansion is exponential."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = 1  # a recursive alias counts once (construction refuses it anyway)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    total = min(total, MAX_YAML_NODES + 1)
    sizes[id(node)] = total
    return total


def parse_yaml(text: str) -> Any:
    """YAML `text` as Python data, safely: no tags beyond the standard ones, at most
    `MAX_YAML_ALIASES` aliases and `MAX_YAML_NODES` nodes once expanded. Raises ConfigError
    for those limits and yaml.YAMLError for invalid YAML."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(
                f"expands to more than {MAX_YAML_NODES} values through its YAML aliases (*name); "
                "write the values out, or use fewer anchors"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_config_text(path: str | Path) -> str:
    """The text of the config file at `path`, refused past `MAX_CONFIG_BYTES`."""
    p = Path(path)
    try:
        with p.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config {p} is larger than {MAX_CONFIG_BYTES // 1024} KB; a config is a few KB of "
            "settings: check that this is the right file"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config {p} is not UTF-8 text (byte {exc.start}): check that this is the right file"
        ) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> BridgeConfig:
    """Read `path` (None = the built-in defaults), apply `--set key.path=value` overrides, and
    validate everything. Raises `ConfigError`, whose message starts with where the mistake
    is: the file, or the `--set` that brought it."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        text = read_config_text(path)
        try:
            loaded = parse_yaml(text)
        except ConfigError as exc:
            raise ConfigError(f"{where} {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where} is not valid YAML: {cut(str(exc), 600)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{where}: the top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        raw = loaded
    try:
        return _validated(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{_blame(raw, overrides, where)}: {exc}") from None


def _validated(raw: dict[str, Any], overrides: Sequence[str]) -> BridgeConfig:
    """`raw` with `overrides` applied, built and checked (raw itself is left as it was)."""
    merged = copy.deepcopy(raw)
    for item in overrides:
        _apply_override(merged, item)
    config: BridgeConfig = _build(BridgeConfig, merged, "")
    _check(config)
    return config


def _blame(raw: dict[str, Any], overrides: Sequence[str], where: str) -> str:
    """Where a config that failed went wrong: the file (`where`) when it fails alone, else the
    first `--set` after which it fails. Configs are small: trying each prefix is cheap."""
    for count in range(len(overrides) + 1):
        try:
            _validated(raw, overrides[:count])
        except ConfigError:
            return where if count == 0 else f"--set {cut(overrides[count - 1])}"
    return f"{where} with --set {cut(' '.join(overrides))}"  # only all of them together fail


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"expects section.key=value, got {shown(item)}")
    try:
        value = parse_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    except ConfigError as exc:
        raise ConfigError(f"the value {exc}") from None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = _list_slot(node, part, key, nxt)
            continue
        if not isinstance(node.get(part), dict | list):
            # a list of sections when indexed by number (extra_outputs.0.kind), else a mapping
            default = _default_for(parts[: i + 1])
            node[part] = default if default is not None else ([] if nxt.isdigit() else {})
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        _list_slot(node, last, key, None)
        node[int(last)] = value
    else:
        node[last] = value


def _list_slot(node: list[Any], part: str, key: str, nxt: str | None) -> Any:
    if not part.isdigit():
        raise ConfigError(f"{shown(part)} indexes a list, so it must be a number")
    index = int(part)
    if index > len(node):
        raise ConfigError(f"index {index} skips entries (the list has {len(node)})")
    if index == len(node):
        node.append({})
    if nxt is not None and not isinstance(node[index], dict):
        node[index] = {}
    return node[index]


def _default_for(parts: list[str]) -> Any:
    """The built-in default of a list-valued key as raw data, so `--set extra_outputs.0.port=1`
    edits the default preview entry instead of replacing the whole list."""
    if parts == ["extra_outputs"]:
        return [dataclasses.asdict(s) for s in BridgeConfig().extra_outputs]
    return None


def _build(cls: type[Any], raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(raw).__name__} {shown(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key)[:MAX_SHOWN], names, n=1, cutoff=0.5)
            hint = f"; did you mean {(f'{path}.' if path else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {shown(full)}{hint} (valid: {', '.join(names)})")
        if key == "params":
            kwargs[key] = types.MappingProxyType(_params(value))
        elif key == "kind" and value is None:
            kwargs[key] = "null"  # YAML reads a bare `kind: null` as None; the null transport is meant
        else:
            kwargs[key] = _convert(hints[key], value, full)
    for f in dataclasses.fields(cls):
        if (
            f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"{path or 'config'} needs {f.name!r}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        return _convert(next(o for o in options if o is not type(None)), value, path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value] if isinstance(value, str) else value
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path} must be a list, got {shown(value)}")
        item = typing.get_args(tp)[0]
        return tuple(_convert(item, v, f"{path}.{i}") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path} must be a number, got {shown(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{path} must be a string, got {shown(value)}")
        return str(value)
    raise ConfigError(f"{path}: unsupported type {tp!r}")  # a bug in this module, not the user's


def _flatten(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in LIVE:
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def _params(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping of live parameters, got {shown(raw)}")
    values: dict[str, Any] = {}
    for name, value in _flatten(raw).items():
        key = "params." + name.replace("/", ".")
        if name not in LIVE:
            if name in BY_NAME:
                raise ConfigError(f"{key} is not live; it belongs in the engine section (engine.{name})")
            valid = [n.replace("/", ".") for n in LIVE]
            close = difflib.get_close_matches(name.replace("/", ".")[:MAX_SHOWN], valid, n=1, cutoff=0.5)
            hint = f"; did you mean 'params.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key {shown(key)}{hint} (valid: {', '.join(valid)})")
        param = LIVE[name]
        if param.kind is Kind.BLEND and isinstance(value, list):
            args = [x for pair in value for x in (pair if isinstance(pair, list | tuple) else [pair])]
        elif param.kind is Kind.INT_LIST and isinstance(value, list | tuple):
            args = list(value)
        else:
            args = [value]
        try:
            coerced = coerce(param, args)
        except ParamError as exc:
            raise ConfigError(f"{key}: {cut(str(exc), 2 * MAX_SHOWN)}") from None
        if coerced.warning:
            raise ConfigError(f"{key}: {cut(coerced.warning.split(';')[0], 2 * MAX_SHOWN)}")
        values[name] = coerced.value
    return values


def _check(config: BridgeConfig) -> None:
    """Checks that span fields; each names the key and the expected value."""
    e = config.engine

    def fail(message: str) -> None:
        raise ConfigError(message)

    for key in ("width", "height"):
        value = getattr(e, key)
        lo, hi = BY_NAME[key].minimum, BY_NAME[key].maximum
        assert lo is not None and hi is not None
        if value % 8 or not lo <= value <= hi:
            fail(f"engine.{key} must be a multiple of 8 within [{lo:g}, {hi:g}], got {value}")
    choices = BY_NAME["cfg_type"].choices
    if e.cfg_type not in choices:
        fail(f"engine.cfg_type must be one of {', '.join(choices)}, got {shown(e.cfg_type)}")
    try:
        accel = Acceleration.parse(e.acceleration)
    except ValueError as exc:
        fail(f"engine.{cut(str(exc), 400)}")
    if e.compile_mode not in COMPILE_MODES:
        fail(f"engine.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {shown(e.compile_mode)}")
    if len(e.warm_steps) > MAX_STEPS or any(not 1 <= n <= MAX_STEPS for n in e.warm_steps):
        fail(
            f"engine.warm_steps must list step counts within [1, {MAX_STEPS}], got {shown(list(e.warm_steps))}"
        )
    if accel.cuda_graph and not e.use_denoising_batch:
        fail(
            f"engine.acceleration={e.acceleration} captures the stream batch; it needs "
            "engine.use_denoising_batch: true (the sequential reference is not captured)"
        )
    if e.dtype not in ("auto", "float16", "float32", "bfloat16"):
        fail(f"engine.dtype must be auto, float16, float32 or bfloat16, got {shown(e.dtype)}")
    if e.frame_buffer_size != 1:
        # The live bridge hands the engine each input frame as it comes and sends each output
        # at once; f > 1 would hold every frame back until f-1 later ones arrived.
        fail(
            f"engine.frame_buffer_size must be 1 for the live bridge, got {e.frame_buffer_size}: "
            "it makes every engine call take f input frames at once, so each frame would wait "
            "for the next f-1 (adding (f-1)/fps of latency) and outputs would leave in bursts. "
            "Set it to 1; StreamEngine(frame_buffer_size=f) stays available from Python"
        )
    _check_kind("input.kind", config.input.kind, SOURCE_KINDS, fail)
    for i, sink in enumerate(config.outputs):
        key = "output" if i == 0 else f"extra_outputs.{i - 1}"
        _check_kind(f"{key}.kind", sink.kind, SINK_KINDS, fail)
        if sink.format not in ("rgba", "bgra", "rgb", "bgr"):
            fail(f"{key}.format must be rgba, bgra, rgb or bgr, got {shown(sink.format)}")
        if not 0 <= sink.port < 65536:
            fail(f"{key}.port must be within [0, 65535], got {sink.port}")
        if sink.width < 0 or sink.height < 0 or sink.fps < 0:
            fail(f"{key}.width, height and fps must be >= 0 (0 = the bridge's own)")
        if sink.kind == "virtualcam":
            from bridge.transports.virtualcam import backend_problem

            if problem := backend_problem(sink.backend):
                fail(f"{key}.backend {problem}")
    if config.input.kind == "ndi" and not config.input.name:
        fail(
            'input.name must name the NDI source for input.kind=ndi (e.g. "sdbridge" or "STAGE-PC (sdbridge)")'
        )
    if config.input.fps < 0 or config.runtime.fps < 0:
        fail("input.fps and runtime.fps must be >= 0 (0 = unpaced)")
    if not 0 <= config.osc.oscquery_port < 65536:
        fail(f"osc.oscquery_port must be within [1, 65535], or 0 for off, got {config.osc.oscquery_port}")
    if not 0 < config.osc.port < 65536:
        fail(f"osc.port must be within [1, 65535], got {config.osc.port}")
    for target in config.osc.status_targets:
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            fail(f"osc.status_targets entries must be host:port, got {shown(target)}")
    for i, mapping in enumerate(config.midi.mappings):
        try:
            check_mapping(mapping, f"midi.mappings.{i}")
        except ValueError as exc:
            fail(str(exc))
    if "t_index_list" in config.params and "strength" in config.params:
        fail("params.strength and params.t_index_list both set the steps; give one of them")


def acceleration_problem(engine: EngineConfig, *, cuda: bool) -> str:
    """Why `engine.acceleration` cannot run on this machine ("" when it can), given whether torch
    sees CUDA. Checked before the model loads (`sdbridge run`) and by `doctor`."""
    if not Acceleration.parse(engine.acceleration).cuda_graph:
        return ""
    if not cuda:
        return (
            f"engine.acceleration={engine.acceleration} needs an NVIDIA GPU with a CUDA build of torch, "
            "and torch sees no CUDA device here; use acceleration none or compile on this machine"
        )
    if engine.device != "auto" and not engine.device.startswith("cuda"):
        return (
            f"engine.acceleration={engine.acceleration} captures CUDA graphs, and engine.device is "
            f"{engine.device}; use device auto or cuda"
        )
    return ""


def _check_kind(key: str, kind: str, valid: Sequence[str], fail: Any) -> None:
    if kind not in valid:
        close = difflib.get_close_matches(kind[:MAX_SHOWN], valid, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        fail(f"{key} {shown(kind)} is not a known kind{hint} (valid: {', '.join(valid)})")


def add_midi_mapping(path: str | Path, mapping: MidiMapping) -> str:
    """Add `mapping` to the config file at `path` (created when missing) and turn MIDI on;
    returns what was done, for the user. A file without a `midi` section keeps its text and
    comments (the section is appended); one with a section is rewritten, without comments."""
    p = Path(path)
    text = read_config_text(p) if p.exists() else ""
    try:
        raw = parse_yaml(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {cut(str(exc), 600)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    entry = mapping_fields(mapping)
    if "midi" not in raw:
        block = f"midi:\n  enabled: true\n  mappings:\n    - {mapping_yaml(mapping)}\n"
        p.write_text(text + ("" if not text or text.endswith("\n") else "\n") + block, encoding="utf-8")
        load_config(p)  # the result must load
        return f"added a midi section to {p}"
    midi = raw["midi"] if isinstance(raw["midi"], dict) else {}
    mappings = [
        m for m in midi.get("mappings") or [] if not (isinstance(m, dict) and m.get("param") == mapping.param)
    ]
    midi["mappings"] = [*mappings, entry]
    midi["enabled"] = True
    raw["midi"] = midi
    p.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    load_config(p)
    return f"updated the midi section of {p} (rewritten: its comments are not kept)"
