"""The factories: `open_source(cfg)` and `open_sink(cfg, ctx)`. Each medium's module, and any
optional library it needs, is imported only when that kind is opened."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.transports.base import Sink, SinkContext, Source

if TYPE_CHECKING:
    from bridge.config import SinkConfig, SourceConfig

SOURCE_KINDS = ("synthetic", "image", "video", "camera", "shm")
SINK_KINDS = ("shm", "preview", "null")


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
            ctx=ctx or SinkContext(),
        )
    if kind == "null":
        from bridge.transports.null import NullSink

        return NullSink()
    raise ValueError(f"unknown output kind {kind!r}; valid kinds: {', '.join(SINK_KINDS)}")
