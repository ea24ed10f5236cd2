"""Built engines (TensorRT, or onnxruntime on the CPU) behind the `Networks` seam.

`engine_networks` exports, builds or loads, and validates an engine per component for the row
counts the config can reach (`prepare_engines`), then hands `StreamEngine` an `EngineNetworks`:
each ready component runs its engine through static buffers of its own, bound once per row
count, so a captured frame graph holds the engine call (`execute_async_v3` on torch's stream,
or on a private stream joined back to it where that is the default stream: accel/streams.py).
A component that failed, or a row count without a profile (a live step-count change beyond the
config's), runs on the exact torch path, and `fallbacks` says why: the runtime puts that in the
log, the status and (from the negative cache) `doctor`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bridge.engine.accel.backend import Backend
from bridge.engine.accel.engine_cache import DeviceInfo
from bridge.engine.accel.networks import Networks
from bridge.engine.accel.onnx_export import (
    Component,
    reachable_unet_rows_for_steps,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)
from bridge.engine.accel.prepare import EngineReport, Prepared, prepare_engines

log = logging.getLogger(__name__)

ENGINE_CACHE = "engines"  # under the model cache

DeviceGuard = Callable[[torch.device], AbstractContextManager[Any]]


def on_device(device: torch.device) -> AbstractContextManager[Any]:
    """Make `device` the thread's current CUDA device meanwhile (nothing for the CPU). TensorRT
    works on the current device, where torch's own ops follow their tensors: an engine on cuda:1
    called from a thread whose current device is cuda:0 must be switched to it."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class EngineNetworks(Networks):
    """`Networks` whose ready components run as built engines; the rest stay torch.
    `device_guard` makes the engine's device current around each engine call (a test seam)."""

    def __init__(
        self, pipe: Any, report: EngineReport, *, name: str, device_guard: DeviceGuard = on_device
    ) -> None:
        super().__init__(pipe, name=name)
        self.report = report
        self._device_guard = device_guard
        self.fallbacks: dict[str, str] = {c.value: reason for c, reason in report.fallbacks.items()}
        self._slots: dict[tuple[Component, int], tuple[list[Tensor], Tensor]] = {}
        # The `fallbacks` key of the row count each component runs at now without a profile.
        self._unprofiled: dict[Component, str] = {}
        self._dtypes = {
            Component.UNET: pipe.unet.dtype,
            Component.VAE_ENCODER: pipe.vae.dtype,
            Component.VAE_DECODER: pipe.vae.dtype,
        }

    def _ready(self, component: Component, rows: int) -> Prepared | None:
        """The component's engine for `rows`, or None (torch runs it). A row count without a
        profile is in `fallbacks` while the show runs at it, and leaves when it is back on a
        built one: the status says what is true now."""
        prepared = self.report.ready.get(component)
        if prepared is None:
            return None
        unprofiled = self._unprofiled.get(component)
        if rows in prepared.spec.rows:
            if unprofiled is not None:
                del self.fallbacks[unprofiled], self._unprofiled[component]
                log.info("the %s runs its engine again (%d rows)", component.value, rows)
            return prepared
        key = f"{component.value} at {rows} rows"
        if unprofiled != key:
            if unprofiled is not None:
                del self.fallbacks[unprofiled]
            self._unprofiled[component] = key
            self.fallbacks[key] = (
                f"no engine profile for {rows} rows (built for {list(prepared.spec.rows)}): "
                f"the {component.value} runs in torch at this step count"
            )
            log.warning("%s", self.fallbacks[key])
        return None

    def _run(self, prepared: Prepared, named: dict[str, Tensor]) -> Tensor:
        """Copy the call's tensors into the static inputs (casting the UNet's int timesteps to
        the engine's float32), run, and return the static output (valid until the next call).
        Binds and runs with the engine's device current (`device_guard`)."""
        spec = prepared.spec
        first = next(iter(named.values()))
        rows, device = first.shape[0], first.device
        with self._device_guard(device):
            slot = self._slots.get((spec.component, rows))
            if slot is None:  # once per row count, before any capture (warm-up runs eagerly first)
                dtype = self._dtypes[spec.component]
                inputs = [
                    torch.empty(s.concrete(rows), dtype=s.resolved_dtype(dtype), device=device)
                    for s in spec.inputs
                ]
                out_spec = spec.outputs[0]
                out_dtype = out_spec.resolved_dtype(dtype)
                output = torch.empty(out_spec.concrete(rows), dtype=out_dtype, device=device)
                prepared.runner.bind(rows, inputs, [output])
                slot = self._slots[(spec.component, rows)] = (inputs, output)
            inputs, output = slot
            for tspec, buffer in zip(spec.inputs, inputs, strict=True):
                buffer.copy_(named[tspec.name])
            prepared.runner.run(rows)
        return output

    def unet(self, x: Tensor, timesteps: Tensor, embeds: Tensor, added: dict[str, Tensor] | None) -> Tensor:
        prepared = self._ready(Component.UNET, x.shape[0])
        if prepared is None:
            return super().unet(x, timesteps, embeds, added)
        named = {"sample": x, "timestep": timesteps, "encoder_hidden_states": embeds, **(added or {})}
        return self._run(prepared, named)

    def encode(self, pixels: Tensor) -> Tensor:
        prepared = self._ready(Component.VAE_ENCODER, pixels.shape[0])
        return super().encode(pixels) if prepared is None else self._run(prepared, {"pixels": pixels})

    def decode(self, latents: Tensor) -> Tensor:
        prepared = self._ready(Component.VAE_DECODER, latents.shape[0])
        return super().decode(latents) if prepared is None else self._run(prepared, {"latents": latents})


