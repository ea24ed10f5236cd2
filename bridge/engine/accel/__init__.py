"""Model acceleration, chosen in the config (`engine.acceleration`), applied once after loading."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

ACCELERATIONS = ("none", "compile")


def accelerate(pipe: Any, mode: str) -> None:
    """Apply `mode` to `pipe` in place.

    `compile`: torch.compile on the UNet and the VAE decoder. The first frames after start
    compile (seconds to minutes; the bridge reports the state "warming" meanwhile). It needs a
    working C/C++ compiler on the CPU and Triton on CUDA; a failure raises here, at start, with
    torch's reason, and never falls back silently.
    """
    if mode == "none":
        return
    if mode != "compile":
        raise ValueError(f"acceleration must be one of {', '.join(ACCELERATIONS)}, got {mode!r}")
    log.info("compiling the UNet and the VAE decoder with torch.compile")
    pipe.unet.forward = torch.compile(pipe.unet.forward, dynamic=False)
    pipe.vae.decoder.forward = torch.compile(pipe.vae.decoder.forward, dynamic=False)
