"""Stand-ins for the vendor modules that cannot run on Linux: SpoutGL (Windows), syphon-python
(macOS) and pyvirtualcam (needs a camera driver). Each records its calls and checks their
arguments against the vendor's documented API, raising as the real module would:

- SpoutGL (jlai/Python-SpoutGL, PySpoutGL.cpp): `sendImage(buffer, width, height, glFormat,
  invert, hostFbo)` and `receiveImage(buffer|None, glFormat, invert, hostFbo)` need a C-contiguous
  buffer of at least width*height*bytes-per-pixel (else BufferError "Buffer not large enough");
  only GL_RGBA, GL_BGRA_EXT, GL_RGB and GL_BGR_EXT are known (else ValueError "Unknown GL
  format"). Spout needs an OpenGL context on the calling thread (`createOpenGL()`), so every call
  made from a thread other than the one that created the context raises here. A receiver's
  `receiveImage` returns True with `isUpdated()` set when it connects or the sender's size
  changes, without copying, and keeps returning True until `isUpdated()` is called
  (vendor/SpoutGL/Spout.cpp:1838, :1861); the caller re-allocates and receives again. Once
  connected, `receiveImage(None)` returns False (Spout.cpp:1876: "if (!pixels) return false").
  Frame counting (SpoutFrameCount.cpp) is off unless SpoutSettings turns it on (`frame_count`
  here): then `isFrameNew()` stays true after every receive (:145, :540), `getSenderFrame()` stays
  0 and every receive copies the pixels; with it on, a receive of a frame already seen copies
  nothing and `isFrameNew()` is false (:588; SpoutGL.cpp:1967).
- syphon-python (cansik/syphon-python): `SyphonMetalServer(name)`, `publish_frame_texture(texture,
  region=None, size=None, is_flipped=False)`, `stop()`; `utils.raw.create_mtl_texture(device, w,
  h)`; `utils.numpy.copy_image_to_mtl_texture(image, texture)` (image (m, n, 4), the texture's
  size); `SyphonServerDirectory().servers`; `SyphonMetalClient(description)` with `is_valid`,
  `has_new_frame`, `new_frame_image` (None when there is no surface, syphon/client.py:119-126),
  `stop()`; `utils.numpy.copy_mtl_texture_to_image(texture)`.
- pyvirtualcam (letmaik/pyvirtualcam a4c1de1, pyvirtualcam/camera.py): each OS registers its
  own backends (:107-121: Windows obs and unitycapture, macOS obs, Linux v4l2loopback) and
  `Camera(width, height, fps, *, fmt=PixelFormat.RGB, device=None, backend=None,
  print_fps=False)` looks a named backend up with `BACKENDS[backend]`, so an unregistered one
  raises KeyError (:206); without a name it tries each, and when all fail raises RuntimeError
  with one "'name' backend: reason" line each (:210-224). The reasons are each native backend's
  own (native_*/virtual_output.h), RGBA included ("Unsupported image format."). `send(frame)`
  raises TypeError for a dtype other than uint8 (:333) and ValueError for the wrong shape (:240).
  `PixelFormat` is the real enum, libyuv FourCC values (:123-152).
"""

from __future__ import annotations

import enum
import itertools
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

# ---------------------------------------------------------------------------------------- SpoutGL

GL_RGBA, GL_BGRA_EXT, GL_RGB, GL_BGR_EXT = 0x1908, 0x80E1, 0x1907, 0x80E0
_BPP = {GL_RGBA: 4, GL_BGRA_EXT: 4, GL_RGB: 3, GL_BGR_EXT: 3}


def _bytes_per_pixel(gl_format: int) -> int:
    if gl_format not in _BPP:
        raise ValueError("Unknown GL format")
    return _BPP[gl_format]


def _to_gl(rgba: np.ndarray, gl_format: int) -> np.ndarray:
    order = {GL_RGBA: [0, 1, 2, 3], GL_BGRA_EXT: [2, 1, 0, 3], GL_RGB: [0, 1, 2], GL_BGR_EXT: [2, 1, 0]}
    return np.ascontiguousarray(rgba[..., order[gl_format]])


def _from_gl(pixels: np.ndarray, gl_format: int) -> np.ndarray:
    rgba = np.full((*pixels.shape[:2], 4), 255, np.uint8)
    if gl_format in (GL_RGBA, GL_RGB):
        rgba[..., : pixels.shape[2]] = pixels
    else:
        rgba[..., [2, 1, 0]] = pixels[..., :3]
        if pixels.shape[2] == 4:
            rgba[..., 3] = pixels[..., 3]
    return rgba


