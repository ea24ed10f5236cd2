"""The exact path in float16 is bit for bit the original's, on the CPU (where fp16 kernels are
deterministic): pixels normalised in fp32 and cast once, the output rounded to uint8 in fp32.

The reference is `tests.test_engine_reference.Reference` run in fp16: diffusers' own
`VaeImageProcessor` pre- and post-processing, the LCM scheduler's coefficients (square roots in
fp32, then one cast, as the original), and the pipe's components in fp16.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import pattern, pattern_uint8
from tests.test_engine_reference import SIZE, Reference, engine_for

PREP = {"negative_prompt": "blurry, dark", "guidance_scale": 1.8, "delta": 0.7, "seed": 5}


@pytest.fixture(scope="module")
def half_pipe(tiny_pipe: Any) -> Any:
    return copy.deepcopy(tiny_pipe).to(torch.float16)


@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
def test_fp16_uint8_frames_are_bit_exact(half_pipe: Any, cfg: str) -> None:
    engine = engine_for(half_pipe, [32, 45], cfg, dtype=torch.float16, **PREP)
    ref = Reference(half_pipe, [32, 45], cfg=cfg, dtype=torch.float16, **PREP)
    for k in range(5):
        image = pattern_uint8(k, SIZE)
        got = engine(image, output_type="uint8")
        _, want = ref.postprocess(ref(image))
        assert got.dtype == np.uint8 and got.shape == (SIZE, SIZE, 4)
        assert np.array_equal(got, want[0]), f"call {k}: {(got != want[0]).sum()} values differ"


@pytest.mark.parametrize("cfg", ["none", "self"])
@pytest.mark.parametrize("t_index", [[35], [32, 45]])
def test_fp16_float_frames_are_bit_exact(half_pipe: Any, cfg: str, t_index: list[int]) -> None:
    engines = {
        kind: engine_for(half_pipe, t_index, cfg, dtype=torch.float16, **PREP) for kind in ("latent", "pt")
    }
    ref = Reference(half_pipe, t_index, cfg=cfg, dtype=torch.float16, **PREP)
    for k in range(4):
        image = pattern(k, SIZE)  # float32 in [0, 1]
        latent = ref(image)
        assert torch.equal(engines["latent"](image, output_type="latent"), latent), f"call {k}: latent"
        want_pt, _ = ref.postprocess(latent)
        got_pt = engines["pt"](image, output_type="pt")
        assert got_pt.dtype == torch.float16 and torch.equal(got_pt, want_pt), f"call {k}: pt"
