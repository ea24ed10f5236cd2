"""Syphon (macOS): a server sink and a client source over syphon-python (Metal).

A `SyphonMetalServer` publishes a Metal texture that the sink fills from each frame; a
`SyphonMetalClient` on a server found through `SyphonServerDirectory` gives back Metal textures
that the source copies out. Metal textures count rows from the top, so no flip is needed
unless a client wants one (`flip`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from bridge.frames import Frame, PixelFormat, from_format, to_format
from bridge.transports.base import import_vendor, poll_for_frame

log = logging.getLogger(__name__)

MTL_PIXEL_FORMAT_BGRA8 = 80  # MTLPixelFormatBGRA8Unorm; RGBA8Unorm is 70
DISCOVERY_INTERVAL_S = 1.0  # how often a source without a server looks again


def syphon_modules() -> tuple[Any, Any, Any]:
    """syphon, syphon.utils.numpy and syphon.utils.raw, or the error that says how to get them."""
    syphon = import_vendor("syphon", what="Syphon", extra="syphon", platform="darwin")
    np_utils = import_vendor("syphon.utils.numpy", what="Syphon", extra="syphon", platform="darwin")
    raw = import_vendor("syphon.utils.raw", what="Syphon", extra="syphon", platform="darwin")
    return syphon, np_utils, raw


class SyphonSink:
    """Publishes frames as the Syphon server `name`."""

    def __init__(self, *, name: str = "sdbridge", flip: bool = False) -> None:
        self._syphon, self._np, self._raw = syphon_modules()
        self.name = name or "sdbridge"
        self.flip = flip
        self._server: Any = self._syphon.SyphonMetalServer(self.name)
        self._texture: Any = None
        self.size: tuple[int, int] | None = None

    def write(self, frame: Frame) -> None:
        if self._server is None:
            raise RuntimeError("the Syphon server is closed")
        rgba = to_format(frame.pixels, PixelFormat.RGBA)
        height, width = rgba.shape[:2]
        if self._texture is None or self.size != (width, height):
            self._texture = self._raw.create_mtl_texture(self._server.device, width, height)
            self.size = (width, height)
        self._np.copy_image_to_mtl_texture(rgba, self._texture)
        self._server.publish_frame_texture(self._texture, is_flipped=self.flip)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()


class SyphonSource:
    """Receives from the Syphon server `name` (matched on the server name, then on the app
    name; "" = the first server). While it is gone `read` returns None (the bridge holds its last
    output) and the directory is searched again about once a second."""

    def __init__(self, *, name: str = "", flip: bool = False, poll_s: float = 0.002) -> None:
        self._syphon, self._np, _raw = syphon_modules()
        self.name = name
        self.flip = flip
        self.poll_s = poll_s
        self._directory: Any = None
        self._client: Any = None
        self._next_look = 0.0
        self._seq = 0
        self.size: tuple[int, int] | None = None
        self.waiting = f"waiting for the Syphon server {self._label()}"

    def _label(self) -> str:
        return repr(self.name) if self.name else "(any)"

    def _find(self) -> Any:
        if self._directory is None:
            self._directory = self._syphon.SyphonServerDirectory()
            self._directory.run_loop_interval = 0.05  # its default blocks a whole second
        servers = list(self._directory.servers)
        if not self.name:
            return servers[0] if servers else None
        for key in ("name", "app_name"):
            for server in servers:
                if getattr(server, key) == self.name:
                    return server
        return None

    def _poll(self) -> Frame | None:
        if self._client is not None and not self._client.is_valid:
            log.info("Syphon server %s went away; holding the last frame", self._label())
            self._client.stop()
            self._client = None
        if self._client is None:
            now = time.perf_counter()
            if now < self._next_look:
                return None
            self._next_look = now + DISCOVERY_INTERVAL_S
            description = self._find()
            if description is None:
                self.waiting = f"waiting for the Syphon server {self._label()}"
                return None
            self._client = self._syphon.SyphonMetalClient(description)
            log.info("Syphon: receiving from %r (%s)", description.name, description.app_name)
        if not self._client.has_new_frame:
            return None
        texture = self._client.new_frame_image
        if texture is None:
            # no surface to read (the server quit, or has not published yet): syphon-python passes
            # Syphon's nil on (syphon/client.py:119-126); look again on the next poll
            return None
        pixels = np.asarray(self._np.copy_mtl_texture_to_image(texture))
        fmt = PixelFormat.BGRA if int(texture.pixelFormat()) == MTL_PIXEL_FORMAT_BGRA8 else PixelFormat.RGBA
        rgba = from_format(pixels, fmt, flip=self.flip)
        self.size = (rgba.shape[1], rgba.shape[0])
        self.waiting = ""
        self._seq += 1
        return Frame(np.array(rgba, copy=True), self._seq)

    def read(self, timeout_s: float) -> Frame | None:
        return poll_for_frame(self._poll, timeout_s, self.poll_s)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.stop()
