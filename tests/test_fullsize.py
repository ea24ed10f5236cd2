"""The full-size random-weight architectures of `sdbridge bench --arch` match the published models.

Built on PyTorch's meta device: no memory and no compute, so this runs on any machine."""

from __future__ import annotations

import pytest
import torch

from bridge.engine.fullsize import build_fullsize_pipeline


@pytest.mark.parametrize(
    "arch,unet_params,text_params",
    [
        ("sd-turbo", 865_910_724, 340_387_840),  # SD 2.1 UNet; OpenCLIP ViT-H text tower
        ("sdxl-turbo", 2_567_463_684, 123_060_480),  # SDXL UNet; CLIP ViT-L text encoder
    ],
)
def test_fullsize_architectures_have_the_published_sizes(
    arch: str, unet_params: int, text_params: int
) -> None:
    pipe = build_fullsize_pipeline(arch, device="meta", dtype=torch.float16)
    assert sum(p.numel() for p in pipe.unet.parameters()) == unet_params
    assert sum(p.numel() for p in pipe.text_encoder.parameters()) == text_params
    assert pipe.unet.dtype == torch.float16


def test_unknown_arch() -> None:
    with pytest.raises(ValueError, match="arch must be one of sd-turbo, sdxl-turbo, got 'sd3'"):
        build_fullsize_pipeline("sd3", device="meta", dtype=torch.float16)
