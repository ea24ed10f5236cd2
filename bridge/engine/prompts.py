"""Pre-computed prompt embeddings, cached by text, and weighted prompt blends.

Each distinct text is encoded once through the pipeline's own `encode_prompt` (so embeddings
match diffusers exactly, clip-skip and LoRA scale included) and kept, up to `max_entries` texts
(least recently used ones go first); switching back to a text still cached costs no
text-encoder call. SDXL conditioning carries a pooled embedding too.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Texts kept: a show cycles through a few dozen prompts; each entry is (1, 77, 768..2048) on the
# device (0.15-0.3 MB in fp16), so 64 cost at most ~20 MB. More than a blend's 16 entries plus
# the prompt and negative, so one blend never evicts its own parts.
CACHE_ENTRIES = 64

PromptSpec = str | Sequence[tuple[str, float]]
"""A prompt: one text, or a weighted blend [(text, weight), ...] with weights >= 0."""


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning for one row: `embeds` (1, L, D); `pooled` (1, P) for SDXL, else None."""

    embeds: Tensor
    pooled: Tensor | None

    def repeat(self, rows: int) -> Conditioning:
        """The same conditioning for `rows` rows."""
        pooled = None if self.pooled is None else self.pooled.expand(rows, -1)
        return Conditioning(self.embeds.expand(rows, -1, -1), pooled)


def normalize_prompt(prompt: PromptSpec, *, what: str = "prompt") -> tuple[tuple[str, float], ...]:
    """Validate a prompt spec and return it as ((text, weight), ...) with weights summing to 1."""
    if isinstance(prompt, str):
        return ((prompt, 1.0),)
    items = tuple(prompt)
    if not items:
        raise ValueError(f"{what} blend must name at least one prompt, got an empty list")
    parsed: list[tuple[str, float]] = []
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"{what} blend entries must be (text, weight) pairs, got {item!r}")
        weight = float(item[1])
        if not weight >= 0.0:  # also rejects NaN
            raise ValueError(f"{what} blend weight for {item[0]!r} must be >= 0, got {item[1]!r}")
        parsed.append((item[0], weight))
    total = sum(w for _, w in parsed)
    if total <= 0.0:
        raise ValueError(f"{what} blend weights must not all be zero, got {[w for _, w in parsed]}")
    return tuple((text, w / total) for text, w in parsed)


class PromptCache:
    """Encodes prompts with the pipeline's text encoder(s) and caches the result per text, an LRU
    of at most `max_entries` texts. Safe to call from several threads (an encoder thread and the
    engine loop): the cache is locked, the text encoder runs outside the lock."""

    def __init__(
        self, pipe: Any, *, device: torch.device, dtype: torch.dtype, max_entries: int = CACHE_ENTRIES
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._pipe = pipe
        self._device = device
        self._dtype = dtype
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.max_entries = max_entries
        self._cache: OrderedDict[str, Conditioning] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0  # = text-encoder calls

    def __len__(self) -> int:
        return len(self._cache)

    @torch.no_grad()
    def encode(self, text: str) -> Conditioning:
        """The conditioning of one text; encoded on first use only."""
        with self._lock:
            cached = self._cache.get(text)
            if cached is not None:
                self.hits += 1
                self._cache.move_to_end(text)  # most recently used last; eviction pops the first
                return cached
            self.misses += 1
        if self.is_sdxl:
            embeds, _, pooled, _ = self._pipe.encode_prompt(
                prompt=text, device=self._device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            cond = Conditioning(embeds.to(self._dtype), pooled.to(self._dtype))
        else:
            embeds, _ = self._pipe.encode_prompt(text, self._device, 1, False)
            cond = Conditioning(embeds.to(self._dtype), None)
        with self._lock:
            self._cache[text] = cond
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            cached_count = len(self._cache)
        log.debug("encoded prompt %r (%d cached)", text[:200], cached_count)
        return cond

    def negative(self, text: str) -> Conditioning:
        """The conditioning of a negative prompt. SDXL models that ask for it
        (`force_zeros_for_empty_prompt`) get zeros for an empty negative, as in diffusers."""
        cond = self.encode(text)
        zero_empty = bool(getattr(getattr(self._pipe, "config", None), "force_zeros_for_empty_prompt", False))
        if self.is_sdxl and zero_empty and text == "":
            pooled = None if cond.pooled is None else torch.zeros_like(cond.pooled)
            return Conditioning(torch.zeros_like(cond.embeds), pooled)
        return cond

    def blend(self, prompt: PromptSpec, *, what: str = "prompt") -> Conditioning:
        """The conditioning of a prompt spec: a single text, or the weighted mean of several."""
        items = normalize_prompt(prompt, what=what)
        if len(items) == 1:
            return self.negative(items[0][0]) if what == "negative_prompt" else self.encode(items[0][0])
        parts = [(self.encode(text), w) for text, w in items]
        embeds = sum((c.embeds * w for c, w in parts), torch.zeros_like(parts[0][0].embeds))
        pooled_parts = [(c.pooled, w) for c, w in parts if c.pooled is not None]
        pooled = None
        if pooled_parts:
            pooled = sum((p * w for p, w in pooled_parts), torch.zeros_like(pooled_parts[0][0]))
        return Conditioning(embeds, pooled)