def _check_buffer(buffer: Any, width: int, height: int, gl_format: int) -> memoryview:
    view = memoryview(buffer)
    if view.nbytes < width * height * _bytes_per_pixel(gl_format):
        raise BufferError("Buffer not large enough")
    if not view.c_contiguous:
        raise BufferError("Buffer must be contiguous")
    return view


@dataclass
class SpoutWorld:
    """The senders on this fake machine, by name: the newest RGBA frame and a frame counter."""

    senders: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    wrong_thread: list[str] = field(default_factory=list)
    contexts_open: int = 0
    fail_context: bool = False
    frame_count: bool = False  # SpoutSettings' "Framecount" (the registry key SpoutFrameCount.cpp:150 reads)
    readbacks: int = 0  # receives that copied pixels (each a GPU readback in real Spout)


class _GLOwner:
    world: SpoutWorld

    def __init__(self) -> None:
        self._thread: int | None = None

    def _on_context_thread(self, call: str) -> None:
        if self._thread is None:
            self.world.wrong_thread.append(f"{call} without createOpenGL()")
            raise RuntimeError(f"{call}: no OpenGL context")
        if threading.get_ident() != self._thread:
            self.world.wrong_thread.append(call)
            raise RuntimeError(f"{call}: the OpenGL context belongs to another thread")

    def createOpenGL(self) -> bool:
        if self.world.fail_context:
            return False
        self._thread = threading.get_ident()
        self.world.contexts_open += 1
        return True

    def closeOpenGL(self) -> bool:
        self._on_context_thread("closeOpenGL")
        self._thread = None
        self.world.contexts_open -= 1
        return True


def make_spoutgl(world: SpoutWorld) -> types.ModuleType:
    class SpoutSender(_GLOwner):
        def __init__(self) -> None:
            super().__init__()
            self.name = ""

        def setSenderName(self, name: str) -> None:
            world.calls.append(("setSenderName", name))
            self.name = name

        def sendImage(
            self, buffer: Any, width: int, height: int, gl_format: int, invert: bool, host_fbo: int
        ) -> bool:
            self._on_context_thread("sendImage")
            view = _check_buffer(buffer, width, height, gl_format)
            bpp = _bytes_per_pixel(gl_format)
            raw = np.frombuffer(view, np.uint8)[: width * height * bpp].reshape(height, width, bpp)
            rgba = _from_gl(raw, gl_format)
            world.calls.append(("sendImage", (width, height, gl_format, invert, host_fbo)))
            entry = world.senders.setdefault(self.name, {"frame": 0})
            entry.update(rgba=rgba[::-1].copy() if invert else rgba.copy(), size=(width, height))
            entry["frame"] += 1
            return True

        def releaseSender(self) -> None:
            self._on_context_thread("releaseSender")
            world.calls.append(("releaseSender", self.name))
            world.senders.pop(self.name, None)

    class SpoutReceiver(_GLOwner):
        def __init__(self) -> None:
            super().__init__()
            self.name = ""
            self.connected: str | None = None
            self.size = (0, 0)
            self.updated = False  # Spout's m_bUpdated
            self.frame_count = 0  # m_FrameCount: updated only while counting
            self.last_count = 0  # m_LastFrameCount
            self.new = True  # m_bIsNewFrame, "Default true for apps without frame count"

        def setReceiverName(self, name: str) -> None:
            world.calls.append(("setReceiverName", name))
            self.name = name

        def _sender(self) -> dict[str, Any] | None:
            name = self.name or next(iter(world.senders), "")
            return world.senders.get(name)

        def receiveImage(self, buffer: Any, gl_format: int, invert: bool, host_fbo: int) -> bool:
            self._on_context_thread("receiveImage")
            _bytes_per_pixel(gl_format)
            if buffer is not None and self.connected is not None:
                _check_buffer(buffer, *self.size, gl_format)  # PySpoutGL.cpp checks before the call
            if self.updated:
                return True  # until the application calls isUpdated()
            sender = self._sender()
            if sender is None or "rgba" not in sender:
                self.connected = None
                return False
            if self.connected is None or sender["size"] != self.size:
                self.connected = self.name or "active"
                self.size = sender["size"]
                self.updated = True
                return True
            if buffer is None or memoryview(buffer).nbytes == 0:
                return False
            self.new = True
            if world.frame_count:
                self.frame_count = sender["frame"]
                if self.frame_count == self.last_count:
                    self.new = False
                    return True  # "No new frame, do not block": nothing copied
                self.last_count = self.frame_count
            width, height = self.size
            view = _check_buffer(buffer, width, height, gl_format)
            pixels = _to_gl(sender["rgba"][::-1] if invert else sender["rgba"], gl_format)
            np.frombuffer(view, np.uint8)[: pixels.size] = pixels.reshape(-1)
            world.readbacks += 1
            return True

        def isUpdated(self) -> bool:
            updated, self.updated = self.updated, False
            return updated

        def isConnected(self) -> bool:
            return self.connected is not None

        def isFrameNew(self) -> bool:
            return self.new

        def isFrameCountEnabled(self) -> bool:
            return world.frame_count

        def getSenderFrame(self) -> int:
            return self.frame_count

        def getSenderWidth(self) -> int:
            return self.size[0]

        def getSenderHeight(self) -> int:
            return self.size[1]

        def releaseReceiver(self) -> None:
            self._on_context_thread("releaseReceiver")
            world.calls.append(("releaseReceiver", self.name))

    SpoutSender.world = world
    SpoutReceiver.world = world
    module = types.ModuleType("SpoutGL")
    module.SpoutSender = SpoutSender  # type: ignore[attr-defined]
    module.SpoutReceiver = SpoutReceiver  # type: ignore[attr-defined]
    enums = types.ModuleType("SpoutGL.enums")
    enums.GL_RGBA, enums.GL_BGRA_EXT, enums.GL_RGB, enums.GL_BGR_EXT = (
        GL_RGBA,
        GL_BGRA_EXT,
        GL_RGB,
        GL_BGR_EXT,
    )  # type: ignore[attr-defined]
    module.enums = enums  # type: ignore[attr-defined]
    return module


