"""The fixed noise of a stream, drawn from a seed or a blend of seeds.

Drawn as the original StreamDiffusion draws it (a CPU generator seeded with the seed, then moved
to the device), so the same seed gives the same frames. A blend mixes the seeds' noises with
weights normalised to keep unit variance; the heaviest seed's generator continues afterwards
(the KL VAE's sampling noise and txt2img latents come from it, as in the original).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bridge.engine.checks import SeedPairs

NOISE_CACHE_SIZE = 16  # blended seeds' noises kept (a fader over a seed blend reuses them)


class SeedNoise:
    """Draws (n*f, 4, H/8, W/8) noise for a checked seed spec; caches the other seeds of a blend."""

    def __init__(self) -> None:
        self._cache: dict[int, Tensor] = {}

    def draw(self, seeds: SeedPairs, shape: tuple[int, ...]) -> tuple[Tensor, torch.Generator]:
        """The noise for `seeds` (heaviest first) on the CPU, and the generator that drew the
        first seed's noise, to continue from."""
        gen = torch.Generator().manual_seed(seeds[0][0])
        first = torch.randn(shape, generator=gen)
        if len(seeds) == 1:
            return first, gen
        parts = [first] + [self._seed(s, shape) for s, _ in seeds[1:]]
        total = math.sqrt(sum(w * w for _, w in seeds))
        noise = sum((p * (w / total) for p, (_, w) in zip(parts, seeds, strict=True)), torch.zeros(shape))
        return noise, gen

    def _seed(self, seed: int, shape: tuple[int, ...]) -> Tensor:
        cached = self._cache.get(seed)
        if cached is None or tuple(cached.shape) != shape:
            cached = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            if len(self._cache) >= NOISE_CACHE_SIZE:
                self._cache.clear()
            self._cache[seed] = cached
        return cached
