"""The engine's argument checks: each live value is validated once, where it enters (the
constructor, `prepare`, a setter), so the per-frame path runs no checks (STYLE.md rule 5)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from bridge.params import MAX_STEPS  # the parameter table's bound is the engine's

SeedSpec = int | Sequence[tuple[int, float]]
"""A seed, or a blend [(seed, weight), ...] of the seeds' noises (variance preserved)."""

SeedPairs = tuple[tuple[int, float], ...]
"""A checked seed spec: (seed, weight) pairs, heaviest first, zero weights dropped."""


def validate_t_index_list(t_index_list: Sequence[int], num_inference_steps: int | None) -> list[int]:
    """1 to MAX_STEPS strictly ascending ints, each below `num_inference_steps` when given."""
    values = list(t_index_list)
    if not 1 <= len(values) <= MAX_STEPS:
        raise ValueError(f"t_index_list must hold 1 to {MAX_STEPS} entries, got {len(values)}: {values}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ValueError(f"t_index_list entries must be ints, got {v!r} in {values}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"t_index_list must be strictly ascending, got {values}")
    if num_inference_steps is not None and not all(0 <= v < num_inference_steps for v in values):
        raise ValueError(
            f"t_index_list entries must be within [0, {num_inference_steps - 1}] "
            f"(num_inference_steps={num_inference_steps}), got {values}"
        )
    return [int(v) for v in values]


def check_guidance(value: float) -> float:
    """guidance_scale within [0, 50]."""
    g = float(value)
    if not 0.0 <= g <= 50.0:  # also rejects NaN
        raise ValueError(f"guidance_scale must be within [0, 50], got {value!r}")
    return g


def check_delta(value: float) -> float:
    """The residual-CFG delta within [0, 10]."""
    d = float(value)
    if not 0.0 <= d <= 10.0:
        raise ValueError(f"delta must be within [0, 10], got {value!r}")
    return d


def check_seed(seed: SeedSpec) -> SeedPairs:
    """A seed or a blend as (seed, weight) pairs: seeds within [0, 2**63), weights >= 0 and not
    all zero. The heaviest seed comes first: it drives the CPU generator that continues after
    the noise."""
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        pairs: list[tuple[int, float]] = [(int(seed), 1.0)]
    elif (
        isinstance(seed, Sequence) and seed and all(isinstance(p, tuple | list) and len(p) == 2 for p in seed)
    ):
        pairs = [(int(s), float(w)) for s, w in seed]
    else:
        raise ValueError(f"seed must be an int or a list of (seed, weight) pairs, got {seed!r}")
    for s, w in pairs:
        if not 0 <= s < 2**63:
            raise ValueError(f"seed must be within [0, 2**63), got {s}")
        if not w >= 0.0:
            raise ValueError(f"seed blend weight for seed {s} must be >= 0, got {w}")
    if sum(w for _, w in pairs) <= 0.0:
        raise ValueError(f"seed blend weights must not all be zero, got {pairs}")
    pairs.sort(key=lambda p: -p[1])
    return tuple(p for p in pairs if p[1] > 0.0)


def check_frame_buffer_size(value: int) -> int:
    """frame_buffer_size: an int >= 1 (a bool is no count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"frame_buffer_size must be an int >= 1, got {value!r}")
    return value


def check_warm_steps(values: Sequence[int]) -> tuple[int, ...]:
    """warm_steps: step counts within [1, MAX_STEPS] (a bool is no count), sorted, each once."""
    counts = list(values)
    bad = [v for v in counts if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_STEPS]
    if bad:
        raise ValueError(f"warm_steps must be step counts within [1, {MAX_STEPS}], got {counts!r}")
    return tuple(sorted(set(counts)))