def _install(monkeypatch: pytest.MonkeyPatch, modules: dict[str, types.ModuleType], platform: str) -> None:
    """Put `modules` where `import` finds them and make the bridge believe it runs on `platform`."""
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr("bridge.transports.base.current_platform", lambda: platform)


def install_spoutgl(monkeypatch: pytest.MonkeyPatch, platform: str = "win32") -> SpoutWorld:
    world = SpoutWorld()
    _install(monkeypatch, {"SpoutGL": make_spoutgl(world)}, platform)
    return world


# ----------------------------------------------------------------------------------------- Syphon

MTL_RGBA8, MTL_BGRA8 = 70, 80


class FakeTexture:
    def __init__(self, width: int, height: int, pixel_format: int = MTL_RGBA8) -> None:
        self._w, self._h, self._fmt = width, height, pixel_format
        self.data = np.zeros((height, width, 4), np.uint8)

    def width(self) -> int:
        return self._w

    def height(self) -> int:
        return self._h

    def pixelFormat(self) -> int:
        return self._fmt


@dataclass
class SyphonWorld:
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    published: list[tuple[str, tuple[int, int], bool]] = field(default_factory=list)
    clients: int = 0
    uuids: Any = field(default_factory=lambda: itertools.count(1))
    quit_before_image: str | None = None  # this server quits between has_new_frame and new_frame_image


