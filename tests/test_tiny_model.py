"""The embedded default shows its input: at the default config, on a still image, the output's
luminance follows the input's, and prompt and seed still change the frame visibly. The model
is the one `load_pipeline("tiny")` loads with `from_pretrained` from its generated folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from bridge.config import load_config
from bridge.engine import StreamEngine
from bridge.engine.tiny import tiny_model_dir
from bridge.runtime import initial_values

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = initial_values(load_config(ROOT / "configs" / "default.yaml"))
SIZE = load_config(ROOT / "configs" / "default.yaml").engine.width


def shapes(size: int = SIZE, ground: tuple[int, int, int] = (40, 60, 90)) -> np.ndarray:
    """A still image of flat shapes on a (by default dark) ground, (H, W, 4) uint8 RGBA."""
    img = Image.new("RGB", (size, size), ground)
    draw = ImageDraw.Draw(img)
    s = size / 256
    draw.ellipse((30 * s, 40 * s, 130 * s, 140 * s), fill=(230, 200, 40))
    draw.rectangle((140 * s, 120 * s, 230 * s, 220 * s), fill=(200, 40, 60))
    draw.polygon([(60 * s, 230 * s), (120 * s, 160 * s), (180 * s, 240 * s)], fill=(60, 180, 90))
    return np.asarray(img.convert("RGBA"))


def scene(size: int = SIZE) -> np.ndarray:
    """A photo-like still: a sky graded from pale to deep blue over dark hills, and a sun."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    sky = np.stack([0.45 + 0.4 * yy, 0.6 + 0.3 * yy, 0.95 - 0.1 * yy], axis=-1)
    hills = np.stack([0.25 + 0.2 * xx, 0.45 - 0.2 * yy, 0.15 + 0 * xx], axis=-1)
    rgb = np.where((yy > 0.6 + 0.1 * np.sin(6 * xx))[..., None], hills, sky)
    rgb[(xx - 0.75) ** 2 + (yy - 0.25) ** 2 < 0.008] = (1.0, 0.95, 0.7)
    out = np.full((size, size, 4), 255, np.uint8)
    out[..., :3] = (rgb * 255).round()
    return out


def gradient(size: int = SIZE) -> np.ndarray:
    """A bare, low-contrast colour gradient: nothing but smooth levels."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    rgb = np.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.8 - 0.5 * xx * yy], axis=-1)
    out = np.full((size, size, 4), 255, np.uint8)
    out[..., :3] = (rgb * 255).round()
    return out


STILLS = {
    "dark": lambda: shapes(),
    "light": lambda: shapes(ground=(225, 225, 215)),
    "mid-grey": lambda: shapes(ground=(128, 128, 128)),
    "scene": scene,
    "gradient": gradient,
}


def luminance(rgba: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of (H, W, 3|4) uint8 pixels, as float64."""
    return np.asarray(rgba[..., :3], np.float64) @ np.array([0.299, 0.587, 0.114])


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(luminance(a).ravel(), luminance(b).ravel())[0, 1])


def run(pipe: Any, image: np.ndarray, **changes: Any) -> np.ndarray:
    """The default config's engine and live values (with `changes`) on a still `image`; the
    frame once the stream is full (a frame leaves len(t_index_list) - 1 calls after it entered)."""
    values = {**DEFAULT, **changes}
    engine = StreamEngine(pipe, list(values["t_index_list"]), width=SIZE, height=SIZE, cfg_type="self")
    engine.prepare(
        values["prompt"],
        negative_prompt=values["negative_prompt"],
        guidance_scale=values["guidance"],
        delta=values["delta"],
        seed=values["seed"],
    )
    out: np.ndarray = np.zeros(0)
    for _ in range(len(values["t_index_list"]) + 2):
        out = engine(image, output_type="uint8")
    return out


def test_the_default_model_is_loaded_from_its_saved_folder(tiny_pipe: Any, model_cache: Path) -> None:
    folder = tiny_model_dir("tiny", model_cache)
    assert (folder / "model_index.json").is_file() and (folder / "vae" / "config.json").is_file()
    assert type(tiny_pipe.vae).__name__ == "AutoencoderTiny"
    assert Path(tiny_pipe.vae.config._name_or_path) == folder / "vae"


def test_the_autoencoder_keeps_the_picture(tiny_pipe: Any) -> None:
    image = shapes()
    pixels = torch.from_numpy(image[..., :3].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = tiny_pipe.vae.encode(pixels).latents  # (1, 4, H/8, W/8)
        decoded = tiny_pipe.vae.decode(latents).sample
    assert latents.shape == (1, 4, SIZE // 8, SIZE // 8)
    back = ((decoded[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
    assert correlation(back, image) >= 0.9
    # Of 255: colours kept too, within the blur of edges at 1/8 resolution.
    assert float(np.abs(back.astype(float) - image[..., :3]).mean()) < 32


@pytest.mark.parametrize("name", list(STILLS))
def test_the_default_output_shows_its_input(tiny_pipe: Any, name: str) -> None:
    image = STILLS[name]()
    out = run(tiny_pipe, image)
    # Dark ground: -0.12 with a random VAE. With the pass-through VAE at latent spread 2 and a
    # deep path that saw the picture's levels: dark 0.80, light 0.66 (the decoder's
    # 3 * tanh(z / 3) squashed the bright latents), mid-grey 0.39, scene 0.89, gradient 0.24.
    assert correlation(out, image) >= 0.7
    # The frame's brightness follows the input's: of 255, the light ground's mean 196 came out
    # at 161 through the squashed latents.
    assert abs(float(luminance(out).mean() - luminance(image).mean())) < 20
    assert float(luminance(out).std()) > 10  # not flat
    clamped = ((out[..., :3] == 0) | (out[..., :3] == 255)).mean()
    assert float(clamped) < 0.2


@pytest.mark.parametrize("ground", [(40, 60, 90), (225, 225, 215)], ids=["dark", "light"])
@pytest.mark.parametrize("change", [{"prompt": "neon city at night"}, {"seed": 7}], ids=["prompt", "seed"])
def test_prompt_and_seed_still_change_the_output(
    tiny_pipe: Any, change: dict[str, Any], ground: tuple[int, int, int]
) -> None:
    image = shapes(ground=ground)
    base = run(tiny_pipe, image)
    other = run(tiny_pipe, image, **change)
    # 8 of 255 levels on average over the whole frame: plainly visible.
    assert float(np.abs(other[..., :3].astype(float) - base[..., :3]).mean()) > 8
    assert correlation(other, image) >= 0.6  # and the input still shows
