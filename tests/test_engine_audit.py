"""Gaps found by planting faults in the engine (a mutation audit): each test here failed with a
fault that every other engine test let through, and passes on the unmodified engine.

- the in-flight slots refilled after a live step-count change, checked frame by frame from the
  first call after the change (the fresh-engine tests only compare once they have left);
- the CPU generator a seed blend continues (txt2img latents, KL VAE sampling);
- CUDA graphs after a step-count change and back, without a warm-up in between;
- SDXL's time ids at a non-square size (every other SDXL test is square);
- the UNet row layout after `warm_up` at guidance <= 1 on the eager path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from bridge.engine import StreamEngine
from tests.conftest import pattern, pattern_uint8, spy_unet
from tests.fake_cudagraph import StandInGraphs
from tests.test_engine_graphs import pair
from tests.test_engine_reference import PREP, SIZE, Reference, _Packet, engine_for, frames_for
from tests.test_engine_stream import _img2img_reference


@pytest.mark.parametrize("old,new", [([32, 45], [20, 32, 45]), ([35], [0, 16, 32, 45])])
def test_step_count_change_refills_each_slot_with_its_own_noise(
    tiny_pipe: Any, old: list[int], new: list[int]
) -> None:
    """After a live step-count change, slot j (j = 1..n-1) holds the last output noised to tau_j
    with slot j's fixed noise (alpha_j * x0 + beta_j * noise_j, as a frame moving on from step j-1
    would be), and an empty residual memory; the fixed noise is the seed's, drawn for the new n.
    So every output from the first call after the change equals the reference restarted so."""
    engine = engine_for(tiny_pipe, old, "self", **PREP)
    frames = frames_for(1, 7)
    for image in frames[:3]:
        last = engine(image, output_type="latent")
    engine.set_t_index_list(new)
    ref = Reference(tiny_pipe, new, cfg="self", **PREP)
    zeros = torch.zeros_like(last)
    ref.flight = [
        _Packet(ref.alpha[j] * last + ref.beta[j] * ref.noise[j], zeros, j) for j in range(1, ref.n)
    ]
    for k, image in enumerate(frames[3:]):
        got, want = engine(image, output_type="latent"), ref(image)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"call {k} after: {m}")


def test_a_seed_blend_continues_the_heaviest_seeds_generator(tiny_pipe: Any) -> None:
    """The fixed noise of a blend is sum(w_i * noise_i) / sqrt(sum(w_i^2)), and the CPU generator
    that goes on (txt2img latents here; KL VAE sampling likewise) is the heaviest seed's, after
    its draw of the fixed noise, whatever order the blend lists the seeds in."""
    h = w = SIZE // 8
    engine = StreamEngine(tiny_pipe, [32, 45], width=SIZE, height=SIZE, cfg_type="none")
    engine.prepare("a photo of a cat", seed=[(9, 0.4), (7, 0.6)])
    shape = (2, 4, h, w)
    gen = torch.Generator().manual_seed(7)
    n7 = torch.randn(shape, generator=gen)
    n9 = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(engine.init_noise, (0.6 * n7 + 0.4 * n9) / (0.6**2 + 0.4**2) ** 0.5)
    with spy_unet(tiny_pipe) as spy:
        for _ in range(3):
            engine(None, output_type="latent")
    for call in range(3):
        want = torch.randn((1, 4, h, w), generator=gen)
        assert torch.equal(spy.inputs[call][:1], want), f"call {call}: not seed 7's generator continued"


def test_a_step_count_change_and_back_without_warm_up_replays_no_stale_graph(tiny_pipe: Any) -> None:
    """A step-count change drops every graph: going 2 -> 4 -> 2 steps with frames in between and
    no warm_up (the frame captures what it lacks) must not replay a graph of the old buffers."""
    eager, graph, _backend = pair(tiny_pipe, "self", [32, 45])
    engines = (eager, graph)
    graph.warm_up(pattern_uint8(0, SIZE))
    for k in range(9):
        if k in (2, 5):
            for engine in engines:
                engine.set_t_index_list([20, 30, 38, 45] if k == 2 else [32, 45])
        frame = pattern_uint8(k, SIZE)
        assert np.array_equal(graph(frame, output_type="uint8"), eager(frame, output_type="uint8")), k


def test_sdxl_one_step_equals_diffusers_at_a_non_square_size(tiny_sdxl_pipe: Any) -> None:
    """SDXL's time ids are (original height, width, crop top, left, target height, width): at a
    square size a swap of height and width cannot show."""
    height, width = 64, 128
    engine = StreamEngine(tiny_sdxl_pipe, [35], width=width, height=height, cfg_type="none")
    engine.prepare("neon city at night", seed=5)
    image = pattern(3, width)[..., :height, :]
    tau = 999 - 20 * 35
    expected = _img2img_reference(
        StableDiffusionXLImg2ImgPipeline, tiny_sdxl_pipe, tau, 5, image, "neon city at night"
    )
    assert expected.shape == (1, 3, height, width)
    torch.testing.assert_close(engine(image), expected, rtol=1e-4, atol=1e-4)


class _FailingGraphs(StandInGraphs):
    def capture(self, body: Any) -> Any:
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("cfg", ["full", "initialize"])
def test_warm_up_at_guidance_one_leaves_the_unguided_rows(tiny_pipe: Any, cfg: str) -> None:
    """warm_up lays the rows out for both sides of guidance 1.0 meanwhile; afterwards an eager
    frame (here: every capture failed) runs the rows of the guidance in effect (n, not 2n or
    n+1) and equals an engine that never warmed up."""
    made = []
    for backend in (None, _FailingGraphs()):
        engine = StreamEngine(
            tiny_pipe,
            [32, 45],
            width=SIZE,
            height=SIZE,
            cfg_type=cfg,
            acceleration="none" if backend is None else "cuda_graph",
            graph_backend=backend,
        )
        engine.prepare("a photo of a cat", negative_prompt="blurry", guidance_scale=1.0, seed=5)
        made.append(engine)
    plain, warmed = made
    warmed.warm_up(pattern_uint8(0, SIZE))
    assert "capture failed" in warmed.acceleration_fallback
    for k in range(3):
        frame = pattern_uint8(k, SIZE)
        with spy_unet(tiny_pipe) as spy:
            got = warmed(frame, output_type="uint8")
        assert spy.batches == [2], f"frame {k}: the UNet ran {spy.batches} rows at guidance 1.0"
        assert np.array_equal(got, plain(frame, output_type="uint8")), k


def test_an_sdxl_prompt_blend_blends_the_pooled_embedding_too(tiny_sdxl_pipe: Any) -> None:
    """A blend is the weighted mean of every conditioning input: the token embeddings and, for
    SDXL, the pooled one (text_embeds), straight from the pipe's encode_prompt."""
    engine = StreamEngine(tiny_sdxl_pipe, [35], width=SIZE, height=SIZE, cfg_type="none")
    engine.prepare([("neon city at night", 3.0), ("a photo of a cat", 1.0)])
    with spy_unet(tiny_sdxl_pipe) as spy:
        engine(pattern(0, SIZE))

    def encode(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = tiny_sdxl_pipe.encode_prompt(
            prompt=text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled

    (e1, p1), (e2, p2) = encode("neon city at night"), encode("a photo of a cat")
    torch.testing.assert_close(spy.kwargs[0]["encoder_hidden_states"], 0.75 * e1 + 0.25 * e2)
    torch.testing.assert_close(spy.kwargs[0]["added_cond_kwargs"]["text_embeds"], 0.75 * p1 + 0.25 * p2)
