"""The prompt embedding cache is an LRU of bounded size, on the real tiny pipeline's encoder."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge.engine.prompts import CACHE_ENTRIES, PromptCache
from bridge.params import MAX_BLEND_ENTRIES


def cache(pipe: Any, entries: int) -> PromptCache:
    return PromptCache(pipe, device=torch.device("cpu"), dtype=torch.float32, max_entries=entries)


def test_the_least_recently_used_text_goes_first(tiny_pipe: Any) -> None:
    prompts = cache(tiny_pipe, 3)
    first_b = prompts.encode("b").embeds.clone()
    for text in ("a", "c", "b", "a"):  # a is used last, b before it, c least recently
        prompts.encode(text)
    assert (prompts.misses, prompts.hits) == (3, 2)
    prompts.encode("d")  # full: c goes
    assert len(prompts) == 3
    for text in ("a", "b", "d"):
        prompts.encode(text)
    assert (prompts.misses, prompts.hits) == (4, 5), "a, b and d should still be cached"
    prompts.encode("c")  # evicted: encoded again, to the same embedding as the first time
    assert prompts.misses == 5
    assert torch.equal(prompts.encode("b").embeds, first_b)


def test_many_distinct_prompts_stay_within_the_bound(tiny_pipe: Any) -> None:
    prompts = cache(tiny_pipe, 8)
    for i in range(100):
        prompts.encode(f"prompt number {i}")
    assert len(prompts) == 8 and prompts.misses == 100
    prompts.blend([(f"prompt number {i}", 1.0) for i in range(92, 100)])  # the newest 8: cached
    assert prompts.misses == 100


def test_the_default_bound_holds_a_whole_blend() -> None:
    assert CACHE_ENTRIES >= MAX_BLEND_ENTRIES + 2  # the blend, the prompt and the negative
    with pytest.raises(ValueError, match="max_entries must be >= 1, got 0"):
        PromptCache(object(), device=torch.device("cpu"), dtype=torch.float32, max_entries=0)