def make_syphon(world: SyphonWorld) -> dict[str, types.ModuleType]:
    @dataclass
    class SyphonServerDescription:
        uuid: str
        name: str
        app_name: str
        icon: Any
        raw: Any

    class SyphonMetalServer:
        def __init__(self, name: str, device: Any = None, command_queue: Any = None) -> None:
            self.name = name
            self.device = device or object()
            self.uuid = str(next(world.uuids))
            world.servers[name] = {"uuid": self.uuid, "app": "python", "texture": None, "frame": 0}

        def publish_frame_texture(
            self, texture: FakeTexture, region: Any = None, size: Any = None, is_flipped: bool = False
        ) -> None:
            if not isinstance(texture, FakeTexture):
                raise TypeError("publish_frame_texture needs an MTLTexture")
            entry = world.servers[self.name]
            frame = FakeTexture(texture.width(), texture.height(), MTL_BGRA8)  # servers share BGRA
            rgba = texture.data[::-1] if is_flipped else texture.data
            frame.data = np.ascontiguousarray(rgba[..., [2, 1, 0, 3]])
            entry["texture"], entry["frame"] = frame, entry["frame"] + 1
            world.published.append((self.name, (texture.width(), texture.height()), is_flipped))

        def stop(self) -> None:
            world.servers.pop(self.name, None)

    class SyphonServerDirectory:
        def __init__(self) -> None:
            self.run_loop_interval = 1.0

        @property
        def servers(self) -> list[SyphonServerDescription]:
            return [
                SyphonServerDescription(e["uuid"], name, e["app"], None, e)
                for name, e in world.servers.items()
            ]

    class SyphonMetalClient:
        def __init__(self, description: SyphonServerDescription, device: Any = None) -> None:
            if not isinstance(description, SyphonServerDescription):
                raise TypeError("SyphonMetalClient needs a SyphonServerDescription")
            self.description = description
            self.seen = 0
            world.clients += 1

        def _entry(self) -> dict[str, Any] | None:
            entry = world.servers.get(self.description.name)
            return entry if entry is not None and entry["uuid"] == self.description.uuid else None

        @property
        def is_valid(self) -> bool:
            return self._entry() is not None

        @property
        def has_new_frame(self) -> bool:
            entry = self._entry()
            return entry is not None and entry["texture"] is not None and entry["frame"] != self.seen

        @property
        def new_frame_image(self) -> FakeTexture | None:
            """None when there is no surface to wrap: the server is gone or never published
            (Syphon-Framework SyphonMetalClient.m -newFrameImage returns nil when newSurface is
            nil; syphon-python's property passes that on, syphon/client.py:119-126)."""
            if world.quit_before_image is not None:
                world.servers.pop(world.quit_before_image, None)  # the server quits in between
                world.quit_before_image = None
            entry = self._entry()
            if entry is None or entry["texture"] is None:
                return None
            self.seen = entry["frame"]
            texture: FakeTexture = entry["texture"]
            return texture

        def stop(self) -> None:
            world.clients -= 1

    def create_mtl_texture(
        device: Any, width: int, height: int, pixel_format: int = MTL_RGBA8
    ) -> FakeTexture:
        return FakeTexture(width, height, pixel_format)

    def copy_image_to_mtl_texture(image: np.ndarray, texture: FakeTexture) -> None:
        assert len(image.shape) == 3 and image.shape[2] == 4, "Image has to be of shape (m, n, 4)"
        if image.shape[:2] != (texture.height(), texture.width()):
            raise ValueError("image and texture sizes differ")  # replaceRegion would read past it
        texture.data = np.array(image, copy=True)

    def copy_mtl_texture_to_image(texture: FakeTexture) -> np.ndarray:
        return np.frombuffer(texture.data.tobytes(), np.uint8).reshape(texture.height(), texture.width(), 4)

    syphon = types.ModuleType("syphon")
    syphon.SyphonMetalServer = SyphonMetalServer  # type: ignore[attr-defined]
    syphon.SyphonMetalClient = SyphonMetalClient  # type: ignore[attr-defined]
    syphon.SyphonServerDirectory = SyphonServerDirectory  # type: ignore[attr-defined]
    utils = types.ModuleType("syphon.utils")
    np_utils = types.ModuleType("syphon.utils.numpy")
    np_utils.copy_image_to_mtl_texture = copy_image_to_mtl_texture  # type: ignore[attr-defined]
    np_utils.copy_mtl_texture_to_image = copy_mtl_texture_to_image  # type: ignore[attr-defined]
    raw = types.ModuleType("syphon.utils.raw")
    raw.create_mtl_texture = create_mtl_texture  # type: ignore[attr-defined]
    syphon.utils = utils  # type: ignore[attr-defined]
    utils.numpy, utils.raw = np_utils, raw  # type: ignore[attr-defined]
    return {"syphon": syphon, "syphon.utils": utils, "syphon.utils.numpy": np_utils, "syphon.utils.raw": raw}


def install_syphon(monkeypatch: pytest.MonkeyPatch, platform: str = "darwin") -> SyphonWorld:
    world = SyphonWorld()
    _install(monkeypatch, make_syphon(world), platform)
    return world


# ------------------------------------------------------------------------------------ pyvirtualcam


# Each backend's words when it finds no device, from its native virtual_output.h
NO_DEVICE = {
    "obs@win32": "OBS Virtual Camera device not found! Did you install OBS?",  # native_windows_obs:44
    "unitycapture": "No camera registered. Did you install any camera?",  # native_windows_unity_capture:89
    "obs@darwin": "OBS Virtual Camera is not installed in your system. Use the Virtual Camera function in "
    "OBS 30.0 or later to trigger the installation and activate the System Extension in System Settings. "
    "You may need to restart your machine after that. [Device not found]",  # native_macos_obs_cmioextension:146
    "v4l2loopback": "No v4l2 loopback device found at /dev/video[0-99]. Did you run 'modprobe "
    "v4l2loopback'? See also pyvirtualcam's documentation.",  # native_linux_v4l2loopback:157
}
REGISTERED = {"win32": ("obs", "unitycapture"), "darwin": ("obs",), "linux": ("v4l2loopback",)}
FIXED_DEVICE = {"obs": "OBS Virtual Camera", "unitycapture": "Unity Video Capture"}


