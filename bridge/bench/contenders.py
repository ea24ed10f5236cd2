"""The contenders of one benchmark row besides the engine itself, each a call that takes the frame a
show gets, an (H, W, 4) uint8 array on the host, and returns uint8 pixels on the host.

- `floor_call`: the bare forward work of one engine frame, plus the simplest torch code around it
  that a uint8 frame needs on its way in and out;
- `diffusers_call`: diffusers' own img2img pipeline on the same components, steps matched, prompt
  embeddings computed once with its own `encode_prompt`;
- `screen_call`: the similarity filter's work on a frame, alone (FILTER_INCLUDES);
- `skipped_frame_call`: a frame the filter skips, end to end (SKIPPED_INCLUDES).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bridge.engine import StreamEngine
from bridge.engine.accel import Networks
from bridge.transports.synthetic import test_pattern

Frame = np.ndarray  # (H, W, 4) uint8 on the host
Contender = Callable[[Frame], Any]

FLOOR_INCLUDES = (
    "the uint8 frame's host-to-device copy and its conversion to [-1, 1] pixels (fp32, then the "
    "model dtype), VAE encode, one UNet call on the engine's own prepared batch, VAE decode of one "
    "latent, the conversion to uint8 (fp32 rounding) and the device-to-host copy; not the noise, "
    "the scheduler math, residual CFG, the stream state, the alpha channel or the output ring"
)
DIFFUSERS_IO = (
    "in: PIL.Image.fromarray(frame[..., :3]) (RGB, as diffusers' image processor takes uint8 "
    "pixels), made inside the timed call; out: output_type='pil', the one diffusers output that "
    "ends in uint8 pixels (postprocess rounds to uint8); prompt_embeds (and SDXL's "
    "pooled_prompt_embeds) computed once with the pipeline's encode_prompt, no negatives "
    "(guidance_scale=1.0)"
)

FILTER_INCLUDES = (
    "StreamEngine.stage_and_screen, the eager step before the frame proper (never captured), as the engine's "
    "own call runs it: the input checks, the frame's host copy and host-to-device copy, x / 255 and "
    "the normalisation to [-1, 1] (fp32, then the model dtype), the cosine score against the last "
    "processed input with its one .item() (a device sync on CUDA), the skip decision and, as the "
    "frame passes, its copy into the filter's reference. Measured on the moving frame sequence with "
    "threshold 1.0, so that every frame is scored and none is skipped: the work a processed frame "
    "does before its UNet call, of which all but the score, the decision and the reference copy is "
    "also done with the filter off"
)
SKIPPED_INCLUDES = (
    "engine(frame, output_type='uint8') on a still input that the filter skips every time (the same "
    "frame on every call, threshold 0.0, no limit on skips in a row): the same staging, "
    "normalisation, score and decision, then the previous output's ring slot returned again (no "
    "UNet, no VAE, no copy to the host). What a show pays per frame while its input stands still"
)


def bench_frames(size: int, count: int = 4) -> list[Frame]:
    """`count` frames of the synthetic test pattern, a few frames of motion apart."""
    return [test_pattern(8 * k, size, size) for k in range(count)]


def floor_call(
    nets: Networks, inputs: Any, *, size: int, device: torch.device, dtype: torch.dtype
) -> Contender:
    """The bare forward work of one engine frame through `nets` (see FLOOR_INCLUDES). `inputs`:
    the engine's prepared UNet arguments (`StreamEngine.prepared_unet_inputs`)."""
    rows = inputs.timesteps.shape[0]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((rows, 4, size // 8, size // 8), generator=generator).to(device, dtype)

    @torch.no_grad()
    def run(frame: Frame) -> np.ndarray:
        x = torch.from_numpy(frame).to(device)  # (H, W, 4) uint8: the H2D copy
        # (1, 3, H, W) with channels-last strides, the layout the engine's uint8 staging gives the VAE
        rgb = x[..., :3].contiguous()[None].permute(0, 3, 1, 2)
        pixels = (rgb.float() / 255.0 * 2.0 - 1.0).to(dtype)
        nets.encode(pixels)
        nets.unet(latents, inputs.timesteps, inputs.embeds, inputs.added)
        image = nets.decode(latents[-1:])  # (1, 3, H, W) in about [-1, 1]
        rgb8 = (image.float() / 2.0 + 0.5).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
        return rgb8[0].permute(1, 2, 0).contiguous().cpu().numpy()  # (H, W, 3): the D2H copy

    return run


def _reference_pipeline(pipe: Any) -> Any:
    from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    cls = (
        StableDiffusionXLImg2ImgPipeline
        if getattr(pipe, "text_encoder_2", None) is not None
        else StableDiffusionImg2ImgPipeline
    )
    ref = cls(**pipe.components)
    ref.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


@torch.no_grad()
def diffusers_call(pipe: Any, prompt: str, *, steps: int, timesteps: list[int]) -> Contender:
    """diffusers' img2img on `pipe`'s components at the engine's own `timesteps` (strength 1.0:
    n UNet calls of batch 1), guidance 1.0, the prompt encoded once (see DIFFUSERS_IO)."""
    from PIL import Image

    ref = _reference_pipeline(pipe)
    device = pipe.unet.device
    embeds: dict[str, Any]
    if getattr(pipe, "text_encoder_2", None) is not None:
        cond, _neg, pooled, _neg_pooled = ref.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        embeds = {"prompt_embeds": cond, "pooled_prompt_embeds": pooled}
    else:
        cond, _neg = ref.encode_prompt(prompt, device, 1, False)
        embeds = {"prompt_embeds": cond}

    def run(frame: Frame) -> np.ndarray:
        image = Image.fromarray(frame[..., :3])
        out = ref(
            image=image,
            strength=1.0,
            num_inference_steps=steps,
            timesteps=timesteps,
            guidance_scale=1.0,
            output_type="pil",
            **embeds,
        )
        return np.asarray(out.images[0])  # (H, W, 3) uint8

    return run


def screen_call(engine: StreamEngine, first: Frame) -> Contender:
    """`engine.stage_and_screen` alone (see FILTER_INCLUDES), the filter switched on with threshold
    1.0: every frame is scored and passes. `first` is screened once here, untimed, so that the
    first timed frame already has a reference to be scored against."""
    engine.set_similarity_filter(enabled=True, threshold=1.0)
    engine.stage_and_screen(first)
    return engine.stage_and_screen


def skipped_frame_call(engine: StreamEngine, still: Frame) -> Contender:
    """`engine`'s uint8 call on `still`, whatever frame the rotation hands it, with the filter set
    to skip every repeat of it (see SKIPPED_INCLUDES). A repeat scores 1.0 (to within a rounding),
    so with threshold 0.0 it is skipped with probability 1 - 1e-7 or more; the seeded decisions
    make that reproducible, and `measure` checks afterwards that every timed call was skipped.
    `still` is processed once here, untimed, so that there is an output to return again."""
    engine.set_similarity_filter(enabled=True, threshold=0.0, max_skip=sys.maxsize)
    engine.similarity.seed(0)
    engine(still, output_type="uint8")
    return lambda _frame: engine(still, output_type="uint8")