def engine_networks(
    pipe: Any,
    *,
    model: str,
    width: int,
    height: int,
    cfg_type: str,
    step_counts: Sequence[int],
    frame_buffer_size: int,
    cache_dir: Path,
    backend: Backend | None = None,
    device: DeviceInfo | None = None,
    cancel: threading.Event | None = None,
    bars: bool = True,
) -> EngineNetworks:
    """Engines for the UNet (every row count `step_counts` can reach with `cfg_type`), the VAE
    encoder and decoder (f rows), built or loaded from `<cache_dir>/engines`. `backend` defaults
    to TensorRT, building in a child process (accel/isolated.py); where TensorRT is missing,
    every component falls back with the reason. Never raises for a failed component (only for a
    stop request, `cancel` set: BuildCancelled)."""
    name = getattr(backend, "name", "tensorrt")
    on = pipe.unet.device  # the engine's device (cuda:N), not the thread's current one
    if backend is None or device is None:
        try:
            from bridge.engine.accel.isolated import ChildProcessBuilds, tensorrt_backend
            from bridge.engine.accel.streams import TorchStreams
            from bridge.engine.accel.tensorrt import TensorRTBackend

            if backend is None:
                # Loads run here (on torch's stream of the engine's device); builds run in a
                # child process, so that a crash in the builder cannot end the bridge.
                backend = ChildProcessBuilds(
                    TensorRTBackend(streams=TorchStreams(on)),
                    tensorrt_backend,
                    device_index=on.index,
                )
            if device is None:
                with torch.cuda.device(on):  # plans are keyed by the GPU they run on
                    device = DeviceInfo.current()
        except Exception as exc:  # TensorRT missing or broken, or no GPU: the exact path, said plainly
            reason = f"{type(exc).__name__}: {exc}"[:600]
            log.warning("TensorRT unavailable, running every component on the exact torch path: %s", reason)
            report = EngineReport(fallbacks=dict.fromkeys(Component, reason))
            return EngineNetworks(pipe, report, name="torch (tensorrt unavailable)")
        name = backend.name
    f = frame_buffer_size
    rows = reachable_unet_rows_for_steps(cfg_type, step_counts, f)
    specs = [
        unet_spec(pipe.unet, width=width, height=height, rows=rows),
        vae_encoder_spec(pipe.vae, width=width, height=height, rows=(f,)),
        vae_decoder_spec(pipe.vae, width=width, height=height, rows=(f,)),
    ]
    # TensorRT loads (and combines timing caches) on the thread's current CUDA device: make it
    # the engine's (cuda:N), or the engines would land on cuda:0.
    with on_device(on):
        report = prepare_engines(
            pipe,
            specs,
            model=model,
            cache_root=Path(cache_dir).expanduser() / ENGINE_CACHE,
            backend=backend,
            device=device,
            cancel=cancel,
            bars=bars,
        )
    return EngineNetworks(pipe, report, name=name)
