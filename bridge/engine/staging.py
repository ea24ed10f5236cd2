"""Fixed buffers for a frame's way in (pixels) and out (the uint8 frame on the host).

Allocated once per layout, then only written in place, so a frame allocates nothing and a
captured graph can keep their addresses. Host buffers are pinned where CUDA exists (so the
copies can run asynchronously); on a CPU-only machine they are plain memory.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor


def _host(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


class HostToDevice:
    """A host buffer (pinned on CUDA) and its device twin, for values made on the host each frame
    (input bytes, CPU-generator noise). `host()` waits until the last copy has left the buffer
    (the copies are asynchronous), `send()` starts the next one. On the CPU both are one tensor."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self._host = _host(shape, dtype, device)
        self.device = self._host if device.type == "cpu" else torch.empty_like(self._host, device=device)
        self._on = device
        self._sent = torch.cuda.Event() if device.type == "cuda" else None  # type: ignore[no-untyped-call]

    def host(self) -> Tensor:
        if self._sent is not None:
            self._sent.synchronize()
        return self._host

    def send(self) -> Tensor:
        if self._sent is not None:
            self.device.copy_(self._host, non_blocking=True)  # on the device's current stream
            self._sent.record(torch.cuda.current_stream(self._on))
        return self.device


class InputStaging:
    """The pixels of one input kind at model size, from the caller's frame to the encoder's input.

    `kind` "uint8": (f, H, W, C) bytes; the fp32 and model-dtype pixels keep the channels-last
    strides of the permuted bytes, as diffusers' own path (numpy -> permuted tensor) has them,
    so the VAE sees the same layout as in the original. `kind` "float": (f, 3, H, W) NCHW.
    """

    def __init__(
        self,
        kind: str,
        *,
        f: int,
        height: int,
        width: int,
        channels: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.kind = kind
        self.channels = channels if kind == "uint8" else 3
        if kind == "uint8":
            self.bytes_in = HostToDevice((f, height, width, channels), torch.uint8, device)
            self.bytes = self.bytes_in.device
            self.bytes_nchw = self.bytes[..., :3].permute(0, 3, 1, 2)  # (f, 3, H, W) view
            base32 = torch.empty((f, height, width, 3), dtype=torch.float32, device=device)
            self.pix32 = base32.permute(0, 3, 1, 2)
            self.pixels = torch.empty((f, height, width, 3), dtype=dtype, device=device).permute(0, 3, 1, 2)
        else:
            base32 = torch.empty((f, 3, height, width), dtype=torch.float32, device=device)
            self.pix32 = base32
            self.pixels = torch.empty((f, 3, height, width), dtype=dtype, device=device)
        self.flat32 = base32.view(-1)  # every value once, for the similarity filter

    def load_bytes(self, frames: np.ndarray) -> None:
        """(f, H, W, C) uint8 -> pix32 in [0, 1]: one host copy, one H2D copy, x / 255 in fp32."""
        if any(stride < 0 for stride in frames.strides):  # a flipped view: torch takes none
            frames = np.ascontiguousarray(frames)
        with warnings.catch_warnings():  # read-only frames are only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            src = torch.from_numpy(frames)
        self.bytes_in.host().copy_(src)
        self.bytes_in.send()
        torch.div(self.bytes_nchw, 255.0, out=self.pix32)

    def normalise(self) -> Tensor:
        """pix32 [0, 1] -> pixels [-1, 1]: in fp32, then one cast (as VaeImageProcessor + .to())."""
        self.pix32.mul_(2.0).sub_(1.0)
        return self.pixels.copy_(self.pix32)


class OutputRing:
    """`depth` host slots for the finished (f, H, W, 4) uint8 frame, used in turn.

    Contract: the array returned for a frame stays untouched until `depth - 1` more frames have
    been converted; then its slot is written again. A consumer that may hold a frame longer
    (a sink thread, a mailbox, a "held" output) must copy it. A skipped frame returns the same
    array again without advancing the ring.
    """

    def __init__(self, *, depth: int, f: int, height: int, width: int, device: torch.device) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
            raise ValueError(f"output ring depth must be an int >= 2, got {depth!r}")
        shape = (f, height, width, 4)
        self.device_rgba = torch.empty(shape, dtype=torch.uint8, device=device)
        self.device_rgba[..., 3] = 255  # opaque, written once
        self.device_rgb = self.device_rgba[..., :3]  # (f, H, W, 3) view
        self.slots = [_host(shape, torch.uint8, device) for _ in range(depth)]
        arrays = [slot.numpy() for slot in self.slots]
        self.arrays: list[np.ndarray] = [a[0] if f == 1 else a for a in arrays]
        self.index = -1

    def publish(self) -> np.ndarray:
        """Copy `device_rgba` into the next slot (the frame's one device-to-host copy)."""
        self.index = (self.index + 1) % len(self.slots)
        self.slots[self.index].copy_(self.device_rgba)
        return self.arrays[self.index]

    def current(self) -> np.ndarray:
        return self.arrays[self.index]


class InputStages:
    """One `InputStaging` per input kind a stream has seen, made on first use: `stage` checks a
    caller's frame and loads it as fp32 pixels in [0, 1] at model size."""

    def __init__(self, *, f: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> None:
        self.f, self.height, self.width = f, height, width
        self.device, self.dtype = device, dtype
        self.by_kind: dict[tuple[str, int], InputStaging] = {}

    def stage(self, image: Tensor | np.ndarray) -> InputStaging:
        """Check `image` ((f, 3, H, W) float in [0, 1], or uint8 (H, W, 3|4) / (f, H, W, 3|4))
        and load it into its kind's buffers. A frame of another size is resized (bilinear) on
        the way: that is not the static path."""
        f = self.f
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] not in (3, 4):
                raise ValueError(
                    f"image array must be uint8 (H, W, 3|4) or (f, H, W, 3|4), got {image.dtype} {image.shape}"
                )
            batch = image[None] if image.ndim == 3 else image
            count, size, kind, channels = batch.shape[0], batch.shape[1:3], "uint8", batch.shape[-1]
        elif isinstance(image, Tensor):
            if image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point():
                raise ValueError(
                    f"image tensor must be float (f, 3, H, W) in [0, 1], got {image.dtype} {tuple(image.shape)}"
                )
            count, size, kind, channels = image.shape[0], tuple(image.shape[-2:]), "float", 3
        else:
            raise TypeError(
                f"image must be a torch.Tensor, a numpy uint8 array or None, got {type(image).__name__}"
            )
        if count != f:
            raise ValueError(f"image batch must hold frame_buffer_size={f} frames, got {count}")
        staging = self.by_kind.get((kind, channels))
        if staging is None:
            staging = InputStaging(
                kind,
                f=f,
                height=self.height,
                width=self.width,
                channels=channels,
                device=self.device,
                dtype=self.dtype,
            )
            self.by_kind[(kind, channels)] = staging
        if tuple(size) != (self.height, self.width):  # not the static path: resize, then stage
            if isinstance(image, np.ndarray):
                pixels = torch.from_numpy(np.ascontiguousarray(batch[..., :3])).to(self.device)
                pixels = pixels.permute(0, 3, 1, 2).float() / 255.0
            else:
                pixels = image.to(device=self.device, dtype=torch.float32)
            pixels = torch.nn.functional.interpolate(
                pixels, size=(self.height, self.width), mode="bilinear", align_corners=False
            )
            staging.pix32.copy_(pixels)
        elif isinstance(image, np.ndarray):
            staging.load_bytes(batch)
        else:
            staging.pix32.copy_(image)
        return staging