@dataclass
class CamWorld:
    platform: str = "linux"
    devices: list[str] = field(default_factory=lambda: ["/dev/video7"])  # v4l2loopback devices present
    drivers: set[str] = field(default_factory=lambda: {"obs", "unitycapture", "v4l2loopback"})  # installed
    opened: list[dict[str, Any]] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    sleeps: int = 0
    closed: int = 0


def make_pyvirtualcam(world: CamWorld) -> types.ModuleType:
    class PixelFormat(enum.Enum):  # camera.py:123-152, values as they are
        RGB = "raw "
        BGR = "24BG"
        RGBA = "ABGR"
        GRAY = "J400"
        I420 = "I420"
        NV12 = "NV12"
        YUYV = "YUY2"
        UYVY = "UYVY"

    shapes = {"RGB": 3, "BGR": 3, "RGBA": 4}

    def open_backend(name: str, fmt: PixelFormat, device: str | None) -> str:
        """What the native backend does in its constructor: the device it opened, or raise."""
        if fmt is PixelFormat.RGBA:
            raise RuntimeError("Unsupported image format.")
        if name == "v4l2loopback":
            if device is not None:
                if device not in world.devices:
                    raise ValueError(f"Device {device} does not exist.")
                return device
            if not world.devices or name not in world.drivers:
                raise RuntimeError(NO_DEVICE["v4l2loopback"])
            return world.devices[0]
        if name not in world.drivers:
            raise RuntimeError(NO_DEVICE.get(f"{name}@{world.platform}", NO_DEVICE.get(name, "")))
        if device is not None and device != FIXED_DEVICE[name]:
            raise ValueError(f"This backend supports only the '{FIXED_DEVICE[name]}' device.")
        return FIXED_DEVICE[name]

    class Camera:
        def __init__(
            self,
            width: int,
            height: int,
            fps: float,
            *,
            fmt: PixelFormat = PixelFormat.RGB,
            device: str | None = None,
            backend: str | None = None,
            print_fps: bool = False,
        ) -> None:
            registered = REGISTERED.get(world.platform, ())
            if backend:
                if backend not in registered:
                    raise KeyError(backend)  # BACKENDS[backend]
                names: tuple[str, ...] = (backend,)
            else:
                names = registered
            errors = []
            for name in names:
                try:
                    fmt.value  # noqa: B018 - encode_fourcc(fmt.value): anything but the enum fails here
                    self.device = open_backend(name, fmt, device)
                except Exception as exc:  # as camera.py:218 does
                    errors.append(f"'{name}' backend: {exc}")
                else:
                    self.backend = name
                    break
            else:
                raise RuntimeError("\n".join(errors))
            self.width, self.height, self.fps, self.fmt = width, height, fps, fmt
            world.opened.append(
                {
                    "width": width,
                    "height": height,
                    "fps": fps,
                    "fmt": fmt.name,
                    "device": device,
                    "backend": backend,
                }
            )

        def send(self, frame: np.ndarray) -> None:
            if frame.dtype != np.uint8:
                raise TypeError(f"unexpected frame dtype: {frame.dtype} != uint8")
            expected = (self.height, self.width, shapes[self.fmt.name])
            if frame.shape != expected:
                raise ValueError(f"unexpected frame shape: {frame.shape} != {expected}")
            world.frames.append(np.array(frame, copy=True))

        def sleep_until_next_frame(self) -> None:
            world.sleeps += 1

        def close(self) -> None:
            world.closed += 1

    module = types.ModuleType("pyvirtualcam")
    module.Camera = Camera  # type: ignore[attr-defined]
    module.PixelFormat = PixelFormat  # type: ignore[attr-defined]
    return module


def install_pyvirtualcam(monkeypatch: pytest.MonkeyPatch, platform: str = "linux") -> CamWorld:
    world = CamWorld(platform=platform)
    _install(monkeypatch, {"pyvirtualcam": make_pyvirtualcam(world)}, platform)
    return world
