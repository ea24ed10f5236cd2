"""The stochastic similarity filter: skip frames that barely differ from the last processed one.

A frame is compared with the last *processed* input by cosine similarity s over all its values.
It is skipped with probability max(0, (s - eta) / (1 - eta)), and never more than `max_skip`
times in a row (the original allowed max_skip + 1). The first frame, and the first after the
filter is switched on or the frame size changes, always passes. The filter never sleeps: a
skipped frame simply costs nothing, and pacing is the runtime's job.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

_EPS = 1e-8  # the norm floor of torch.nn.functional.cosine_similarity


class SimilarityFilter:
    """Decides per frame whether to skip it. Not thread-safe: the engine loop owns it.

    Reading the similarity is one scalar copy to the host (a device sync when the frame lives
    on a GPU); the decision must be known on the host to avoid launching the UNet at all.
    """

    def __init__(
        self, *, enabled: bool = False, threshold: float = 0.98, max_skip: int = 10, seed: int | None = None
    ) -> None:
        self._rng = random.Random(seed)
        self._reference: Tensor | None = None  # a copy of the last processed frame, flat fp32
        self._has_reference = False
        self._dot = self._norm = self._ref_norm = torch.zeros(())
        self._in_a_row = 0
        self.enabled = False
        self.threshold = 0.98
        self.max_skip = 10
        self.last_similarity: float | None = None
        self.last_probability = 0.0
        self.configure(enabled=enabled, threshold=threshold, max_skip=max_skip)

    def configure(
        self, *, enabled: bool | None = None, threshold: float | None = None, max_skip: int | None = None
    ) -> None:
        """Change any of the settings; the others stay. Takes effect on the next frame."""
        if threshold is not None:
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"similarity threshold must be within [0, 1], got {threshold!r}")
            self.threshold = float(threshold)
        if max_skip is not None:
            if isinstance(max_skip, bool) or not isinstance(max_skip, int) or max_skip < 0:
                raise ValueError(f"max_skip must be an int >= 0, got {max_skip!r}")
            self.max_skip = max_skip
        if enabled is not None:
            if enabled and not self.enabled:
                self.reset()  # the first frame after switching on always passes
            self.enabled = bool(enabled)

    def seed(self, seed: int | None) -> None:
        """Reseed the skip decisions (for reproducible tests)."""
        self._rng.seed(seed)

    def reset(self) -> None:
        """Forget the reference frame; the next frame passes (its buffer is kept)."""
        self._has_reference = False
        self._in_a_row = 0

    def skip_probability(self, similarity: float) -> float:
        """max(0, (s - eta) / (1 - eta)); 0 when eta >= 1 (the filter then never skips)."""
        if self.threshold >= 1.0:
            return 0.0
        return max(0.0, (similarity - self.threshold) / (1.0 - self.threshold))

    def should_skip(self, frame: Tensor) -> bool:
        """Whether to skip `frame` (any shape). When it passes, a copy becomes the new reference
        (the caller may reuse its buffer for the next frame).

        Allocation-free once the reference exists: cosine = <a, r> / (|a| |r|), each norm
        clamped at 1e-8 as `torch.nn.functional.cosine_similarity` does, in fp32 buffers; one
        `.item()` reads the score."""
        if not self.enabled:
            return False
        flat = frame.reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.float()
        ref = self._reference
        if ref is not None and self._has_reference and ref.shape == flat.shape and ref.device == flat.device:
            dot, norm = self._dot, self._norm
            torch.dot(flat, ref, out=dot)
            torch.dot(flat, flat, out=norm)
            norm.sqrt_().clamp_(min=_EPS).mul_(self._ref_norm)
            dot.div_(norm)
            self.last_similarity = float(dot.item())
            self.last_probability = self.skip_probability(self.last_similarity)
            if self._in_a_row < self.max_skip and self._rng.random() < self.last_probability:
                self._in_a_row += 1
                return True
        if ref is None or ref.shape != flat.shape or ref.device != flat.device:
            ref = self._reference = torch.empty_like(flat)
            self._dot, self._norm, self._ref_norm = (flat.new_zeros(()) for _ in range(3))
        ref.copy_(flat)
        torch.dot(ref, ref, out=self._ref_norm)
        self._ref_norm.sqrt_().clamp_(min=_EPS)
        self._has_reference = True
        self._in_a_row = 0
        return False
