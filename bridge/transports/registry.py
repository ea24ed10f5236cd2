"""The factories: `open_source(cfg)` and `open_sink(cfg, ctx)`. Each medium's module, and any
optional library it needs, is imported only when that kind is opened."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.transports.base import Sink, SinkContext, Source
from bridge.transports.kinds import SINK_KINDS, SOURCE_KINDS, VENDOR_KINDS

if TYPE_CHECKING:
    from bridge.config import SinkConfig, SourceConfig

__all__ = ["SINK_KINDS", "SOURCE_KINDS", "VENDOR_KINDS", "availability", "open_sink", "open_source"]


def _load_vendor(kind: str) -> None:
    """Import the library `kind` needs through its own module's loader, the one opening it
    uses, so the errors are the same ones."""
    if kind in ("video", "camera"):
        from bridge.transports.files import cv2_module

        cv2_module(f"the {kind} input")
    elif kind == "spout":
        from bridge.transports.spout import spoutgl

        spoutgl()
    elif kind == "syphon":
        from bridge.transports.syphon import syphon_modules

        syphon_modules()
    elif kind == "ndi":
        from bridge.transports.ndi import cyndilib

        cyndilib()
    elif kind == "virtualcam":
        from bridge.transports.virtualcam import pyvirtualcam

        pyvirtualcam()


def availability(kind: str) -> str:
    """ "" when `kind` can open on this machine, as far as can be told without opening it (no
    device is grabbed, no sender started); otherwise the reason and the fix. Unknown kinds
    raise ValueError."""
    if kind not in SOURCE_KINDS and kind not in SINK_KINDS:
        raise ValueError(
            f"unknown kind {kind!r}; valid kinds: {', '.join(dict.fromkeys(SOURCE_KINDS + SINK_KINDS))}"
        )
    if kind not in VENDOR_KINDS:
        return ""
    try:
        _load_vendor(kind)
    except (ImportError, RuntimeError) as exc:
        return str(exc)
    if kind == "virtualcam":
        from bridge.transports.virtualcam import driver_problem

        return driver_problem()
    if kind == "camera":
        return camera_problem()
    return ""


def camera_devices() -> list[str]:
    """The V4L2 capture devices of this Linux machine (/dev/video*), sorted by number."""
    found = [p for p in Path("/dev").glob("video*") if p.name[5:].isdigit()]
    return [str(p) for p in sorted(found, key=lambda p: int(p.name[5:]))]


def camera_problem() -> str:
    """ "" unless this is Linux and it has no camera device at all. Elsewhere (and for one
    device by index) only opening the camera can tell."""
    if sys.platform != "linux" or camera_devices():
        return ""
    return (
        "no camera device was found (no /dev/video* on this machine): plug a camera in, or start "
        "a virtual one (v4l2loopback), or use input.kind=image, video, shm or synthetic"
    )


# POSIX shared memory names: no '/', and macOS allows 31 characters (the ring adds _gN).
_SHM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SHM_NAME_MAX = 24 if sys.platform == "darwin" else 200


def _shm_name_problem(key: str, name: str) -> str:
    if _SHM_NAME.fullmatch(name) and len(name) <= _SHM_NAME_MAX:
        return ""
    from bridge.params import shown

    return (
        f"{key} {shown(name)} is not a usable shared memory name: use 1 to {_SHM_NAME_MAX} letters, "
        "digits, '_', '.' or '-' (e.g. sdbridge_in)"
    )


def precheck_source(cfg: SourceConfig) -> str:
    """What is wrong with the input `cfg` that can be told without opening it ("" when
    nothing is): a missing or unreadable image or video file, a camera device that does not
    exist, a bad shared memory name. Cheap: run it before the model loads."""
    from bridge.params import shown

    kind = cfg.kind
    if kind in ("image", "video"):
        if not cfg.path:
            return f"input.kind={kind} needs a file: set input.path (e.g. --set input.path=show.png)"
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            where = "a folder, not a file" if path.is_dir() else "no such file"
            return f"input.path {shown(str(path))}: {where}; give the {kind} file's path"
        if kind == "image":
            return _image_problem(path)
        return ""
    if kind == "camera":
        problem = camera_problem()
        if problem:
            return f"input.kind=camera: {problem}"
        if sys.platform == "linux" and not Path(f"/dev/video{cfg.device}").exists():
            return (
                f"input.device {cfg.device}: there is no /dev/video{cfg.device}; "
                f"the cameras here are {', '.join(camera_devices())} (input.device is the number)"
            )
        return ""
    if kind == "shm":
        return _shm_name_problem("input.name", cfg.name or "sdbridge_in")
    return ""


def _image_problem(path: Path) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()  # reads the header and checks the structure, without decoding pixels
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        from bridge.params import shown

        return (
            f"input.path {shown(str(path))} is not an image Pillow can read ({type(exc).__name__}); "
            "use a PNG, JPEG or another common format"
        )
    return ""


def precheck_sink(cfg: SinkConfig, key: str = "output") -> str:
    """As `precheck_source`, for the output `cfg` found at config `key` (`output`,
    `extra_outputs.0`): a bad shared memory name, a virtual camera device that does not exist.
    Listening ports are checked by `bridge.ports`."""
    if cfg.kind == "shm":
        return _shm_name_problem(f"{key}.name", cfg.name or "sdbridge_out")
    if cfg.kind == "virtualcam" and cfg.device and sys.platform == "linux" and not Path(cfg.device).exists():
        from bridge.params import shown

        devices = ", ".join(camera_devices()) or "none"
        return f"{key}.device {shown(cfg.device)} does not exist (video devices here: {devices})"
    return ""


def describe(kind: str) -> str:
    """A short note on an available medium (the NDI runtime's version), "" when none."""
    if kind == "ndi":
        from bridge.transports.ndi import cyndilib

        return f"NDI runtime {cyndilib().get_ndi_version()}"
    return ""


def prepare_media(source: SourceConfig, sinks: Sequence[SinkConfig]) -> None:
    """Process-wide settings that must come before any transport opens: the NDI hosts to look
    at when `input.address` is set (NDI reads its config once, at its first object)."""
    if source.kind == "ndi" and source.address:
        from bridge.transports.ndi import parse_addresses, use_addresses

        use_addresses(parse_addresses(source.address))


def open_source(cfg: SourceConfig, *, width: int, height: int) -> Source:
    """Open the input `cfg` names; `width`/`height` are the engine's size (the synthetic
    pattern's default). Raises ValueError for an unknown kind, OSError/ImportError with the
    reason and the fix when the medium cannot open."""
    kind = cfg.kind
    if kind == "synthetic":
        from bridge.transports.synthetic import SyntheticSource

        return SyntheticSource(width=cfg.width or width, height=cfg.height or height, fps=cfg.fps)
    if kind == "image":
        from bridge.transports.files import ImageSource

        return ImageSource(path=cfg.path, fps=cfg.fps)
    if kind == "video":
        from bridge.transports.files import VideoSource

        return VideoSource(path=cfg.path, fps=cfg.fps, loop=cfg.loop)
    if kind == "camera":
        from bridge.transports.files import CameraSource

        return CameraSource(device=cfg.device)
    if kind == "shm":
        from bridge.transports.shm import ShmSource

        return ShmSource(name=cfg.name or "sdbridge_in")
    if kind == "spout":
        from bridge.transports.spout import SpoutSource

        return SpoutSource(name=cfg.name, flip=cfg.flip, fps=cfg.fps)
    if kind == "syphon":
        from bridge.transports.syphon import SyphonSource

        return SyphonSource(name=cfg.name, flip=cfg.flip)
    if kind == "ndi":
        from bridge.transports.ndi import NdiSource

        return NdiSource(name=cfg.name, address=cfg.address)
    raise ValueError(f"unknown input kind {kind!r}; valid kinds: {', '.join(SOURCE_KINDS)}")


def open_sink(cfg: SinkConfig, ctx: SinkContext | None = None) -> Sink:
    """Open the output `cfg` names. Raises like `open_source`."""
    kind = cfg.kind
    if kind == "shm":
        from bridge.transports.shm import ShmSink

        return ShmSink(name=cfg.name or "sdbridge_out", fmt=cfg.format, slots=cfg.slots)
    if kind == "preview":
        from bridge.transports.preview import PreviewSink

        return PreviewSink(
            host=cfg.host,
            port=cfg.port,
            fps=cfg.fps or 30.0,
            quality=cfg.jpeg_quality,
            allowed_hosts=cfg.allowed_hosts,
            token=cfg.token,
            ctx=ctx or SinkContext(),
        )
    if kind == "null":
        from bridge.transports.null import NullSink

        return NullSink()
    ctx = ctx or SinkContext()
    if kind == "spout":
        from bridge.transports.spout import SpoutSink

        return SpoutSink(name=cfg.name or "sdbridge", fmt=cfg.format, flip=cfg.flip)
    if kind == "syphon":
        from bridge.transports.syphon import SyphonSink

        return SyphonSink(name=cfg.name or "sdbridge", flip=cfg.flip)
    if kind == "ndi":
        from bridge.transports.ndi import NdiSink

        fmt = "bgra" if cfg.format in ("bgr", "bgra") else "rgba"  # NDI's 8-bit formats carry alpha
        return NdiSink(name=cfg.name or "sdbridge", fmt=fmt, fps=cfg.fps or ctx.fps)
    if kind == "virtualcam":
        from bridge.transports.virtualcam import VirtualCamSink

        return VirtualCamSink(
            width=cfg.width or ctx.width,
            height=cfg.height or ctx.height,
            fps=cfg.fps or ctx.fps,
            device=cfg.device,
            backend=cfg.backend,
            fmt="bgr" if cfg.format in ("bgr", "bgra") else "rgb",  # cameras carry no alpha
        )
    raise ValueError(f"unknown output kind {kind!r}; valid kinds: {', '.join(SINK_KINDS)}")
