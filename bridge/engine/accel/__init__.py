"""Model acceleration: the seam between `StreamEngine` and its backends.

The spelling (`engine.acceleration`, parsed by `Acceleration`) is in bridge/acceleration.py.
Network-level backends change which `Networks` a frame calls: `compile` (accel/compile.py) and
TensorRT engines (accel/engine_networks.py over prepare.py, backend.py, tensorrt.py,
onnxruntime_backend.py, onnx_export.py, engine_cache.py, streams.py, isolated.py).
The frame-level one, `cuda_graph` (accel/graphs.py), changes how the frame runs.
`StreamEngine` asks this package for both and knows nothing of the backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bridge.acceleration import ACCELERATIONS, Acceleration
from bridge.engine.accel.networks import Networks

__all__ = ["ACCELERATIONS", "Acceleration", "Networks", "accelerated_networks"]


def accelerated_networks(
    pipe: Any,
    acceleration: Acceleration,
    *,
    networks: Networks | None = None,
    compile_mode: str,
    cache_dir: Path | None,
    width: int,
    height: int,
    cfg_type: str,
    step_counts: Sequence[int],
    frame_buffer_size: int,
) -> Networks:
    """The networks a frame calls under `acceleration` (`networks` when given, for tests and the
    benchmark; else chosen here): the pipe's own modules, compiled ones
    (`compile`, inductor's caches under `cache_dir` when given) or TensorRT engines (`tensorrt`,
    built or loaded under `cache_dir`, the default model cache when None, for `step_counts`).
    Its tuning parts act here too: `cudnn_benchmark` turns cuDNN's process-wide autotuner on, and
    `channels_last` converts the pipe's UNet and VAE in place (every engine on this pipe then runs
    channels-last weights: the same results up to kernel choice)."""
    if acceleration.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # process-wide, as cuDNN's own switch is
    if acceleration.channels_last:
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.channels_last)
    if networks is not None:
        nets = networks
    elif acceleration.compile:
        from bridge.engine.accel.compile import compiled_networks

        nets = compiled_networks(pipe, mode=compile_mode, cache_dir=cache_dir)
    elif acceleration.tensorrt:
        from bridge.engine.accel.engine_networks import engine_networks
        from bridge.engine.loading import DEFAULT_CACHE_DIR

        nets = engine_networks(
            pipe,
            model=str(getattr(pipe, "name_or_path", "") or type(pipe).__name__),
            width=width,
            height=height,
            cfg_type=cfg_type,
            step_counts=step_counts,
            frame_buffer_size=frame_buffer_size,
            cache_dir=cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR,
        )
    else:
        nets = Networks(pipe)
    if acceleration.channels_last:
        nets.name += " (channels_last)"
    return nets
