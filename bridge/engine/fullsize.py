"""Full-size sd-turbo and sdxl-turbo architectures with random weights, for benchmarks.

Random weights cost exactly what real ones do, so `sdbridge bench --arch sd-turbo` measures a
real model's speed on a machine that cannot download one. The configs are those of the
published checkpoints (UNet, text encoders) with TAESD/TAESDXL as the VAE, as in the paper's
figures. The tokenizer is the tiny one: prompts are encoded once and cached, so its vocabulary
does not affect frame time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

FULLSIZE_ARCHS = ("sd-turbo", "sdxl-turbo")


def _clip(hidden: int, layers: int, heads: int, intermediate: int, act: str, projection: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection,
    )


def build_fullsize_pipeline(arch: str, *, device: str, dtype: torch.dtype) -> Any:
    """A random-weight pipeline of `arch` ("sd-turbo" or "sdxl-turbo") built on `device`."""
    from diffusers import AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from bridge.engine.tiny import assemble_pipeline, tiny_tokenizer

    if arch not in FULLSIZE_ARCHS:
        raise ValueError(f"arch must be one of {', '.join(FULLSIZE_ARCHS)}, got {arch!r}")
    with tempfile.TemporaryDirectory() as work:
        tokenizer = tiny_tokenizer(Path(work))
    scheduler = LCMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing"
    )
    torch.manual_seed(0)
    with torch.device(device):
        if arch == "sd-turbo":
            unet = UNet2DConditionModel(
                sample_size=64,
                block_out_channels=(320, 640, 1280, 1280),
                attention_head_dim=(5, 10, 20, 20),
                cross_attention_dim=1024,
                use_linear_projection=True,
            )
            text_encoder = CLIPTextModel(_clip(1024, 23, 16, 4096, "gelu", 1024))
            text_encoder_2 = None
        else:
            unet = UNet2DConditionModel(
                sample_size=64,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
            text_encoder = CLIPTextModel(_clip(768, 12, 12, 3072, "quick_gelu", 768))
            text_encoder_2 = CLIPTextModelWithProjection(_clip(1280, 32, 20, 5120, "gelu", 1280))
        pipe = assemble_pipeline(
            unet=unet,
            vae=AutoencoderTiny(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            text_encoder_2=text_encoder_2,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)
