"""The stochastic similarity filter: skip rate per the formula, max_skip, and free skips."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from bridge.engine import SimilarityFilter, StreamEngine
from tests.conftest import count_calls, pattern, spy_unet


def pair_with_similarity(s: float, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Two vectors whose cosine similarity is exactly `s`."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, generator=gen)
    b = torch.randn(size, generator=gen)
    a = a / a.norm()
    b = b - (b @ a) * a
    b = b / b.norm()
    return a, s * a + math.sqrt(1 - s * s) * b


@pytest.mark.parametrize("similarity,threshold", [(0.8, 0.5), (0.95, 0.9), (0.99, 0.98), (0.4, 0.5)])
def test_skip_rate_matches_the_formula(similarity: float, threshold: float) -> None:
    filt = SimilarityFilter(enabled=True, threshold=threshold, max_skip=10_000, seed=1)
    a, b = pair_with_similarity(similarity)
    trials, skips = 4000, 0
    reference = None
    for _ in range(trials + 1):
        # Always offer the frame that is NOT the current reference, so every decision sees `similarity`.
        frame = b if reference is a else a
        if filt.should_skip(frame):
            skips += 1
        else:
            reference = frame
    expected = max(0.0, (similarity - threshold) / (1 - threshold))
    tolerance = 4 * math.sqrt(max(expected * (1 - expected), 1e-4) / trials)
    assert abs(skips / trials - expected) <= max(tolerance, 0.01)


@pytest.mark.parametrize("max_skip", [0, 1, 3])
def test_never_more_than_max_skip_in_a_row(max_skip: int) -> None:
    filt = SimilarityFilter(enabled=True, threshold=0.5, max_skip=max_skip, seed=2)
    frame = torch.ones(16)
    decisions = [filt.should_skip(frame) for _ in range(40)]
    assert decisions[0] is False  # the first frame always passes
    run = longest = 0
    for skipped in decisions:
        run = run + 1 if skipped else 0
        longest = max(longest, run)
    # Identical frames skip with probability 1, so runs are exactly max_skip long.
    assert longest == max_skip
    assert decisions.count(True) == (40 - 1) // (max_skip + 1) * max_skip + min(
        max_skip, (40 - 1) % (max_skip + 1)
    )


def test_threshold_one_never_skips_and_disabled_never_skips() -> None:
    filt = SimilarityFilter(enabled=True, threshold=1.0, seed=0)
    assert not any(filt.should_skip(torch.ones(4)) for _ in range(20))
    off = SimilarityFilter(enabled=False, seed=0)
    assert not any(off.should_skip(torch.ones(4)) for _ in range(20))


def test_filter_settings_are_validated() -> None:
    filt = SimilarityFilter()
    with pytest.raises(ValueError, match=r"similarity threshold must be within \[0, 1\], got 1.5"):
        filt.configure(threshold=1.5)
    with pytest.raises(ValueError, match="max_skip must be an int >= 0, got -1"):
        filt.configure(max_skip=-1)


def test_a_skipped_frame_costs_no_unet_or_vae_and_returns_the_last_output(tiny_pipe: Any) -> None:
    engine = StreamEngine(tiny_pipe, [32, 45], width=64, height=64, similarity_seed=0)
    engine.prepare("a cat")
    engine.set_similarity_filter(enabled=True, threshold=0.5, max_skip=2)
    still = pattern(0, 64)
    first = engine(still)
    first_uint8 = engine(still, output_type="uint8")  # may skip; either way a valid frame
    with (
        spy_unet(tiny_pipe) as spy,
        count_calls(tiny_pipe.vae.decoder) as decodes,
        count_calls(tiny_pipe.vae.encoder) as encodes,
    ):
        outs = [engine(still) for _ in range(9)]
    # Identical input: skip, skip, process, skip, skip, process, ...
    assert len(spy.batches) == 3 and len(decodes) == 3 and len(encodes) == 3
    assert engine.stats.skipped >= 6
    for out in outs[:2]:
        assert out is not None and out.shape == first.shape
    assert first_uint8.shape == (64, 64, 4)


def test_filter_changes_live_and_new_input_passes(tiny_pipe: Any) -> None:
    engine = StreamEngine(tiny_pipe, [32, 45], width=64, height=64, similarity_seed=0)
    engine.prepare("a cat")
    engine.set_similarity_filter(enabled=True, threshold=0.99, max_skip=100)
    engine(pattern(0, 64))
    with spy_unet(tiny_pipe) as spy:
        engine(pattern(0, 64))  # identical: skipped
        engine(pattern(5, 64))  # very different: cosine far below 0.99, never skipped
    assert len(spy.batches) == 1
    engine.set_similarity_filter(enabled=False)
    with spy_unet(tiny_pipe) as spy:
        for _ in range(3):
            engine(pattern(5, 64))
    assert len(spy.batches) == 3
